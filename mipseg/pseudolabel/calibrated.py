"""The calibrated pseudo-label rule: thresholds measured from the seeds and the unannotated rays.

The published rule (:mod:`.mip_backprojection`) compares intensities with fixed multiples of the mean
seed intensity on a scale whose zero is the dark end of the range. On real volumes with a bright
background floor (light-sheet, OCTA) or outliers that stretch the range, that zero is far from the
background level, so ``1.0 x seed mean`` keeps only the cores of the brightest vessels (S_1 recall
0.13-0.27) and ``1.2 x seed mean`` turns most faint vessel voxels into S_0 (error 21-49 %).

The calibrated rule measures two levels on the image itself and places its thresholds between them:

* ``b``: the background level, the median intensity of the voxels on unannotated rays (those rays
  hold no vessel at their brightest voxel, so they are mostly background);
* ``s``: the seed level, the mean intensity of the seeds (``reference="global"``) or, per voxel, the
  lowest MIP value of the annotated rays through it (``reference="ray"``: each ray's own seed).

``S_1`` = seeded 26-connected components of the voxels above ``b + grow_factor (s - b)`` that lie on
annotated rays of every axis used (the "visual hull" of the drawing: a voxel on an unannotated ray is
contradicted by the annotation), plus the seeds, then grown at its edge (:func:`grow_vessel_edge`)
into hull voxels within ``edge_radius`` that stand ``edge_sigmas`` noise levels above ``b``.
``S_0`` = voxels on unannotated rays below ``b + background_factor (s - b)`` (clearly darker than the
vessels the annotator saw), minus ``S_1``.

Every array is numpy ``(z, y, x)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import ndimage

REFERENCES = ("global", "ray")
# Chosen from benchmarks/pseudolabel_quality.py on synthetic vessels, aorta_cemra, octa_vessels and
# lightsheet_vessels (documentation/pseudolabel.md): 0.7 keeps precision >= 0.94 on all four with one
# or three axes; 0.5 buys recall on the real volumes but drops precision to 0.73-0.82 on one-axis
# synthetic vessels.
GROW_FACTOR = 0.7
# Chosen by the models trained on the labels, not by S_0 error alone (documentation/pseudolabel.md):
# 0 (below the median of the unannotated rays) keeps S_0 error <= 3.1 % on all four sources but leaves
# the brighter half of the background unlabelled, and the mip trainer then learns the median as the
# vessel edge (synthetic demo data: Dice 0.54-0.57, precision 0.42); 0.5 labels 75-99 % of the voxels as
# S_0 and trains better models on every source measured (synthetic +0.17-0.19, octa +0.011,
# lightsheet +0.011 Dice), at an S_0 error of up to 13 % on octa_vessels.
BACKGROUND_FACTOR = 0.5
REFERENCE = "global"
# Edge growth (issue 17, documentation/pseudolabel.md "Edge growth"): labels of real microscopy hold
# the faint rim of each vessel (light-sheet: the vessel median sits at 0.37 of the seed level), which
# no fraction of (s - b) finds without flooding the hull. The rim is found by its distance to S_1 and
# its contrast to the background noise instead. 8 noise levels and 1.5 voxels leave synthetic vessels,
# aorta_cemra and octa_vessels as they were and lift light-sheet recall from 0.32 to 0.68 at precision
# 0.96 (3 axes); 6 levels cost the tube phantom and the aorta precision (0.94, 0.99), 1.8 voxels cost
# light-sheet precision (0.957 -> 0.94 with one axis).
EDGE_SIGMAS = 8.0
EDGE_RADIUS = 1.5


def background_level(scaled: np.ndarray, unannotated: np.ndarray) -> float:
    """Median intensity of the voxels on unannotated rays (of the whole volume if there are none).

    Parameters
    ----------
    scaled : np.ndarray of float, shape (z, y, x)
    unannotated : np.ndarray of bool, shape (z, y, x)
    """
    values = scaled[unannotated] if unannotated.any() else scaled
    return float(np.median(values))


def seed_reference(
    scaled: np.ndarray, seeds: np.ndarray, annotations: Mapping[int, np.ndarray], reference: str
) -> np.ndarray | float:
    """The seed level ``s``: mean seed intensity, or per voxel the lowest seed of its annotated rays.

    Parameters
    ----------
    scaled : np.ndarray of float, shape (z, y, x)
    seeds : np.ndarray of bool, shape (z, y, x), not empty
    annotations : mapping axis -> np.ndarray of bool (MIP grid of that axis)
    reference : ``"global"`` or ``"ray"``

    Returns
    -------
    float, or np.ndarray of float32 broadcastable to (z, y, x)
        For ``"ray"``: the MIP value of the ray through each voxel is that ray's seed intensity; the
        minimum over the axes is taken (the faintest vessel seen through the voxel). Voxels off the
        annotated rays get the global mean (their threshold does not matter: they are never S_1).
    """
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    mean = float(scaled[seeds].mean())
    if reference == "global":
        return mean
    level = np.full(scaled.shape, np.inf, dtype=np.float32)
    for axis, annotation in annotations.items():
        ray_seed = np.where(annotation, scaled.max(axis=axis), np.inf).astype(np.float32)
        np.minimum(level, np.expand_dims(ray_seed, axis), out=level)
    level[np.isinf(level)] = mean
    return level


def background_noise(scaled: np.ndarray, unannotated: np.ndarray) -> tuple[float, float]:
    """Median and robust standard deviation (1.4826 x MAD) of the voxels on unannotated rays.

    Parameters
    ----------
    scaled : np.ndarray of float, shape (z, y, x)
    unannotated : np.ndarray of bool, shape (z, y, x); the whole volume is used if it is empty
    """
    values = scaled[unannotated] if unannotated.any() else scaled.reshape(-1)
    median = float(np.median(values))
    return median, 1.4826 * float(np.median(np.abs(values - median)))


def grow_vessel_edge(
    scaled: np.ndarray,
    foreground: np.ndarray,
    unannotated: np.ndarray,
    *,
    edge_sigmas: float = EDGE_SIGMAS,
    edge_radius: float = EDGE_RADIUS,
) -> np.ndarray:
    """``foreground`` plus the hull voxels near it that are clearly brighter than the background noise.

    A voxel joins when it lies on annotated rays of every axis (not ``unannotated``), within
    ``edge_radius`` voxels (Euclidean) of ``foreground``, and above ``m + edge_sigmas * sd``, where
    ``m, sd`` = :func:`background_noise`. Only the component(s) touching ``foreground`` are kept.

    Parameters
    ----------
    scaled : np.ndarray of float, shape (z, y, x)
    foreground : np.ndarray of bool, shape (z, y, x)
    unannotated : np.ndarray of bool, shape (z, y, x)
    edge_sigmas : float
        Contrast over the background median, in robust standard deviations of the background.
    edge_radius : float
        Largest distance from ``foreground`` in voxels; 0 returns ``foreground`` unchanged.

    Returns
    -------
    np.ndarray of bool, shape (z, y, x), a superset of ``foreground``
    """
    if edge_radius <= 0 or not foreground.any():
        return foreground
    median, spread = background_noise(scaled, unannotated)
    candidates = scaled > median + edge_sigmas * spread
    candidates &= ~unannotated
    candidates &= ndimage.distance_transform_edt(~foreground) <= edge_radius
    candidates |= foreground
    components, _ = ndimage.label(candidates, structure=np.ones((3, 3, 3), dtype=bool))
    touching = np.unique(components[foreground])
    return np.isin(components, touching[touching > 0])


def calibrated_sets(
    scaled: np.ndarray,
    seeds: np.ndarray,
    annotations: Mapping[int, np.ndarray],
    unannotated: np.ndarray,
    *,
    grow_factor: float = GROW_FACTOR,
    background_factor: float = BACKGROUND_FACTOR,
    reference: str = REFERENCE,
    min_size: int = 1,
    edge_sigmas: float = EDGE_SIGMAS,
    edge_radius: float = EDGE_RADIUS,
) -> tuple[np.ndarray, np.ndarray]:
    """``S_1`` and ``S_0`` of the calibrated rule.

    Parameters
    ----------
    scaled : np.ndarray of float, shape (z, y, x)
        Intensity (any monotone linear scale; thresholds are placed between measured levels).
    seeds : np.ndarray of bool, shape (z, y, x), not empty
    annotations : mapping axis -> np.ndarray of bool
        Annotated pixels of each MIP used.
    unannotated : np.ndarray of bool, shape (z, y, x)
        Voxels on a ray whose pixel is unannotated on some axis
        (:func:`mipseg.pseudolabel.mip_backprojection.unannotated_rays`).
    grow_factor : float
        S_1 threshold at ``b + grow_factor (s - b)``.
    background_factor : float
        S_0 threshold at ``b + background_factor (s - b)`` (may be negative: stricter).
    reference : ``"global"`` or ``"ray"``
        How ``s`` is measured (:func:`seed_reference`).
    min_size : int
        Seeded components with fewer voxels are dropped (the seeds stay).
    edge_sigmas, edge_radius : float
        Edge growth of S_1 (:func:`grow_vessel_edge`); ``edge_radius=0`` turns it off.

    Returns
    -------
    foreground, background : np.ndarray of bool, shape (z, y, x), disjoint
    """
    level = background_level(scaled, unannotated)
    reference_level = seed_reference(scaled, seeds, annotations, reference)
    span = np.subtract(reference_level, level)
    candidates = scaled > level + grow_factor * span
    candidates &= ~unannotated
    candidates |= seeds
    components, count = ndimage.label(candidates, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(components.reshape(-1), minlength=count + 1)
    keep = np.zeros(count + 1, dtype=bool)
    keep[np.unique(components[seeds])] = True
    keep &= sizes >= min_size
    keep[0] = False
    foreground = keep[components]
    del components
    foreground |= seeds
    foreground = grow_vessel_edge(
        scaled, foreground, unannotated, edge_sigmas=edge_sigmas, edge_radius=edge_radius
    )
    background = scaled < level + background_factor * span
    background &= unannotated
    background &= ~foreground
    return foreground, background
