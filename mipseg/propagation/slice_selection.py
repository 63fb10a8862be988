"""Which slice to annotate: the one from which the learned flows reconstruct the volume best.

Without labels, a slice is *representative* when the rest of the volume can be reached from it:
starting at candidate slice ``k``, the slices are reconstructed by sequential warping through the
chain of learned flows (as in training), forward to the last slice and backward to the first,
and the mean squared error against the true slices is the candidate's score. The candidate with
the lowest error wins (ties: the lower index), so the suggestion is deterministic. Only slices
holding at least half the body area of the fullest slice are candidates, which keeps the
suggestion away from near-empty end slices.
"""

from __future__ import annotations

import numpy as np
import torch

from mipseg.propagation.flow_net import FlowNet, to_working_grid
from mipseg.propagation.propagate import predict_flows
from mipseg.propagation.warping import warp_slice

BODY_THRESHOLD = 0.05
MIN_BODY_FRACTION = 0.5


def candidate_slices(volume: np.ndarray) -> np.ndarray:
    """Indices of slices whose body area (pixels above 0.05 of [0, 1]) is at least half the maximum."""
    area = (volume > BODY_THRESHOLD).sum(axis=(1, 2))
    if area.max() == 0:
        return np.arange(volume.shape[0])
    return np.flatnonzero(area >= MIN_BODY_FRACTION * area.max())


@torch.no_grad()
def chain_reconstruction_errors(
    slices: torch.Tensor, forward: torch.Tensor, backward: torch.Tensor, anchors: np.ndarray
) -> np.ndarray:
    """Mean squared error of reconstructing every slice from each anchor through the flow chain.

    Parameters
    ----------
    slices : torch.Tensor, shape (D, 1, h, w)
    forward, backward : torch.Tensor, shape (D, 2, h, w)
    anchors : np.ndarray of int, shape (A,)

    Returns
    -------
    np.ndarray, shape (A,), float64: error summed over all reached slices divided by ``D - 1``.
    """
    depth = slices.shape[0]
    anchor_index = torch.from_numpy(np.asarray(anchors, dtype=np.int64))
    total = torch.zeros(len(anchors), dtype=torch.float64)
    for direction, flows in ((1, forward), (-1, backward)):
        current = slices[anchor_index]
        for step in range(depth - 1):
            source = anchor_index + direction * step
            target = source + direction
            inside = (target >= 0) & (target < depth)
            if not bool(inside.any()):
                break
            current = warp_slice(current, flows[source.clamp(0, depth - 1)])
            error = (current - slices[target.clamp(0, depth - 1)]).pow(2).mean(dim=(1, 2, 3)).double()
            total += torch.where(inside, error, torch.zeros_like(error))
    return (total / max(depth - 1, 1)).numpy()


def suggest_slice(
    model: FlowNet, volume: np.ndarray, device: torch.device | str = "cpu"
) -> tuple[int, dict[int, float]]:
    """The slice of a normalised volume ``(D, H, W)`` to annotate, and every candidate's error.

    Returns
    -------
    index : int
        Slice index along axis 0.
    errors : dict
        Candidate slice -> chain reconstruction error (lower is better).
    """
    forward, backward = predict_flows(model, volume, device)
    slices = to_working_grid(volume, model.config.working_size)[0].permute(1, 0, 2, 3)
    candidates = candidate_slices(volume)
    errors = chain_reconstruction_errors(slices, forward, backward, candidates)
    best = int(candidates[int(np.argmin(errors))])  # argmin takes the first of equal minima
    return best, {int(k): float(e) for k, e in zip(candidates, errors)}


def slice_picture(volume: np.ndarray, index: int) -> np.ndarray:
    """Slice ``index`` of a normalised volume as a uint8 ``(rows, columns)`` picture for the annotator."""
    return np.round(np.clip(volume[index], 0.0, 1.0) * 255).astype(np.uint8)
