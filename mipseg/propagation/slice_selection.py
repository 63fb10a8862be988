"""Which slice to annotate: the one from which the learned flows reconstruct the volume best.

Without labels, a slice is *representative* when the rest of the volume can be reached from it:
starting at candidate slice ``k``, the slices are reconstructed by sequential warping through the
chain of learned flows (as in training), forward to the last slice and backward to the first,
and the squared error against the true slices, weighted by the chain length (the number of
warping steps from ``k``, because a mask drifts more the longer its chain), is the candidate's
score. The candidate with the lowest score wins (ties: the lower index), so the suggestion is
deterministic. Candidates are the slices holding at least half the body area of the fullest
slice and lying in the central 15 % of the body's extent along the axis: an annotation near an
end of the volume catches organs at their small edge cross-sections, from which propagation is
poor (measured: documentation/propagate.md).

Several slices per volume (:func:`suggest_spread_slices`) are chosen greedily among the
full-body slices of the central half of the body's extent so that every slice of the volume is
reached from its best anchor with the least chain-weighted error; the anchors spread out.

Once some slices are drawn, the organ's extent is known approximately (where the drawings
propagate to), and further slices are placed over that extent (:func:`spread_over_extent`):
the organ's slices should lie close to a drawing, and twice as close where they lie beyond the
outermost drawings, because a mask carried outward to the organ's tapering end is less accurate
than one fused from drawings on both sides.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mipseg.propagation.flow_net import FlowNet, to_working_grid
from mipseg.propagation.propagate import predict_flows
from mipseg.propagation.warping import warp_slice

# Weight of a slice beyond the outermost anchors in the coverage cost of spread_over_extent. With one
# drawing at the centre of the extent, 2 puts two more at 10 % and 90 % of it; on the synthetic organs
# of benchmarks/organ_models.py, drawings placed at (10, 50, 90) % of the true extent gave labels with
# Dice 0.946, (1/6, 1/2, 5/6) -- weight 1, the plain k-median -- 0.927, (25, 50, 75) % 0.927.
EXTRAPOLATION_WEIGHT = 2.0
BODY_THRESHOLD = 0.05
MIN_BODY_FRACTION = 0.5
CENTRAL_FRACTION = 0.15
SPREAD_FRACTION = 0.5


def candidate_slices(volume: np.ndarray) -> np.ndarray:
    """Slices with at least half the maximum body area (pixels above 0.05 of [0, 1]), central band only.

    The central band is the middle ``CENTRAL_FRACTION`` of the range from the first to the last
    slice with any body; when no slice qualifies, every slice of the range is a candidate.
    """
    area = (volume > BODY_THRESHOLD).sum(axis=(1, 2))
    if area.max() == 0:
        return np.arange(volume.shape[0])
    body = np.flatnonzero(area > 0)
    centre, half = 0.5 * (body[0] + body[-1]), 0.5 * CENTRAL_FRACTION * (body[-1] - body[0])
    indices = np.arange(volume.shape[0])
    central = np.abs(indices - centre) <= max(half, 0.5)
    full = area >= MIN_BODY_FRACTION * area.max()
    chosen = np.flatnonzero(central & full)
    return chosen if chosen.size else np.flatnonzero(central)


@torch.no_grad()
def chain_error_matrix(
    slices: torch.Tensor, forward: torch.Tensor, backward: torch.Tensor, anchors: np.ndarray
) -> np.ndarray:
    """Error of reconstructing each slice from each anchor through the flow chain, per target slice.

    Parameters
    ----------
    slices : torch.Tensor, shape (D, 1, h, w)
    forward, backward : torch.Tensor, shape (D, 2, h, w)
    anchors : np.ndarray of int, shape (A,)

    Returns
    -------
    np.ndarray, shape (A, D), float64: the mean squared error of the slice reached from the
    anchor, times the chain length (steps from the anchor); 0 on the anchor itself.
    """
    depth = slices.shape[0]
    anchor_index = torch.from_numpy(np.asarray(anchors, dtype=np.int64))
    matrix = torch.zeros(len(anchors), depth, dtype=torch.float64)
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
            rows = torch.nonzero(inside).flatten()
            matrix[rows, target[rows]] = (step + 1) * error[rows]
    return matrix.numpy()


def chain_reconstruction_errors(
    slices: torch.Tensor, forward: torch.Tensor, backward: torch.Tensor, anchors: np.ndarray
) -> np.ndarray:
    """Each anchor's summed :func:`chain_error_matrix` row divided by ``D - 1``, shape (A,)."""
    depth = slices.shape[0]
    return chain_error_matrix(slices, forward, backward, anchors).sum(axis=1) / max(depth - 1, 1)


