"""Propagating single-slice annotations through a volume, with a stop rule that needs no truth.

A *transport* moves masks from one slice to a neighbouring slice: the learned flows
(:func:`flow_transport`), slice-to-slice Demons registration or plain copying
(:mod:`mipseg.propagation.baselines`). Everything else is shared by all methods, so a benchmark
compares only how masks move:

1. Every class of the annotated slice is propagated on its own, forward and backward
   (Vol2Flow ``Mask_Propagation``): warp the previous mask, threshold at 0.5.
2. **Intensity verification** (Vol2Flow ``verification_module``, fixed to test the *target*
   slice): with ``mu_in`` = mean intensity inside the previous mask and ``mu_ring`` = mean in a
   5-pixel ring around it, keep warped pixels whose target intensity is closer to ``mu_in``;
   skipped when the two means do not differ (a neighbour as bright as the organ); then fill
   holes, close (2 px), fill holes, drop specks.
3. **Stop rule** (needs no ground truth): stop before slice ``t`` when the verified area falls
   below ``min_area_fraction`` of the annotated area, when verification rejected more than
   ``1 - min_kept_fraction`` of the warped mask (the organ ended under it), or when the mean
   intensity inside the mask leaves the annotated slice's range (``intensity_tolerance``
   standard deviations).
4. **Unsure voxels**: an in-plane band of ``ignore_band`` pixels around every propagated
   boundary and the last mask, dilated, on ``ignore_slices`` slices past each stop.

With several annotated slices, a slice between two annotations is labelled from both: each
class is propagated up from the lower and down from the upper annotated slice, and the two
verified masks are fused by closeness and by how much of each verification kept: their union
with the disagreement unsure away from both drawings, the heavier side near one
(``fusion="two_sided"``, the default; ``"nearer"`` takes the nearer annotated slice only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from mipseg.propagation.flow_net import FlowNet, split_flows, to_working_grid
from mipseg.propagation.warping import resize_flow, symmetric_flows, warp_slice

Transport = Callable[[np.ndarray, int, int], np.ndarray]
"""``transport(masks (K, H, W) float32 on slice src, src, dst) -> masks (K, H, W) on slice dst``."""

_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class StopRule:
    """Thresholds of the ground-truth-free stop rule (see module docstring)."""

    min_area_fraction: float = 0.05
    min_area_pixels: int = 4
    min_kept_fraction: float = 0.5
    intensity_tolerance: float = 3.0


@dataclass
class ClassExtent:
    """Where one class was propagated: slices ``first .. last`` and why each direction stopped."""

    label: int
    annotated_slice: int
    first: int
    last: int
    stop_forward: str = ""
    stop_backward: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class PropagationResult:
    """Propagated labels ``(D, H, W)`` int16, unsure voxels ``(D, H, W)`` bool and per-class extents."""

    labels: np.ndarray
    unsure: np.ndarray
    extents: list[ClassExtent] = field(default_factory=list)

    def with_ignore(self, ignore_label: int) -> np.ndarray:
        """Labels with ``ignore_label`` on unsure voxels (the label set written to disk)."""
        labelled = self.labels.copy()
        labelled[self.unsure] = ignore_label
        return labelled


@torch.no_grad()
def predict_flows(
    model: FlowNet, volume: np.ndarray, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward flows of a normalised volume ``(D, H, W)`` on the network's working grid.

    Returns
    -------
    forward, backward : torch.Tensor, shape (D, 2, h, w), CPU, pixels of the working grid
    """
    model.eval()
    grid = to_working_grid(volume, model.config.working_size).to(device)
    forward, backward = split_flows(model(grid))
    return forward.cpu(), backward.cpu()


def flow_transport(
    forward: torch.Tensor, backward: torch.Tensor, shape: tuple[int, int], *, symmetric: bool = True
) -> Transport:
    """Transport masks between neighbouring slices with learned flows ``(D, 2, h, w)``.

    Flows are resized to the raw in-plane ``shape`` one slice at a time, so a large volume never
    holds full-resolution flows for all slices. With ``symmetric``, a mask moves by the mean of
    two warps: by the flow of the step and by its inverse-consistent version
    (:func:`~mipseg.propagation.warping.symmetric_flows`), which also uses the opposite
    direction's flow of the same slice pair; the two errors are partly independent, so their
    mean drifts less over long chains (documentation/propagate.md).
    """
    pairs = [(forward, backward)]
    if symmetric and forward.shape[0] > 1:
        pairs.append(symmetric_flows(forward, backward))

    def transport(masks: np.ndarray, source: int, target: int) -> np.ndarray:
        if abs(target - source) != 1:
            raise ValueError("flow transport moves between neighbouring slices only")
        moving = torch.from_numpy(masks[None].astype(np.float32))
        moved = []
        for forward_flows, backward_flows in pairs:
            flows = forward_flows if target == source + 1 else backward_flows
            flow = resize_flow(flows[source : source + 1], shape)
            moved.append(warp_slice(moving, flow, padding_mode="zeros")[0].numpy())
        return np.mean(moved, axis=0) if len(moved) > 1 else moved[0]

    return transport


