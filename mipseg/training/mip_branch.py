"""The 2D MIP branch fused with the 3D U-Net, and the wrapper module the MIP trainer trains.

Published design (``reference/seed-methods.md`` A.3): a 2D U-Net on the MIP image whose encoder
and decoder, at every level, concatenate the 3D network's feature of that level sampled at the
depth (argmax) index of each ray, the index map reduced per level. The branch never feeds the
3D output; it only shapes the shared 3D features through the gradient of its loss. Prediction
uses the 3D network alone: checkpoints store its weights as ``network_weights`` (loadable by
:func:`mipseg.training.network.build_network`) and the branch's under ``mip_branch_weights``.

Here the branch is light (``features_per_stage // 4`` own channels, one conv per stage) and its
depth map is the argmax of image channel 0 within the patch along the ray, downsampled per
level by nearest sampling in-plane and integer division by the level's cumulative stride along
the ray.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from mipseg.planning.plans import NetworkTopology, Plans
from mipseg.training.mip_losses import gather_at_depth
from mipseg.training.network import UNet3D, build_network

BRANCH_WIDTH_DIVISOR = 4
MIN_BRANCH_CHANNELS = 4
BRANCH_KEY = "branches."


def _block_2d(
    in_channels: int, out_channels: int, kernel: Sequence[int], stride: Sequence[int]
) -> nn.Sequential:
    """Conv2d -> InstanceNorm2d(affine) -> LeakyReLU(0.01), as the 3D network's blocks."""
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, tuple(kernel), tuple(stride), tuple((k - 1) // 2 for k in kernel)
        ),
        nn.InstanceNorm2d(out_channels, eps=1e-5, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
    )