def spread_slices(errors: np.ndarray, count: int) -> list[int]:
    """Greedily pick ``count`` rows of ``errors`` (A, D) so that every slice is reached cheaply.

    The cost of a set of anchors is the sum over slices of the smallest error from any chosen
    anchor; each step adds the anchor that lowers it most (ties: the lower row), so the choice
    is deterministic. Because errors grow with the chain length, the chosen anchors spread out
    over the volume. Returns row indices in the order chosen.
    """
    chosen: list[int] = []
    best = np.full(errors.shape[1], np.inf)
    for _ in range(min(count, errors.shape[0])):
        costs = np.minimum(best[None], errors).sum(axis=1)
        costs[chosen] = np.inf
        row = int(np.argmin(costs))
        chosen.append(row)
        best = np.minimum(best, errors[row])
    return chosen


def suggest_slice(
    model: FlowNet, volume: np.ndarray, device: torch.device | str = "cpu"
) -> tuple[int, dict[int, float]]:
    """The slice of a normalised volume ``(D, H, W)`` to annotate, and every candidate's error.

    Returns
    -------
    index : int
        Slice index along axis 0.
    errors : dict
        Candidate slice -> chain-length-weighted reconstruction error (lower is better).
    """
    forward, backward = predict_flows(model, volume, device)
    slices = to_working_grid(volume, model.config.working_size)[0].permute(1, 0, 2, 3)
    candidates = candidate_slices(volume)
    errors = chain_reconstruction_errors(slices, forward, backward, candidates)
    best = int(candidates[int(np.argmin(errors))])  # argmin takes the first of equal minima
    return best, {int(k): float(e) for k, e in zip(candidates, errors)}


def suggest_spread_slices(
    model: FlowNet, volume: np.ndarray, count: int, device: torch.device | str = "cpu"
) -> tuple[list[int], dict[int, float]]:
    """``count`` slices of a normalised volume ``(D, H, W)`` that together reach the whole volume best.

    ``count == 1`` is :func:`suggest_slice`. Otherwise the candidates are the slices with at
    least half the fullest slice's body area in the central ``SPREAD_FRACTION`` of the body's
    extent (the organs are unknown before drawing; slices near the ends of the body missed the
    organ on synthetic volumes, measured in documentation/organ_models.md), chosen by
    :func:`spread_slices` on the chain-length-weighted reconstruction errors of every slice.
    No labels are used.

    Returns
    -------
    slices : list of int
        Slice indices along axis 0, sorted.
    errors : dict
        Candidate slice -> its summed reconstruction error alone (lower is better).
    """
    if count == 1:
        index, errors = suggest_slice(model, volume, device)
        return [index], errors
    forward, backward = predict_flows(model, volume, device)
    slices = to_working_grid(volume, model.config.working_size)[0].permute(1, 0, 2, 3)
    candidates = full_body_slices(volume)
    matrix = chain_error_matrix(slices, forward, backward, candidates)
    chosen = sorted(int(candidates[row]) for row in spread_slices(matrix, count))
    totals = matrix.sum(axis=1) / max(volume.shape[0] - 1, 1)
    return chosen, {int(k): float(e) for k, e in zip(candidates, totals)}


def full_body_slices(volume: np.ndarray, fraction: float = SPREAD_FRACTION) -> np.ndarray:
    """Slices with at least half the maximum body area in the central ``fraction`` of the body's extent."""
    area = (volume > BODY_THRESHOLD).sum(axis=(1, 2))
    if area.max() == 0:
        return np.arange(volume.shape[0])
    body = np.flatnonzero(area > 0)
    centre, half = 0.5 * (body[0] + body[-1]), 0.5 * fraction * (body[-1] - body[0])
    central = np.abs(np.arange(volume.shape[0]) - centre) <= max(half, 0.5)
    chosen = np.flatnonzero(central & (area >= MIN_BODY_FRACTION * area.max()))
    return chosen if chosen.size else np.flatnonzero(central)


