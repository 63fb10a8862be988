"""Self-supervised objectives for the flow network: similarity, L2G, ISS, in-plane smoothness.

Flow2Mask's exact formulas were never published (seed-methods B.1). What is implemented here:

- **Local-to-Global (L2G)**: a local term reconstructs every slice from its direct neighbour
  (forward and backward) plus a chain term reconstructs slices from a few anchor slices by
  *sequential warping* through the chain of flows (Vol2Flow B.3), over a span that a
  curriculum grows from 1 (slice pairs) to the whole volume (:func:`curriculum_span`).
- **Inter-Slice Smoothness (ISS)**: mean squared difference between the flows of
  neighbouring slice pairs, ``||phi_i - phi_{i+1}||^2``, for forward and backward flows.
- **In-plane smoothness**: mean squared spatial gradient of every flow (VoxelMorph's ``Grad``).

Similarity is MSE or local normalised cross-correlation (window 9, VoxelMorph's formula;
Vol2Flow's own NCC did not run).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mipseg.propagation.warping import warp_slice

SIMILARITIES = ("mse", "ncc")


def box_mean(images: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over every ``window x window`` patch of ``(B, C, H, W)``: ``(B, C, H - w + 1, W - w + 1)``.

    Equal to ``F.avg_pool2d(images, window, stride=1)`` up to float rounding (about 1e-6 on [0, 1]
    images), but separable and by running sums, so its cost does not grow with the window: the
    per-volume flow optimisation of abdomen_ct_small (NCC window 9 then 17) went from 21.4 s to
    7.4 s on 2 CPU threads, where ``avg_pool2d`` and its backward had taken three quarters.
    """
    rows = torch.cumsum(F.pad(images, (1, 0)), dim=3)
    rows = rows[..., window:] - rows[..., :-window]
    columns = torch.cumsum(F.pad(rows, (0, 0, 1, 0)), dim=2)
    return (columns[:, :, window:] - columns[:, :, :-window]) / (window * window)


def local_ncc_loss(prediction: torch.Tensor, target: torch.Tensor, window: int = 9) -> torch.Tensor:
    """``1 - mean local NCC`` of two image batches ``(B, 1, H, W)`` over ``window x window`` patches."""
    pad = window // 2
    stacked = torch.cat(
        (prediction, target, prediction * prediction, target * target, prediction * target), dim=1
    )
    means = box_mean(F.pad(stacked, (pad,) * 4, mode="replicate"), window)
    mu_p, mu_t, mu_pp, mu_tt, mu_pt = means.unbind(dim=1)
    covariance = mu_pt - mu_p * mu_t
    variance_p = (mu_pp - mu_p * mu_p).clamp_min(0)
    variance_t = (mu_tt - mu_t * mu_t).clamp_min(0)
    ncc = covariance * covariance / (variance_p * variance_t + 1e-5)
    return 1.0 - ncc.mean()


def similarity_loss(
    prediction: torch.Tensor, target: torch.Tensor, kind: str, ncc_window: int = 9
) -> torch.Tensor:
    """Dissimilarity of ``(B, 1, H, W)`` batches: ``"mse"`` or ``"ncc"`` (lower is better)."""
    if kind == "mse":
        return F.mse_loss(prediction, target)
    if kind == "ncc":
        return local_ncc_loss(prediction, target, ncc_window)
    raise ValueError(f"unknown similarity {kind!r}; choose one of {SIMILARITIES}")


def in_plane_smoothness(flow: torch.Tensor) -> torch.Tensor:
    """Mean squared finite difference of flows ``(D, 2, H, W)`` along rows and columns."""
    d_rows = flow[:, :, 1:, :] - flow[:, :, :-1, :]
    d_cols = flow[:, :, :, 1:] - flow[:, :, :, :-1]
    return 0.5 * (d_rows.pow(2).mean() + d_cols.pow(2).mean())


