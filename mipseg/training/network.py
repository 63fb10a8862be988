"""A compact 3D U-Net built from the plans (nnU-Net's PlainConvUNet, written out).

Encoder stage ``i``: ``n_conv_per_stage`` blocks of Conv3d -> InstanceNorm3d(affine) -> LeakyReLU(0.01);
the first conv of stage ``i > 0`` is strided by ``strides[i]`` (nnU-Net's strided-conv downsampling).
Decoder stage ``j`` (deepest first): ConvTranspose3d(kernel = stride = ``strides[s]``), concatenation
with the skip of encoder stage ``s - 1``, ``n_conv_per_stage_decoder`` blocks, and a 1x1x1 seg head.
Every decoder stage has a head so that deep-supervision and plain checkpoints interchange.

The per-level features are exposed (``forward(x, return_features=True)``) so that the MIP branch
(issue 6) can gather encoder and decoder features along projection rays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mipseg.planning.plans import NetworkTopology, Plans


@dataclass
class UNetFeatures:
    """Intermediate tensors of one forward pass.

    Attributes
    ----------
    encoder
        Output of every encoder stage, highest resolution first; ``encoder[-1]`` is the
        bottleneck. Shapes ``(B, features_per_stage[i], z_i, y_i, x_i)``.
    decoder
        Output of every decoder stage (before its seg head), highest resolution first,
        so ``decoder[i]`` has the resolution and channel count of ``encoder[i]``
        (``len(decoder) == num_stages - 1``).
    """

    encoder: list[torch.Tensor]
    decoder: list[torch.Tensor]


def _conv_block(
    in_channels: int, out_channels: int, kernel: Sequence[int], stride: Sequence[int]
) -> nn.Sequential:
    """Conv3d -> InstanceNorm3d(affine) -> LeakyReLU(0.01), 'same' padding for odd kernels."""
    padding = [(k - 1) // 2 for k in kernel]
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, tuple(kernel), tuple(stride), tuple(padding), bias=True),
        nn.InstanceNorm3d(out_channels, eps=1e-5, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
    )


def _stage(in_channels: int, out_channels: int, kernel: Sequence[int], stride: Sequence[int], n_conv: int):
    blocks = [_conv_block(in_channels, out_channels, kernel, stride)]
    blocks += [_conv_block(out_channels, out_channels, kernel, (1, 1, 1)) for _ in range(n_conv - 1)]
    return nn.Sequential(*blocks)


def he_init(module: nn.Module) -> None:
    """nnU-Net's ``InitWeights_He(1e-2)``: kaiming-normal conv weights (a=0.01), zero biases."""
    if isinstance(module, nn.Conv3d | nn.ConvTranspose3d):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class UNet3D(nn.Module):
    """Plain 3D U-Net with strided-conv downsampling and transposed-conv upsampling.

    Parameters
    ----------
    topology
        Stages, kernels and strides from the plans.
    num_input_channels, num_classes
        Image channels in, logits channels out (background included, ignore label excluded).
    deep_supervision
        If True, :meth:`forward` returns the logits of every decoder level (highest resolution
        first); otherwise only the full-resolution logits.
    dropout
        Probability of ``Dropout3d`` after the bottleneck and before the final seg head (0 = off),
        for Monte-Carlo dropout uncertainty as in the published MIP method.
    """

    def __init__(
        self,
        topology: NetworkTopology,
        *,
        num_input_channels: int,
        num_classes: int,
        deep_supervision: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if topology.num_stages < 2:
            raise ValueError(f"a U-Net needs at least 2 stages, the plans have {topology.num_stages}")
        self.topology = topology
        self.num_classes = num_classes
        self.deep_supervision = deep_supervision
        self.dropout_p = float(dropout)
        features = topology.features_per_stage

        self.encoder = nn.ModuleList()
        in_channels = num_input_channels
        for i, out_channels in enumerate(features):
            self.encoder.append(
                _stage(
                    in_channels,
                    out_channels,
                    topology.kernel_sizes[i],
                    topology.strides[i],
                    topology.n_conv_per_stage,
                )
            )
            in_channels = out_channels

        # decoder stage j upsamples encoder stage s = num_stages - 1 - j to the resolution of s - 1
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.seg_heads = nn.ModuleList()
        for s in range(topology.num_stages - 1, 0, -1):
            stride = tuple(topology.strides[s])
            self.upsample.append(nn.ConvTranspose3d(features[s], features[s - 1], stride, stride, bias=True))
            self.decoder.append(
                _stage(
                    2 * features[s - 1],
                    features[s - 1],
                    topology.kernel_sizes[s - 1],
                    (1, 1, 1),
                    topology.n_conv_per_stage_decoder,
                )
            )
            self.seg_heads.append(nn.Conv3d(features[s - 1], num_classes, 1, 1, 0, bias=True))
        self.bottleneck_dropout = nn.Dropout3d(self.dropout_p) if self.dropout_p > 0 else nn.Identity()
        self.head_dropout = nn.Dropout3d(self.dropout_p) if self.dropout_p > 0 else nn.Identity()
        self.apply(he_init)

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor | list[torch.Tensor], UNetFeatures]:
        """Logits for a batch ``x`` of shape ``(B, C, z, y, x)``.

        Returns
        -------
        logits
            With deep supervision a list of ``(B, K, z_i, y_i, x_i)``, highest resolution first
            (``num_stages - 1`` entries); otherwise one ``(B, K, z, y, x)`` tensor.
        features
            Only with ``return_features``: the :class:`UNetFeatures` of this pass.
        """
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = self.bottleneck_dropout(skips[-1])
        decoded: list[torch.Tensor] = []
        logits: list[torch.Tensor] = []
        last = len(self.decoder) - 1
        for j, (up, stage, head) in enumerate(zip(self.upsample, self.decoder, self.seg_heads)):
            x = up(x)
            x = stage(torch.cat((x, skips[-(j + 2)]), dim=1))
            decoded.append(x)
            if j == last:
                logits.append(head(self.head_dropout(x)))
            elif self.deep_supervision:
                logits.append(head(x))
        logits = logits[::-1]
        output = logits if self.deep_supervision else logits[0]
        if return_features:
            return output, UNetFeatures(encoder=skips, decoder=decoded[::-1])
        return output