def verify_intensity(
    candidate: np.ndarray,
    previous: np.ndarray,
    previous_image: np.ndarray,
    target_image: np.ndarray,
    ring_width: int = 5,
) -> np.ndarray:
    """Keep candidate pixels whose target intensity looks like the inside of the previous mask.

    Parameters
    ----------
    candidate : bool (H, W)
        The warped mask thresholded at 0.5, on the target slice.
    previous : bool (H, W)
        The mask on the previous slice.
    previous_image, target_image : float (H, W)
        Normalised slices.

    Returns
    -------
    bool (H, W)
    """
    kept = candidate
    ring = ndimage.binary_dilation(previous, iterations=ring_width) & ~previous
    if previous.any() and ring.any():
        inside, outside = previous_image[previous], previous_image[ring]
        mean_in, mean_out = float(inside.mean()), float(outside.mean())
        # A neighbour as bright as the organ makes the test meaningless: skip it then.
        if abs(mean_in - mean_out) > 0.5 * float(inside.std()) + 1e-3:
            kept = candidate & (np.abs(target_image - mean_in) <= np.abs(target_image - mean_out))
    return clean_mask(kept)


def clean_mask(mask: np.ndarray, closing: int = 2, min_component_fraction: float = 0.1) -> np.ndarray:
    """Fill holes, close by ``closing`` px, fill holes, drop components under 10 % of the largest."""
    if not mask.any():
        return mask
    filled = ndimage.binary_fill_holes(mask)
    padded = np.pad(filled, closing)
    closed = ndimage.binary_closing(padded, iterations=closing)[closing:-closing, closing:-closing]
    filled = ndimage.binary_fill_holes(closed | filled)
    components, count = ndimage.label(filled)
    if count <= 1:
        return filled
    sizes = np.bincount(components.ravel())[1:]
    big = np.flatnonzero(sizes >= min_component_fraction * sizes.max()) + 1
    return np.isin(components, big)


def stop_reason(
    kept: np.ndarray,
    candidate: np.ndarray,
    target_image: np.ndarray,
    annotated_area: int,
    reference: tuple[float, float],
    rule: StopRule,
) -> str:
    """Why propagation must stop before this slice, or ``""`` to go on."""
    area = int(kept.sum())
    if area < max(rule.min_area_pixels, rule.min_area_fraction * annotated_area):
        return "area vanished"
    if area < rule.min_kept_fraction * int(candidate.sum()):
        return "intensity verification rejected the mask"
    mean, std = reference
    if abs(float(target_image[kept].mean()) - mean) > rule.intensity_tolerance * std:
        return "intensity left the annotated range"
    return ""


FUSIONS = ("two_sided", "nearer")

"""How slices between two annotated slices are labelled: fused from both, or from the nearer one."""


