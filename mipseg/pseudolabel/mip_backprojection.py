"""Back-projection of 2D MIP annotations into 3D pseudo-label sets (pure array functions).

Implements the published rule of Guo et al. (IEEE TMI 2024, code ``mip_generate_pseudo_label.py``;
see ``reference/seed-methods.md`` A.2) without its Python distance loops:

* ``S_p`` (seeds): for each annotated MIP pixel, the brightest voxel on its ray (the depth map).
* ``S_1`` (foreground): voxels brighter than ``fg_factor`` x mean seed intensity, in 26-connected
  components holding a seed and at least ``min_size`` voxels; plus the seeds.
* ``S_0`` (background): voxels on rays whose MIP pixel is not annotated, except bright ones
  (> ``bright_factor`` x mean seed intensity: maybe occluded vessels), plus every voxel darker than
  ``dark_factor`` x mean seed intensity on any ray.

Two additions chosen by measurement (``documentation/pseudolabel.md``): ``S_1`` voxels that the
annotation contradicts (in ``S_0`` or on an unannotated ray) become "ignore" by default instead of
vessel, and ``seed_floor`` can drop seeds that over-wide strokes put on dark tissue (off by default).

``pseudo_label_volume(rule="calibrated")``, the default, replaces the S_1 / S_0 thresholds by ones
measured on the image (:mod:`mipseg.pseudolabel.calibrated`); ``rule="published"`` is the rule above.

Every array is numpy ``(z, y, x)``; a MIP along numpy axis ``a`` is the volume with axis ``a``
removed (rows = first remaining axis), exactly as :func:`mipseg.planning.mip.maximum_intensity_projection`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import ndimage

from mipseg.labelset import agreement
from mipseg.planning.mip import ray_coordinates
from mipseg.pseudolabel import calibrated

# Published constants (seed-methods.md A.2): range clipping, S_1 threshold, component size, S_0 ratios.
CLIP_FRACTION = 0.025
FG_FACTOR = 1.0
MIN_SIZE = 10
BRIGHT_FACTOR = 1.2
DARK_FACTOR = 0.2
OVERLAP_RULES = ("vessel", "background", "ignore")
# Measured on synthetic vessels and the aorta MRA (documentation/pseudolabel.md): "ignore" keeps S_1's
# precision highest at the lowest S_0 error; it is also how the published refinement treats the overlap.
DEFAULT_OVERLAP = "ignore"
SEED_FLOOR = 0.0
# "published": the thresholds above; "calibrated" (default, :mod:`.calibrated`): thresholds between the
# measured background level and the seed level, S_1 inside the visual hull of the drawing.
RULES = ("calibrated", "published")
DEFAULT_RULE = "calibrated"


def intensity_scale(volume: np.ndarray, clip_fraction: float = CLIP_FRACTION) -> tuple[float, float]:
    """``(low, high)``: the intensity range moved inward by ``clip_fraction`` of its width at each end.

    Parameters
    ----------
    volume : np.ndarray, shape (z, y, x)
    clip_fraction : float
        Fraction of ``max - min`` cut at both ends (0.025 in the published code).
    """
    lowest, highest = float(volume.min()), float(volume.max())
    width = highest - lowest
    return lowest + clip_fraction * width, highest - clip_fraction * width


def normalize_intensity(
    volume: np.ndarray, low: float, high: float, *, clip: bool = True, out: np.ndarray | None = None
) -> np.ndarray:
    """``(volume - low) / (high - low)`` as float32, clipped to ``[0, 1]`` when ``clip``.

    A constant volume (``high <= low``) maps to zeros.
    """
    result = np.subtract(volume, np.float32(low), dtype=np.float32, out=out)
    if high <= low:
        result[...] = 0.0
        return result
    result *= np.float32(1.0 / (high - low))
    if clip:
        np.clip(result, 0.0, 1.0, out=result)
    return result


def seeds_from_annotation(
    annotation: np.ndarray, depth: np.ndarray, axis: int, shape: tuple[int, ...]
) -> np.ndarray:
    """``S_p`` of one projection: the voxel each annotated MIP pixel's depth map points at.

    Parameters
    ----------
    annotation : np.ndarray of bool, shape = ``shape`` without ``axis``
        Annotated MIP pixels.
    depth : np.ndarray of int, same shape as ``annotation``
        Index along ``axis`` of the brightest voxel of every ray.
    axis : int
        Numpy axis of the projection (0 = z).
    shape : tuple of 3 ints
        ``(z, y, x)`` shape of the volume.

    Returns
    -------
    np.ndarray of bool, shape ``shape``
    """
    seeds = np.zeros(shape, dtype=bool)
    coordinates = ray_coordinates(depth, axis)
    seeds[tuple(c[annotation] for c in coordinates)] = True
    return seeds


def drop_faint_seeds(intensity: np.ndarray, seeds: np.ndarray, seed_floor: float) -> np.ndarray:
    """Seeds at least ``seed_floor`` x the median seed intensity (the rest are strokes that overshoot).

    Parameters
    ----------
    intensity : np.ndarray of float, shape (z, y, x)
        Normalized intensity (zero = dark end of the range).
    seeds : np.ndarray of bool, shape (z, y, x)
    seed_floor : float
        Fraction of the median seed intensity below which a seed is dropped; 0 keeps every seed.

    Returns
    -------
    np.ndarray of bool, shape (z, y, x)
        A subset of ``seeds``; never empty when ``seeds`` is not (the median seed survives).
    """
    values = intensity[seeds]
    kept = values >= seed_floor * float(np.median(values))
    result = np.zeros_like(seeds)
    result[tuple(c[kept] for c in np.nonzero(seeds))] = True
    return result


def foreground_from_seeds(
    normalized: np.ndarray,
    seeds: np.ndarray,
    *,
    fg_factor: float = FG_FACTOR,
    min_size: int = MIN_SIZE,
    clip: bool = False,
) -> np.ndarray:
    """``S_1``: bright 26-connected components that contain a seed and are large enough, plus the seeds.

    Parameters
    ----------
    normalized : np.ndarray of float, shape (z, y, x)
        Normalized intensity (:func:`normalize_intensity`).
    seeds : np.ndarray of bool, shape (z, y, x)
        ``S_p``; must not be empty.
    fg_factor : float
        Threshold = ``fg_factor`` x mean intensity of the seeds.
    min_size : int
        Components with fewer voxels are dropped (before adding the seeds back).
    clip : bool
        Work on ``normalized`` clipped to ``[0, 1]`` (the published scale) without a clipping pass
        over the volume: only the seed mean needs clipped values, and for a threshold in ``[0, 1)``
        "clipped value > threshold" equals "value > threshold".

    Returns
    -------
    np.ndarray of bool, shape (z, y, x)
    """
    seed_values = normalized[seeds]
    if clip:
        seed_values = np.clip(seed_values, 0.0, 1.0)
    threshold = fg_factor * float(seed_values.mean())
    if clip and threshold >= 1.0:
        bright = np.zeros(normalized.shape, dtype=bool)  # nothing on the clipped scale exceeds 1
    else:
        bright = normalized > threshold
    # One labelling pass, then bincounts over the bright voxels only (a small fraction of the volume),
    # replace the published per-component cdist loop.
    components, count = ndimage.label(bright, structure=np.ones((3, 3, 3), dtype=bool))
    bright_index = np.flatnonzero(bright)
    bright_labels = components.reshape(-1)[bright_index]
    del components
    sizes = np.bincount(bright_labels, minlength=count + 1)
    seeded = np.zeros(count + 1, dtype=bool)
    seeded[bright_labels[seeds.reshape(-1)[bright_index]]] = True
    keep = seeded & (sizes >= min_size)
    keep[0] = False
    foreground = seeds.copy()
    foreground.reshape(-1)[bright_index[keep[bright_labels]]] = True
    return foreground


def unannotated_rays(annotations: Mapping[int, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """Voxels on a ray whose MIP pixel is not annotated, in any of the projections.

    Parameters
    ----------
    annotations : mapping axis -> np.ndarray of bool (MIP grid of that axis)
    shape : tuple of 3 ints, the ``(z, y, x)`` volume shape

    Returns
    -------
    np.ndarray of bool, shape ``shape``
    """
    rays = np.zeros(shape, dtype=bool)
    for axis, annotation in annotations.items():
        rays |= np.expand_dims(~annotation, axis)
    return rays


def background_from_rays(
    intensity: np.ndarray,
    unannotated: np.ndarray,
    seed_intensity: float,
    *,
    bright_factor: float = BRIGHT_FACTOR,
    dark_factor: float = DARK_FACTOR,
) -> np.ndarray:
    """``S_0``: voxels on unannotated rays that are not bright, plus every dark voxel.

    Parameters
    ----------
    intensity : np.ndarray, shape (z, y, x)
        Intensity on a scale where ratios mean something (zero = dark end of the range).
    unannotated : np.ndarray of bool, shape (z, y, x)
        Voxels on a ray whose MIP pixel is not annotated in ANY of the projections
        (:func:`unannotated_rays`).
    seed_intensity : float
        Mean intensity of the seeds on the same scale as ``intensity``.
    bright_factor, dark_factor : float
        Voxels above ``bright_factor * seed_intensity`` are never background from a ray (they may be
        vessels hidden behind something brighter); voxels below ``dark_factor * seed_intensity``
        are always background.

    Returns
    -------
    np.ndarray of bool, shape (z, y, x)
    """
    background = intensity <= bright_factor * seed_intensity
    background &= unannotated
    background |= intensity < dark_factor * seed_intensity
    return background


def combine_label_map(
    seeds: np.ndarray,
    foreground: np.ndarray,
    background: np.ndarray,
    *,
    ignore_value: int,
    overlap: str = DEFAULT_OVERLAP,
    contradicted: np.ndarray | None = None,
    vessel_value: int = 1,
) -> np.ndarray:
    """One uint8 label map from the sets: background 0, vessel ``vessel_value``, unknown ``ignore_value``.

    Parameters
    ----------
    seeds, foreground, background : np.ndarray of bool, shape (z, y, x)
        ``S_p``, ``S_1``, ``S_0``. Seeds are always vessel.
    ignore_value : int
        Value of voxels in neither set.
    overlap : str
        What an ``S_1`` voxel the annotation contradicts becomes: ``"vessel"`` (as published: S_1 wins),
        ``"background"`` or ``"ignore"`` (default, chosen by measurement).
    contradicted : np.ndarray of bool, shape (z, y, x), optional
        The contradicted ``S_1`` voxels; default ``foreground & background``.
        :func:`pseudo_label_volume` adds the ``S_1`` voxels on any unannotated ray.

    Returns
    -------
    np.ndarray of uint8, shape (z, y, x)
    """
    if overlap not in OVERLAP_RULES:
        raise ValueError(f"overlap must be one of {OVERLAP_RULES}, got {overlap!r}")
    if contradicted is None:
        contradicted = foreground & background
    labels = np.full(seeds.shape, ignore_value, dtype=np.uint8)
    labels[background] = 0
    labels[foreground] = vessel_value
    if overlap != "vessel":
        labels[contradicted] = 0 if overlap == "background" else ignore_value
    labels[seeds] = vessel_value
    return labels


def pseudo_label_volume(
    volume: np.ndarray,
    annotations: Mapping[int, np.ndarray],
    depths: Mapping[int, np.ndarray],
    *,
    ignore_value: int,
    fg_factor: float = FG_FACTOR,
    min_size: int = MIN_SIZE,
    bright_factor: float = BRIGHT_FACTOR,
    dark_factor: float = DARK_FACTOR,
    clip_fraction: float = CLIP_FRACTION,
    overlap: str = DEFAULT_OVERLAP,
    seed_floor: float = SEED_FLOOR,
    rule: str = DEFAULT_RULE,
    grow_factor: float = calibrated.GROW_FACTOR,
    background_factor: float = calibrated.BACKGROUND_FACTOR,
    reference: str = calibrated.REFERENCE,
    edge_sigmas: float = calibrated.EDGE_SIGMAS,
    edge_radius: float = calibrated.EDGE_RADIUS,
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """The whole rule for one volume: seeds, ``S_1``, ``S_0`` and the combined label map.

    Intensity scale: ``n = (volume - low) / (high - low)`` with ``low``/``high`` the range moved
    inward by ``clip_fraction``. ``S_1`` uses ``n`` clipped to ``[0, 1]`` (as published); ``S_0``
    uses ``n`` unclipped, so that the ``bright_factor`` test still works when the seeds are near
    the top of the range (clipping would cap every voxel at 1 < 1.2 x seed mean), and ratios are
    measured from the dark end of the range instead of from raw zero (raw CT values are negative).

    Parameters
    ----------
    volume : np.ndarray, shape (z, y, x)
        Raw intensities of one channel.
    annotations : mapping axis -> np.ndarray of bool
        Annotated pixels of each MIP (MIP grid of that axis); at least one pixel in total.
    depths : mapping axis -> np.ndarray of int
        Depth (argmax) map of each MIP, same keys and shapes as ``annotations``.
    ignore_value : int
        Label value of unknown voxels.
    fg_factor, min_size, bright_factor, dark_factor, clip_fraction
        The published thresholds (module constants are their defaults).
    overlap : str
        What S_1 voxels the annotation contradicts become (:func:`combine_label_map`).
    seed_floor : float
        Drop seeds darker than this x the median seed intensity (:func:`drop_faint_seeds`); 0 keeps all.
    rule : str
        ``"calibrated"`` (default; uses ``grow_factor``, ``background_factor``, ``reference``,
        ``edge_sigmas``, ``edge_radius`` and ``min_size``, see
        :func:`mipseg.pseudolabel.calibrated.calibrated_sets`) or ``"published"`` (uses ``fg_factor``,
        ``min_size``, ``bright_factor``, ``dark_factor``).

    Returns
    -------
    labels : np.ndarray of uint8, shape (z, y, x)
        0 background, 1 vessel, ``ignore_value`` unknown.
    seeds : np.ndarray of bool, shape (z, y, x)
    counts : dict
        Voxel counts: ``seeds`` (kept), ``seeds_dropped`` (by ``seed_floor``), ``foreground`` (S_1),
        ``background`` (S_0), ``overlap`` (S_1 and S_0), ``contradicted`` (non-seed S_1 voxels in S_0
        or on an unannotated ray, which ``overlap`` decides), and per value of ``labels``: ``vessel``,
        ``background_label``, ``ignore``.
    """
    if set(annotations) != set(depths) or not annotations:
        raise ValueError(f"annotations {sorted(annotations)} and depths {sorted(depths)} need the same axes")
    seeds = np.zeros(volume.shape, dtype=bool)
    for axis, annotation in annotations.items():
        seeds |= seeds_from_annotation(annotation, depths[axis], axis, volume.shape)
    if not seeds.any():
        raise ValueError("the annotations mark no pixel, so there is no seed")
    low, high = intensity_scale(volume, clip_fraction)
    scaled = normalize_intensity(volume, low, high, clip=False)
    annotated_seeds = int(np.count_nonzero(seeds))
    if seed_floor > 0:
        seeds = drop_faint_seeds(scaled, seeds, seed_floor)
    unannotated = unannotated_rays(annotations, volume.shape)
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if rule == "calibrated":
        foreground, background = calibrated.calibrated_sets(
            scaled,
            seeds,
            annotations,
            unannotated,
            grow_factor=grow_factor,
            background_factor=background_factor,
            reference=reference,
            min_size=min_size,
            edge_sigmas=edge_sigmas,
            edge_radius=edge_radius,
        )
        del scaled
        # S_1 lies inside the visual hull and is disjoint from S_0: nothing is contradicted
        labels = combine_label_map(seeds, foreground, background, ignore_value=ignore_value, overlap=overlap)
        return labels, seeds, _counts(labels, seeds, foreground, background, foreground & background,
                                      annotated_seeds, ignore_value)  # fmt: skip
    background = background_from_rays(
        scaled,
        unannotated,
        float(scaled[seeds].mean()),
        bright_factor=bright_factor,
        dark_factor=dark_factor,
    )
    foreground = foreground_from_seeds(scaled, seeds, fg_factor=fg_factor, min_size=min_size, clip=True)
    del scaled
    # S_1 voxels on a ray the annotator saw and left unmarked contradict the annotation, whether or
    # not they are bright enough to have escaped S_0; this keeps --bright-factor and S_1 independent.
    unannotated &= foreground
    contradicted = unannotated
    contradicted |= foreground & background
    labels = combine_label_map(
        seeds, foreground, background, ignore_value=ignore_value, overlap=overlap, contradicted=contradicted
    )
    counts = _counts(labels, seeds, foreground, background, contradicted, annotated_seeds, ignore_value)
    return labels, seeds, counts


def _counts(
    labels: np.ndarray,
    seeds: np.ndarray,
    foreground: np.ndarray,
    background: np.ndarray,
    contradicted: np.ndarray,
    annotated_seeds: int,
    ignore_value: int,
) -> dict[str, int]:
    """The voxel counts of :func:`pseudo_label_volume`'s report."""
    return {
        "seeds": int(np.count_nonzero(seeds)),
        "seeds_dropped": annotated_seeds - int(np.count_nonzero(seeds)),
        "foreground": int(np.count_nonzero(foreground)),
        "background": int(np.count_nonzero(background)),
        "overlap": int(np.count_nonzero(foreground & background)),
        "contradicted": int(np.count_nonzero(contradicted & ~seeds)),
        "vessel": int(np.count_nonzero(labels == 1)),
        "background_label": int(np.count_nonzero(labels == 0)),
        "ignore": int(np.count_nonzero(labels == ignore_value)),
    }