def extent_coverage_cost(
    anchors: Sequence[int],
    extents: Sequence[tuple[int, int]],
    extrapolation_weight: float = EXTRAPOLATION_WEIGHT,
) -> float:
    """Sum over the extents and their slices ``first .. last`` of the distance to the nearest anchor.

    Distances of slices beyond the outermost anchors count ``extrapolation_weight`` times. Several
    extents (one per organ) each add their own sum, so a small organ's ends count as much as a
    large one's.
    """
    ordered = np.sort(np.asarray(anchors, dtype=np.int64))
    if ordered.size == 0:
        raise ValueError("need at least one anchor slice")
    total = 0.0
    for first, last in extents:
        slices = np.arange(min(first, last), max(first, last) + 1)
        distance = np.abs(slices[:, None] - ordered[None, :]).min(axis=1).astype(np.float64)
        distance[(slices < ordered[0]) | (slices > ordered[-1])] *= extrapolation_weight
        total += float(distance.sum())
    return total


def spread_over_extent(
    drawn: Sequence[int],
    extents: Sequence[tuple[int, int]],
    count: int,
    extrapolation_weight: float = EXTRAPOLATION_WEIGHT,
) -> list[int]:
    """``count`` new slices that, with ``drawn``, cover the ``extents`` at the least cost.

    Cost = :func:`extent_coverage_cost`. The slices are added greedily from the slices of the
    extents' union range, then each is moved to its best position with the others held (until
    nothing improves). Ties go to the slice nearer the centre of that range (an estimated extent may
    reach a slice or two past the organ, and the end slices show it smallest), then to the lower
    slice, so the result is deterministic. Fewer than ``count`` come back when the range has no
    more free slices.

    Parameters
    ----------
    drawn : sequence of int
        Slices already drawn (may lie outside the extents; may be empty).
    extents : sequence of (first, last)
        Slice ranges the organs are believed to occupy along axis 0, one per organ; not empty.
    count : int
        New slices wanted.

    Returns
    -------
    list of int, sorted, disjoint from ``drawn``.
    """
    if not extents:
        raise ValueError("need at least one extent")
    first = int(min(min(extent) for extent in extents))
    last = int(max(max(extent) for extent in extents))
    fixed = [int(index) for index in drawn]
    free = [index for index in range(first, last + 1) if index not in fixed]
    chosen: list[int] = []

    def rank(candidate: int, others: list[int]) -> tuple[float, float, int]:
        cost = extent_coverage_cost([*fixed, *others, candidate], extents, extrapolation_weight)
        return cost, abs(candidate - 0.5 * (first + last)), candidate

    for _ in range(min(count, len(free))):
        options = [index for index in free if index not in chosen]
        chosen.append(min(options, key=lambda index: rank(index, chosen)))
    for _ in range(10):  # coordinate descent; converges in a few passes on any extent tried
        moved = False
        for position in range(len(chosen)):
            others = chosen[:position] + chosen[position + 1 :]
            options = [index for index in free if index not in others]
            best = min(options, key=lambda index: rank(index, others))
            if rank(best, others)[0] < rank(chosen[position], others)[0]:
                chosen[position], moved = best, True
        if not moved:
            break
    return sorted(chosen)


def slice_picture(volume: np.ndarray, index: int) -> np.ndarray:
    """Slice ``index`` of a normalised volume as a uint8 ``(rows, columns)`` picture for the annotator."""
    return np.round(np.clip(volume[index], 0.0, 1.0) * 255).astype(np.uint8)


CT_SOFT_TISSUE_WINDOW = (40.0, 400.0)  # level, width in HU: the radiologists' abdomen window


def ct_slice_picture(hounsfield: np.ndarray) -> np.ndarray:
    """A CT slice in the soft-tissue window (HU -160..240) as uint8: the liver stands out from fat and muscle.

    The percentile scaling of :func:`slice_picture` spans air to bone on CT and leaves organs a flat grey.
    """
    level, width = CT_SOFT_TISSUE_WINDOW
    scaled = (np.asarray(hounsfield, dtype=np.float64) - (level - width / 2)) / width
    return np.round(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)