def propagate_slices(
    image: np.ndarray,
    annotations: dict[int, np.ndarray],
    transport: Transport,
    *,
    rule: StopRule = StopRule(),
    verify: bool = True,
    verify_between: bool = True,
    ignore_band: int = 0,
    ignore_slices: int = 1,
    band_growth: float = 0.0,
    fusion: str = "two_sided",
    disagreement_margin: float = 0.25,
) -> PropagationResult:
    """Propagate annotated slices through a volume.

    Parameters
    ----------
    image : float (D, H, W)
        The volume normalised to [0, 1] (as :func:`~mipseg.propagation.flow_net.normalize_volume`).
    annotations
        Slice index along axis 0 -> integer label slice ``(H, W)`` (0 = background). A class
        absent from an annotated slice is absent there (the annotator drew every class it saw), so
        an all-background slice ends every class's propagation before it.
    transport
        Moves masks between neighbouring slices (see :data:`Transport`).
    verify, verify_between
        ``verify`` applies the intensity verification; ``verify_between=False`` skips it on the
        runs between two annotated slices that both show the class (two-sided fusion only). There
        the class cannot end unseen, and each verified step only ever drops a rim of pixels, so
        both chains shrink (documentation/propagate.md, fourth round); outside the drawings and
        where the class ends between them it is kept, since the stop rule needs it.
    ignore_band, band_growth
        The unsure band around propagated boundaries on a slice ``d`` slices from the nearest
        annotated slice is ``ignore_band + floor(band_growth * d)`` pixels wide: a growth above 0
        trusts boundaries less the farther they were carried (the loss has no voxel weights, so
        this is how far slices are down-weighted).
    fusion
        ``"two_sided"``: a slice between two annotated slices ``a < b`` gets, per class, the
        verified masks propagated from both sides, each weighted by closeness (``(b - t) /
        (b - a)`` for ``a``) times the share of its warped mask that verification kept; where
        the lesser weight is at least ``disagreement_margin`` of the two, the union, with the
        disagreement unsure; elsewhere the heavier side. ``"nearer"``: each such slice is
        propagated from the nearer annotated slice only. Slices outside the outermost annotated
        slices are propagated from the outermost ones in both modes.

    Returns
    -------
    PropagationResult
    """
    if fusion not in FUSIONS:
        raise ValueError(f"fusion {fusion!r}: choose one of {', '.join(FUSIONS)}")
    depth = image.shape[0]
    labels = np.zeros(image.shape, dtype=np.int16)
    score = np.zeros(image.shape, dtype=np.float32)
    unsure = np.zeros(image.shape, dtype=bool)
    ordered = sorted(annotations)
    classes = sorted({int(v) for index in ordered for v in np.unique(annotations[index]) if v != 0})
    extents: list[ClassExtent] = []
    for label in classes:
        # per annotated slice: {step: (reached slices, stop reason, last mask)}
        runs: dict[int, dict[int, tuple[list, str, np.ndarray]]] = {}
        for index in ordered:
            mask = annotations[index] == label
            if not mask.any():
                continue
            _assign(labels, score, index, mask, np.ones(mask.shape, np.float32), label)
            reference = (float(image[index][mask].mean()), max(float(image[index][mask].std()), 0.02))
            runs[index] = {}
            for step in (1, -1):
                # two-sided: up to the next annotated slice; nearer: the slices nearer to this one
                bound = _zone_end(index, step, ordered, depth, fusion)
                closed = fusion == "two_sided" and _neighbour_shows(annotations, ordered, index, step, label)
                verified = verify and (verify_between or not closed)
                runs[index][step] = _propagate_direction(
                    image, mask, index, step, bound, transport, rule, verified, reference
                )
            extents.append(_extent(label, index, runs[index]))
        for position, index in enumerate(ordered):
            if fusion == "two_sided" and position + 1 < len(ordered):
                upper = ordered[position + 1]
                forward = runs[index][1][0] if index in runs else []
                backward = runs[upper][-1][0] if upper in runs else []
                _fuse_between(
                    labels, score, unsure, label, (index, upper), forward, backward, disagreement_margin
                )
            for step, (reached, reason, last_mask) in runs.get(index, {}).items():
                if fusion == "two_sided" and 0 <= position + step < len(ordered):
                    continue  # fused above
                for slice_index, kept, soft in reached:
                    _assign(labels, score, slice_index, kept, soft, label)
                end = reached[-1][0] if reached else index
                if reason != "end of zone":
                    zone_end = _zone_end(index, step, ordered, depth, fusion)
                    for k in range(1, ignore_slices + 1):
                        if min(index, zone_end) <= end + step * k <= max(index, zone_end):
                            unsure[end + step * k] |= ndimage.binary_dilation(
                                last_mask, iterations=max(ignore_band, 1)
                            )
    distance = np.abs(np.arange(depth)[:, None] - np.asarray(ordered or [0])[None, :]).min(axis=1)
    widths = ignore_band + np.floor(band_growth * distance).astype(int)
    for label in np.unique(labels[labels > 0]):
        for width in np.unique(widths[widths > 0]):
            mask = labels[widths == width] == label  # the band is in-plane, so slices can be taken apart
            band = ndimage.binary_dilation(mask, _IN_PLANE, width) & ~ndimage.binary_erosion(
                mask, _IN_PLANE, width
            )
            unsure[widths == width] |= band
    unsure[ordered] = False  # the annotator's slices are certain
    return PropagationResult(labels, unsure, extents)


def _zone_end(index: int, step: int, ordered: list[int], depth: int, fusion: str) -> int:
    """The last slice that annotated slice ``index`` labels in direction ``step`` (see propagate_slices)."""
    neighbour = ordered.index(index) + step
    if not 0 <= neighbour < len(ordered):
        return depth - 1 if step == 1 else 0
    other = ordered[neighbour]
    return other - step if fusion == "two_sided" else (index + other) // 2 + (step < 0)