def inter_slice_smoothness(forward: torch.Tensor, backward: torch.Tensor) -> torch.Tensor:
    """ISS: mean ``||phi_i - phi_{i+1}||^2`` over neighbouring slice pairs of ``(D, 2, H, W)`` flows.

    Only flows that are used enter: ``forward[0 .. D-2]`` and ``backward[1 .. D-1]``.
    """
    used_forward, used_backward = forward[:-1], backward[1:]
    if used_forward.shape[0] < 2:
        return forward.sum() * 0.0
    return 0.5 * (
        (used_forward[1:] - used_forward[:-1]).pow(2).mean()
        + (used_backward[1:] - used_backward[:-1]).pow(2).mean()
    )


def neighbour_reconstruction_loss(
    slices: torch.Tensor, forward: torch.Tensor, backward: torch.Tensor, kind: str, ncc_window: int = 9
) -> torch.Tensor:
    """Local term: every slice from its neighbour, ``(D, 1, H, W)`` slices, ``(D, 2, H, W)`` flows."""
    from_previous = warp_slice(slices[:-1], forward[:-1])
    from_next = warp_slice(slices[1:], backward[1:])
    return 0.5 * (
        similarity_loss(from_previous, slices[1:], kind, ncc_window)
        + similarity_loss(from_next, slices[:-1], kind, ncc_window)
    )


def chain_reconstruction(
    slices: torch.Tensor, forward: torch.Tensor, backward: torch.Tensor, anchors: torch.Tensor, span: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reconstruct slices from anchor slices by sequential warping through ``span`` steps each way.

    Parameters
    ----------
    slices : torch.Tensor, shape (D, 1, H, W)
    forward, backward : torch.Tensor, shape (D, 2, H, W)
    anchors : torch.Tensor, shape (A,), int64 slice indices
    span : int
        Number of warping steps in each direction.

    Returns
    -------
    predictions : torch.Tensor, shape (S, A, 1, H, W)
        Reconstructions after each step, forward steps then backward steps (``S = 2 * span``).
    targets : torch.Tensor, shape (S, A, 1, H, W)
        The true slices they should match.
    valid : torch.Tensor, shape (S, A), bool
        False where a chain ran past the first or last slice.
    """
    depth = slices.shape[0]
    predictions, targets, valid = [], [], []
    for direction, flows in ((1, forward), (-1, backward)):
        current = slices[anchors]
        for step in range(span):
            source = anchors + direction * step
            target_index = source + direction
            inside = (target_index >= 0) & (target_index < depth)
            current = warp_slice(current, flows[source.clamp(0, depth - 1)])
            predictions.append(current)
            targets.append(slices[target_index.clamp(0, depth - 1)])
            valid.append(inside)
    return torch.stack(predictions), torch.stack(targets), torch.stack(valid)


def chain_loss(
    slices: torch.Tensor,
    forward: torch.Tensor,
    backward: torch.Tensor,
    anchors: torch.Tensor,
    span: int,
    kind: str,
    ncc_window: int = 9,
) -> torch.Tensor:
    """Global term of L2G: mean dissimilarity of all valid chain reconstructions from ``anchors``."""
    predictions, targets, valid = chain_reconstruction(slices, forward, backward, anchors, span)
    keep = valid.flatten()
    if not bool(keep.any()):
        return slices.sum() * 0.0
    flat_predictions = predictions.flatten(0, 1)[keep]
    flat_targets = targets.flatten(0, 1)[keep]
    return similarity_loss(flat_predictions, flat_targets, kind, ncc_window)


def curriculum_span(iteration: int, total_iterations: int, depth: int, ramp_fraction: float = 0.6) -> int:
    """L2G curriculum: chain span 1 at the start, growing linearly to ``depth - 1`` (whole volume).

    The span reaches the whole volume after ``ramp_fraction`` of training and stays there.
    """
    if depth < 2:
        return 1
    progress = min(1.0, iteration / max(1.0, ramp_fraction * total_iterations))
    return max(1, min(depth - 1, 1 + round(progress * (depth - 2))))
