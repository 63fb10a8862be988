"""The inter-slice flow network (Vol2Flow's VoxelMorph-style 3D U-Net, made small for CPU).

The network sees a whole volume (or a window of consecutive slices) as one 3D input and emits,
for every slice ``i``, a forward 2D flow that reconstructs slice ``i+1`` from slice ``i`` and a
backward flow that reconstructs slice ``i-1`` from slice ``i`` (Vol2Flow, seed-methods B.2).
Flows follow :mod:`mipseg.propagation.warping`'s convention and live on the *target* slice's
grid: ``x[i+1] ~ warp_slice(x[i], forward[i])``, ``x[i-1] ~ warp_slice(x[i], backward[i])``.
``forward[D-1]`` and ``backward[0]`` are unused.

Differences from Vol2Flow, each for a stated reason:
- pooling is in-plane only (kernel (1, 2, 2)), so any number of slices works (Vol2Flow needs a
  multiple of 16 and zero-pads to 400 slices);
- the input is the volume resized in-plane to a fixed working grid (default 64 x 64) and the
  flows are resized back to the raw grid with :func:`~mipseg.propagation.warping.resize_flow`;
- the last layer is linear and initialised near zero (Vol2Flow ends in LeakyReLU, which bends
  negative displacements), so training starts from the identity.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CLIP_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class FlowNetConfig:
    """Architecture of :class:`FlowNet`; stored in checkpoints.

    Attributes
    ----------
    features
        Channels per resolution level, highest resolution first; one in-plane pooling between
        levels, so ``working_size`` must be divisible by ``2 ** (len(features) - 1)``.
    working_size
        In-plane ``(rows, columns)`` every slice is resized to before entering the network.
    """

    features: tuple[int, ...] = (8, 16, 16, 32)
    working_size: tuple[int, int] = (64, 64)

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> FlowNetConfig:
        return cls(features=tuple(data["features"]), working_size=tuple(data["working_size"]))


class ConvBlock(nn.Sequential):
    """Conv3d 3x3x3 + LeakyReLU(0.2), as Vol2Flow's ``ConvBlock``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.Conv3d(in_channels, out_channels, 3, padding=1), nn.LeakyReLU(0.2))


class FlowNet(nn.Module):
    """3D encoder-decoder predicting per-slice forward and backward 2D flows.

    Forward input ``(B, 1, D, h, w)`` (``h, w`` = ``config.working_size``); output
    ``(B, 4, D, h, w)``: channels 0:2 forward flow ``(dy, dx)``, 2:4 backward flow, in pixels of
    the working grid.
    """

    def __init__(self, config: FlowNetConfig = FlowNetConfig()):
        super().__init__()
        self.config = config
        levels = config.features
        factor = 2 ** (len(levels) - 1)
        if any(s % factor for s in config.working_size):
            raise ValueError(f"working_size {config.working_size} must be divisible by {factor}")
        self.encoders = nn.ModuleList(
            ConvBlock(1 if i == 0 else levels[i - 1], levels[i]) for i in range(len(levels))
        )
        self.decoders = nn.ModuleList(
            ConvBlock(levels[i + 1] + levels[i], levels[i]) for i in reversed(range(len(levels) - 1))
        )
        self.refine = ConvBlock(levels[0], levels[0])
        self.head = nn.Conv3d(levels[0], 4, 3, padding=1)
        nn.init.normal_(self.head.weight, std=1e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        skips = []
        x = volume
        for level, encoder in enumerate(self.encoders):
            if level:
                x = F.max_pool3d(x, kernel_size=(1, 2, 2))
            x = encoder(x)
            skips.append(x)
        for decoder, skip in zip(self.decoders, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
            x = decoder(torch.cat((x, skip), dim=1))
        return self.head(self.refine(x))


def normalize_volume(volume: np.ndarray, percentiles: tuple[float, float] = CLIP_PERCENTILES) -> np.ndarray:
    """Clip a volume to its own intensity percentiles and scale to [0, 1].

    Parameters
    ----------
    volume : np.ndarray, shape (z, y, x)

    Returns
    -------
    np.ndarray, shape (z, y, x), float32 in [0, 1] (all zeros for a constant volume).
    """
    low, high = np.percentile(volume, percentiles)
    if high <= low:
        return np.zeros(volume.shape, dtype=np.float32)
    return ((np.clip(volume, low, high) - low) / (high - low)).astype(np.float32)


def to_working_grid(volume: np.ndarray, working_size: tuple[int, int]) -> torch.Tensor:
    """Resize every slice of a normalised ``(z, y, x)`` volume to the network's in-plane grid.

    Returns
    -------
    torch.Tensor, shape (1, 1, z, h, w), float32.
    """
    slices = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[:, None]
    resized = F.interpolate(slices, size=tuple(working_size), mode="bilinear", align_corners=True)
    return resized[:, 0][None, None]


def split_flows(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Network output ``(1, 4, D, h, w)`` -> forward, backward flows, each ``(D, 2, h, w)``."""
    flows = output[0].permute(1, 0, 2, 3)
    return flows[:, 0:2], flows[:, 2:4]
