"""Per-volume instance optimisation of the learned flows (label-free test-time adaptation).

The network predicts flows on its coarse working grid (default 64 x 64) from what it learned on
the whole dataset. Before a volume is propagated, its flows are upsampled to a finer in-plane
grid (the raw grid, scaled down to at most ``max_size`` pixels per axis) and optimised directly
on that one volume with the same self-supervised objective as training, so no label is read
(coarse to fine: first on a half-size grid, which moves large displacements cheaply, then on
the refinement grid):

    L = local reconstruction (every slice from each neighbour)
        + w_iss * inter-slice smoothness + w_smooth * in-plane smoothness

This is Vol2Flow-style instance optimisation applied to the flow fields rather than the network
weights: it costs a few seconds per volume instead of a retraining, and it recovers the boundary
detail the coarse grid cannot represent. The network's flows are both the starting point and,
through ISS, a regulariser that ties neighbouring slice pairs together (which slice-pair
registration lacks).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from mipseg.propagation.losses import (
    SIMILARITIES,
    chain_loss,
    in_plane_smoothness,
    inter_slice_smoothness,
    neighbour_reconstruction_loss,
)
from mipseg.propagation.warping import resize_flow


@dataclass(frozen=True)
class InstanceOptimization:
    """Settings of :func:`optimize_flows`; ``iterations = 0`` turns the optimisation off.

    Attributes
    ----------
    iterations, learning_rate
        Adam steps on the flow fields and their step size (pixels of the refinement grid).
    coarse_iterations
        Adam steps first on a half-size grid with a half-size NCC window (0 = single grid);
        none when ``iterations = 0``.
    max_size
        Largest in-plane size of the refinement grid (memory: slices x 4 x size^2 floats, ~20x).
    similarity, ncc_window
        ``"ncc"`` (local NCC over ``ncc_window`` pixels) or ``"mse"``.
    iss_weight, smooth_weight
        Inter-slice and in-plane smoothness weights.
    chain_weight, chain_span, chain_anchors, seed
        Optional global (chain) L2G term from ``chain_anchors`` random anchors (drawn from
        ``seed``) over ``chain_span`` warps; off by default (it lowered Dice on CT).
    reference_spacing
        Slice spacing (mm) the smoothness weights are meant for; volumes with thinner slices get
        them scaled by ``(spacing / reference_spacing) ** 2`` (:func:`for_slice_spacing`);
        0 = never scale.
    Defaults were chosen on abdomen_ct_small (documentation/propagate.md).
    """

    iterations: int = 50
    coarse_iterations: int = 50
    max_size: int = 128
    learning_rate: float = 0.1
    similarity: str = "ncc"
    ncc_window: int = 17
    iss_weight: float = 0.1
    smooth_weight: float = 0.1
    chain_weight: float = 0.0
    chain_span: int = 8
    chain_anchors: int = 4
    seed: int = 0
    reference_spacing: float = 3.0

    def to_json(self) -> dict:
        return asdict(self)


def for_slice_spacing(settings: InstanceOptimization, slice_spacing: float) -> InstanceOptimization:
    """The settings for a volume whose slices are ``slice_spacing`` mm apart.

    The regularisation keeps every slice-to-slice displacement a little short of what the images
    ask for, and propagation compounds that bias once per slice: an organ that grows over 60 thin
    slices shrank to a tenth of its area with the 3-mm weights (documentation/propagate.md, thin
    slices). Below ``reference_spacing`` the ISS and in-plane smoothness weights are therefore
    scaled by ``(slice_spacing / reference_spacing) ** 2``; from ``reference_spacing`` up, and
    with ``reference_spacing = 0``, the settings are returned unchanged.
    """
    if settings.reference_spacing <= 0 or slice_spacing >= settings.reference_spacing:
        return settings
    factor = (slice_spacing / settings.reference_spacing) ** 2
    return replace(
        settings, iss_weight=settings.iss_weight * factor, smooth_weight=settings.smooth_weight * factor
    )


def neighbour_loss(
    slices: torch.Tensor, forward: torch.Tensor, backward: torch.Tensor, settings: InstanceOptimization
) -> torch.Tensor:
    """Every slice ``(D, 1, H, W)`` reconstructed from each neighbour by flows ``(D, 2, H, W)``."""
    return neighbour_reconstruction_loss(slices, forward, backward, settings.similarity, settings.ncc_window)


def chain_term(
    slices: torch.Tensor,
    forward: torch.Tensor,
    backward: torch.Tensor,
    anchors: torch.Tensor,
    settings: InstanceOptimization,
) -> torch.Tensor:
    """Global L2G term: slices reconstructed from ``anchors`` through up to ``chain_span`` warps."""
    span = min(settings.chain_span, slices.shape[0] - 1)
    return chain_loss(slices, forward, backward, anchors, span, settings.similarity, settings.ncc_window)


def refinement_size(shape: tuple[int, int], max_size: int) -> tuple[int, int]:
    """In-plane grid ``(rows, columns)`` of the optimisation: ``shape`` scaled down to fit ``max_size``."""
    scale = min(1.0, max_size / max(shape))
    return tuple(max(2, int(round(extent * scale))) for extent in shape)


def optimize_flows(
    volume: np.ndarray,
    forward: torch.Tensor,
    backward: torch.Tensor,
    settings: InstanceOptimization = InstanceOptimization(),
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimise one volume's flows on a finer in-plane grid, starting from the network's flows.

    Parameters
    ----------
    volume : np.ndarray, shape (D, H, W)
        The volume normalised to [0, 1].
    forward, backward : torch.Tensor, shape (D, 2, h, w)
        The network's flows on its working grid (pixels of that grid).

    Returns
    -------
    forward, backward : torch.Tensor, shape (D, 2, H', W'), CPU
        Optimised flows in pixels of the refinement grid ``refinement_size((H, W), max_size)``;
        :func:`~mipseg.propagation.propagate.flow_transport` resizes them to the raw grid.
    """
    if settings.similarity not in SIMILARITIES:
        raise ValueError(f"unknown similarity {settings.similarity!r}; choose one of {SIMILARITIES}")
    size = refinement_size(volume.shape[1:], settings.max_size)
    if settings.iterations <= 0 or volume.shape[0] < 2:
        return resize_flow(forward, size), resize_flow(backward, size)
    stages = [(size, settings.iterations, settings.ncc_window)]
    if settings.coarse_iterations > 0:
        coarse = tuple(max(2, extent // 2) for extent in size)
        # Half the window on half the grid covers the same field of view (kept odd, centred).
        stages.insert(0, (coarse, settings.coarse_iterations, max(3, settings.ncc_window // 2 | 1)))
    generator = torch.Generator().manual_seed(settings.seed)  # chain anchors: deterministic
    volume_tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[:, None].to(device)
    for grid, iterations, window in stages:
        forward, backward = resize_flow(forward, grid).to(device), resize_flow(backward, grid).to(device)
        if iterations > 0:
            slices = F.interpolate(volume_tensor, size=grid, mode="bilinear", align_corners=True)
            forward, backward = _optimize_on_grid(
                slices, forward, backward, iterations, replace(settings, ncc_window=window), generator
            )
    return forward.cpu().contiguous(), backward.cpu().contiguous()


def _optimize_on_grid(
    slices: torch.Tensor,
    forward: torch.Tensor,
    backward: torch.Tensor,
    iterations: int,
    settings: InstanceOptimization,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``iterations`` Adam steps on flows ``(D, 2, H, W)`` against slices ``(D, 1, H, W)`` of one grid."""
    # Optimised as one tensor (D, 4, H, W) so Adam treats both directions alike.
    flows = torch.cat((forward, backward), dim=1).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([flows], lr=settings.learning_rate)
    with torch.enable_grad():
        for _ in range(iterations):
            fwd, bwd = flows[:, 0:2], flows[:, 2:4]
            loss = (
                neighbour_loss(slices, fwd, bwd, settings)
                + settings.iss_weight * inter_slice_smoothness(fwd, bwd)
                + settings.smooth_weight
                * 0.5
                * (in_plane_smoothness(fwd[:-1]) + in_plane_smoothness(bwd[1:]))
            )
            if settings.chain_weight > 0:
                anchors = torch.randint(0, slices.shape[0], (settings.chain_anchors,), generator=generator)
                loss = loss + settings.chain_weight * chain_term(
                    slices, fwd, bwd, anchors.to(slices.device), settings
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    flows = flows.detach()
    return flows[:, 0:2], flows[:, 2:4]