class MipBranch2D(nn.Module):
    """2D U-Net on the MIP along ``axis`` with the gathered 3D features concatenated at every level.

    Parameters
    ----------
    topology
        The 3D network's topology (its in-plane kernels and strides are reused).
    axis
        Spatial axis of the projection (0 = z).
    num_input_channels, num_classes
        Image channels (the MIP of each) and output classes.
    """

    def __init__(self, topology: NetworkTopology, axis: int, *, num_input_channels: int, num_classes: int):
        super().__init__()
        self.axis = int(axis)
        plane = [d for d in range(3) if d != self.axis]
        features = list(topology.features_per_stage)
        own = [max(MIN_BRANCH_CHANNELS, f // BRANCH_WIDTH_DIVISOR) for f in features]
        strides = [[s[d] for d in plane] for s in topology.strides]
        kernels = [[k[d] for d in plane] for k in topology.kernel_sizes]
        cumulative = np.cumprod(np.array(topology.strides, dtype=int), axis=0)
        # per level: (in-plane step of the depth map, divisor of the depth along the ray)
        self.level_steps = [(int(c[plane[0]]), int(c[plane[1]]), int(c[self.axis])) for c in cumulative]
        self.encoder = nn.ModuleList()
        in_channels = num_input_channels
        for i in range(len(features)):
            self.encoder.append(_block_2d(in_channels, own[i], kernels[i], strides[i]))
            in_channels = own[i] + features[i]  # + the gathered 3D encoder feature
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for s in range(len(features) - 1, 0, -1):
            self.upsample.append(nn.ConvTranspose2d(in_channels, own[s - 1], strides[s], strides[s]))
            skip = own[s - 1] + features[s - 1]
            self.decoder.append(_block_2d(own[s - 1] + skip, own[s - 1], kernels[s - 1], (1, 1)))
            in_channels = own[s - 1] + features[s - 1]  # + the gathered 3D decoder feature
        self.head = nn.Conv2d(in_channels, num_classes, 1)

    def level_depth(self, depth: torch.Tensor, level: int) -> torch.Tensor:
        """The full-resolution depth map ``(B, H, W)`` reduced to encoder level ``level``."""
        rows, cols, along = self.level_steps[level]
        return torch.div(depth[:, ::rows, ::cols], along, rounding_mode="floor")

    def forward(self, image: torch.Tensor, depth: torch.Tensor, encoder: list, decoder: list) -> torch.Tensor:
        """Logits ``(B, K, H, W)`` of the MIP.

        Parameters
        ----------
        image
            ``(B, C, H, W)`` MIP of the patch (all channels sampled at ``depth``).
        depth
            ``(B, H, W)`` depth index of every ray at full resolution.
        encoder, decoder
            The 3D network's :class:`~mipseg.training.network.UNetFeatures` lists.
        """
        x = image
        skips = []
        for i, block in enumerate(self.encoder):
            x = torch.cat((block(x), gather_at_depth(encoder[i], self.level_depth(depth, i), self.axis)), 1)
            skips.append(x)
        last = len(self.encoder) - 1
        for j, (up, block) in enumerate(zip(self.upsample, self.decoder)):
            level = last - 1 - j
            x = block(torch.cat((up(x), skips[level]), 1))
            x = torch.cat((x, gather_at_depth(decoder[level], self.level_depth(depth, level), self.axis)), 1)
        return self.head(x)


class MipOutputs(list):
    """The 3D logits list (highest resolution first) plus ``branch_logits`` ``{axis: (B, K, h, w)}``."""

    def __init__(self, logits: list[torch.Tensor], branch_logits: dict[int, torch.Tensor]) -> None:
        super().__init__(logits)
        self.branch_logits = branch_logits


class MipTrainingNetwork(nn.Module):
    """The 3D U-Net (``network3d``) and one 2D branch per MIP axis, for training only.

    With deep supervision the forward returns :class:`MipOutputs`; without (export, validation)
    exactly what ``network3d`` returns, so prediction never needs a MIP.
    """

    def __init__(self, network3d: UNet3D, axes: Sequence[int], *, num_input_channels: int, num_classes: int):
        super().__init__()
        self.network3d = network3d
        self.branches = nn.ModuleDict(
            {
                str(int(a)): MipBranch2D(
                    network3d.topology, int(a), num_input_channels=num_input_channels, num_classes=num_classes
                )
                for a in axes
            }
        )

    @property
    def deep_supervision(self) -> bool:
        return self.network3d.deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, value: bool) -> None:
        self.network3d.deep_supervision = value

    def forward(self, x: torch.Tensor):
        """``x`` ``(B, C, z, y, x)`` -> :class:`MipOutputs` (deep supervision) or the 3D logits."""
        if not self.deep_supervision:
            return self.network3d(x)
        logits, features = self.network3d(x, return_features=True)
        branch_logits = {}
        for key, branch in self.branches.items():
            axis = int(key)
            depth = x[:, 0].argmax(dim=1 + axis)
            image = gather_at_depth(x, depth, axis)
            branch_logits[axis] = branch(image, depth, features.encoder, features.decoder)
        return MipOutputs(list(logits), branch_logits)

    def split_weights(self, weights: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """Full state dict -> (3D network's own state dict, branch weights), for checkpoints."""
        prefix = "network3d."
        own = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        branches = {k[len(BRANCH_KEY) :]: v for k, v in weights.items() if k.startswith(BRANCH_KEY)}
        return own, branches

    def join_weights(self, network_weights: dict, branch_weights: dict) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`split_weights`."""
        joined = {f"network3d.{k}": v for k, v in network_weights.items()}
        joined.update({f"{BRANCH_KEY}{k}": v for k, v in branch_weights.items()})
        return joined


def split_checkpoint(network: nn.Module, checkpoint: dict) -> dict:
    """A checkpoint of ``network``: for a :class:`MipTrainingNetwork` its 3D U-Net's weights become
    ``network_weights`` (loadable by ``build_network``) and the branches' ``mip_branch_weights``."""
    if not isinstance(network, MipTrainingNetwork):
        return checkpoint
    own, branches = network.split_weights(checkpoint["network_weights"])
    return {**checkpoint, "network_weights": own, "mip_branch_weights": branches}


def join_checkpoint(network: nn.Module, checkpoint: dict) -> dict:
    """Inverse of :func:`split_checkpoint`: ``network_weights`` as ``network.state_dict()`` keys."""
    if not isinstance(network, MipTrainingNetwork):
        return checkpoint
    weights = network.join_weights(checkpoint["network_weights"], checkpoint.get("mip_branch_weights", {}))
    return {**checkpoint, "network_weights": weights}


def build_mip_network(
    plans: Plans,
    *,
    num_input_channels: int,
    num_classes: int,
    deep_supervision: bool = True,
    dropout: float = 0.0,
    axes: Sequence[int] = (),
    branch: bool = True,
) -> UNet3D | MipTrainingNetwork:
    """The MIP trainer's network: the plans' 3D U-Net, wrapped with a branch per axis if ``branch``.

    Without branches the plain :func:`build_network` result is returned (only the losses differ).
    """
    network3d = build_network(
        plans,
        num_input_channels=num_input_channels,
        num_classes=num_classes,
        deep_supervision=deep_supervision,
        dropout=dropout,
    )
    if not branch or not axes:
        return network3d
    return MipTrainingNetwork(network3d, axes, num_input_channels=num_input_channels, num_classes=num_classes)