def build_network(
    plans: Plans,
    *,
    num_input_channels: int,
    num_classes: int,
    deep_supervision: bool = True,
    dropout: float = 0.0,
) -> UNet3D:
    """The 3D U-Net of ``plans.network`` (He-initialised).

    Parameters
    ----------
    plans
        The dataset's plans; only ``plans.network`` is used.
    num_input_channels, num_classes
        Image channels and output classes (background included, ignore excluded).
    deep_supervision
        Return a list of logits, highest resolution first (training), or one tensor (inference).
    dropout
        ``Dropout3d`` probability at the bottleneck and before the final head.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return UNet3D(
        plans.network,
        num_input_channels=num_input_channels,
        num_classes=num_classes,
        deep_supervision=deep_supervision,
        dropout=dropout,
    )


def deep_supervision_scales(topology: NetworkTopology) -> list[list[float]]:
    """Per deep-supervision output, its size relative to the input, per axis ``(z, y, x)``.

    nnU-Net's ``1 / cumprod(strides)[:-1]``: the first entry is ``[1, 1, 1]`` (full resolution).
    """
    cumulative = np.cumprod(np.array(topology.strides, dtype=float), axis=0)
    return [list(1.0 / c) for c in cumulative[:-1]]


def conv_feature_map_size(
    topology: NetworkTopology,
    patch_size: Sequence[int],
    num_input_channels: int,
    num_classes: int,
) -> int:
    """Number of feature-map voxels the network stores for one sample (memory estimate).

    Mirrors dynamic-network-architectures' ``compute_conv_feature_map_size``: counts the output
    of every conv (its norm and nonlinearity are counted as one more copy each in nnU-Net, here
    the conv output only), every transposed conv, skip concatenations and seg heads. The planner
    may use it to compare patch/batch choices against a reference budget; only ratios matter.

    Parameters
    ----------
    topology
        Network topology from the plans.
    patch_size
        Patch ``(z, y, x)``; must be divisible by ``topology.divisibility``.
    num_input_channels, num_classes
        As for :func:`build_network` (the input itself is counted once).
    """
    size = np.array(patch_size, dtype=np.int64)
    total = int(np.prod(size)) * num_input_channels
    shapes = []
    for i, channels in enumerate(topology.features_per_stage):
        size = size // np.array(topology.strides[i])
        voxels = int(np.prod(size))
        shapes.append(voxels)
        total += channels * voxels * topology.n_conv_per_stage
    for s in range(topology.num_stages - 1, 0, -1):
        voxels = shapes[s - 1]
        channels = topology.features_per_stage[s - 1]
        total += channels * voxels  # transposed conv output
        total += 2 * channels * voxels  # concatenation
        total += channels * voxels * topology.n_conv_per_stage_decoder
        total += num_classes * voxels  # seg head
    return int(total)