def _neighbour_shows(
    annotations: dict[int, np.ndarray], ordered: list[int], index: int, step: int, label: int
) -> bool:
    """Whether the next annotated slice after ``index`` in direction ``step`` shows class ``label``."""
    neighbour = ordered.index(index) + step
    return 0 <= neighbour < len(ordered) and bool((annotations[ordered[neighbour]] == label).any())


def _extent(label: int, index: int, directions: dict[int, tuple[list, str, np.ndarray]]) -> ClassExtent:
    """Where one class was propagated from annotated slice ``index`` and why each direction stopped."""
    forward, backward = directions[1], directions[-1]
    return ClassExtent(
        label,
        index,
        first=backward[0][-1][0] if backward[0] else index,
        last=forward[0][-1][0] if forward[0] else index,
        stop_forward=forward[1],
        stop_backward=backward[1],
    )


def _fuse_between(
    labels: np.ndarray,
    score: np.ndarray,
    unsure: np.ndarray,
    label: int,
    pair: tuple[int, int],
    forward: list[tuple[int, np.ndarray, np.ndarray]],
    backward: list[tuple[int, np.ndarray, np.ndarray]],
    margin: float,
) -> None:
    """Label the slices strictly between annotated slices ``pair = (low, high)`` for one class.

    ``forward`` holds the masks propagated up from ``low``, ``backward`` those propagated down
    from ``high`` (``(slice, verified mask, warped soft mask)`` each); a side that stopped
    before a slice (or never had the class) votes empty there. Each side's share is its
    closeness times the fraction of its warped mask that verification kept (1 for an empty
    vote), normalised. Where both shares are at least ``margin``, the class is the union of the
    two masks and their disagreement is unsure: verification only ever removes pixels, so each
    chain shrinks, and the union measured better than either side (documentation/propagate.md);
    nearer a drawing, the side with the larger share decides alone.
    """
    low, high = pair
    empty = np.zeros(labels.shape[1:], dtype=bool)
    up = {index: (kept, soft) for index, kept, soft in forward}
    down = {index: (kept, soft) for index, kept, soft in backward}
    for target in range(low + 1, high):
        masks, weights = [], []
        for side, closeness in ((up, (high - target) / (high - low)), (down, (target - low) / (high - low))):
            kept, soft = side.get(target, (empty, None))
            warped = int((soft >= 0.5).sum()) if soft is not None else 0
            masks.append(kept)
            weights.append(closeness * (min(1.0, int(kept.sum()) / warped) if warped else 1.0))
        total = sum(weights)
        if total <= 0 or not (masks[0].any() or masks[1].any()):
            continue
        shares = [weight / total for weight in weights]
        vote = (shares[0] * masks[0] + shares[1] * masks[1]).astype(np.float32)
        if min(shares) >= margin:
            _assign(labels, score, target, masks[0] | masks[1], vote, label)
            unsure[target] |= masks[0] != masks[1]
        else:
            _assign(labels, score, target, masks[int(shares[1] > shares[0])], vote, label)


def _propagate_direction(
    image: np.ndarray,
    mask: np.ndarray,
    index: int,
    step: int,
    bound: int,
    transport: Transport,
    rule: StopRule,
    verify: bool,
    reference: tuple[float, float],
) -> tuple[list[tuple[int, np.ndarray, np.ndarray]], str, np.ndarray]:
    """Propagate one class from slice ``index`` in direction ``step`` up to slice ``bound``."""
    annotated_area = int(mask.sum())
    previous, current = mask, index
    reached = []
    while current != bound:
        target = current + step
        soft = transport(previous[None].astype(np.float32), current, target)[0]
        candidate = soft >= 0.5
        kept = (
            verify_intensity(candidate, previous, image[current], image[target])
            if verify
            else clean_mask(candidate)
        )
        reason = stop_reason(kept, candidate, image[target], annotated_area, reference, rule)
        if reason:
            return reached, reason, previous
        reached.append((target, kept, soft))
        previous, current = kept, target
    return reached, "end of zone" if 0 < bound < image.shape[0] - 1 else "end of volume", previous


def _assign(
    labels: np.ndarray, score: np.ndarray, index: int, mask: np.ndarray, soft: np.ndarray, label: int
) -> None:
    """Write ``label`` where ``mask`` holds and its warped value beats earlier classes'."""
    wins = mask & (soft >= score[index])
    labels[index][wins] = label
    score[index][wins] = soft[wins]