def agreement_with_truth(
    labels: np.ndarray, truth: np.ndarray, *, vessel_value: int = 1, region: np.ndarray | None = None
) -> dict[str, float]:
    """How a label map agrees with dense truth: precision, recall, Dice of vessel, S_0's error.

    Parameters
    ----------
    labels : np.ndarray of int, shape (z, y, x)
        Label map (0 background, ``vessel_value`` vessel, anything else unknown).
    truth : np.ndarray of bool, shape (z, y, x)
        True vessel voxels.
    region : np.ndarray of bool, shape (z, y, x), optional
        Score only inside this region (e.g. where the truth is known to be complete).

    Returns
    -------
    dict
        ``precision`` and ``recall`` of the vessel voxels, their ``dice``, ``background_error`` (fraction
        of true vessel voxels labelled background) and ``background_precision`` (fraction of background
        voxels that are truly background). Undefined ratios are NaN. Scored by
        :func:`mipseg.labelset.agreement`.
    """
    scores = agreement(
        labels, np.where(truth, vessel_value, 0), {"background": 0, "vessel": vessel_value}, region=region
    )
    vessel = scores["vessel"]
    return {
        **{key: vessel[key] for key in ("precision", "recall", "dice", "background_error")},
        "background_precision": scores["background"]["precision"],
    }
