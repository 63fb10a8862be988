"""Starting drawings, so that a person corrects instead of drawing from nothing.

Every source gives a class map on the target's grid (``(rows, columns)`` uint8):

``empty``
    Nothing drawn.
``threshold``
    Pixels of the MIP (or slice) brighter than a level (the page's slider, starting at
    :func:`default_level`).
``labels:{name}``
    A label set projected along the axis (e.g. ``pseudo``, whose vessel voxels are S_1 of the
    MIP paper), or its slice in slice mode. Ignore voxels count as background.
``model``
    A trained model's prediction, projected the same way (:mod:`mipseg.annotate.model_prefill`).

A MIP pixel shows the brightest voxel of its ray, and the annotation contract (DESIGN.md; the
brightest-voxel rule of Guo et al. 2024) says the drawing labels that voxel, so a 3D label map is
projected by taking the class of the brightest voxel (``rule="brightest"``); ``rule="any"`` (any
labelled voxel on the ray) is kept for the benchmark, which compares the two.

:func:`pixels_to_change` is the benchmark's measure of annotation time: the pixels a person has
to paint or erase to turn a starting drawing into the true one.
"""

from __future__ import annotations

import numpy as np
from skimage.filters import threshold_otsu

from mipseg import io
from mipseg.errors import InputError
from mipseg.labelset import LabelSet

PROJECTION_RULES = ("brightest", "any")


def default_level(plane: np.ndarray) -> float:
    """Where the threshold slider starts: Otsu's level of the pixels above Otsu's level.

    Otsu's level alone splits the body from the air around it, not the vessels from the body; taken
    once more among the brighter pixels it splits the brightest class off (on synthetic vessel
    MIPs 288 pixels to change against 2,798 for Otsu alone and 268 for the best level;
    documentation/annotate.md).
    """
    plane = np.asarray(plane, dtype=np.float64)
    if plane.min() == plane.max():
        return float(plane.max())
    level = threshold_otsu(plane)
    upper = plane[plane > level]
    if upper.size > 1 and upper.min() < upper.max():
        level = threshold_otsu(upper)
    return float(level)


def threshold_drawing(plane: np.ndarray, level: float, value: int = 1) -> np.ndarray:
    """``value`` where ``plane > level``, else 0; uint8 of the plane's shape."""
    return np.where(np.asarray(plane) > level, np.uint8(value), np.uint8(0))


def project_labels(
    labels: np.ndarray, axis: int, depth: np.ndarray, ignore_label: int, rule: str = "brightest"
) -> np.ndarray:
    """A 3D label map as a MIP drawing along ``axis``.

    Parameters
    ----------
    labels : np.ndarray, shape (z, y, x)
        Class values, possibly ``ignore_label``.
    depth : np.ndarray, shape = labels.shape without ``axis``
        Index of the brightest voxel of every ray (:func:`mipseg.planning.mip.maximum_intensity_projection`).
    rule
        ``"brightest"``: the class of the brightest voxel; ``"any"``: the highest class on the ray.

    Returns
    -------
    np.ndarray of uint8, shape = ``depth.shape``; ignore counts as background.
    """
    if rule not in PROJECTION_RULES:
        raise ValueError(f"projection rule {rule!r} is not one of {PROJECTION_RULES}")
    known = np.where(labels == ignore_label, 0, labels)
    if rule == "any":
        return known.max(axis=axis).astype(np.uint8)
    index = np.expand_dims(depth.astype(np.intp), axis)
    return np.take_along_axis(known, index, axis=axis).squeeze(axis).astype(np.uint8)


def labels_on_target(
    labels: np.ndarray,
    kind: str,
    index: int,
    depth: np.ndarray | None,
    ignore_label: int,
    rule: str = "brightest",
) -> np.ndarray:
    """A 3D label map on a target's grid: projected along MIP axis ``index``, or slice ``index``."""
    if kind == "mip":
        return project_labels(labels, index, depth, ignore_label, rule)
    return np.where(labels[index] == ignore_label, 0, labels[index]).astype(np.uint8)


def pixels_to_change(start: np.ndarray, truth: np.ndarray) -> int:
    """Pixels whose class differs: what a person paints or erases to get from ``start`` to ``truth``."""
    if start.shape != truth.shape:
        raise ValueError(f"start {start.shape} and truth {truth.shape} differ in shape")
    return int(np.count_nonzero(start != truth))


def expected_changes(probabilities: np.ndarray) -> float:
    """Pixels a person is expected to change on a plane whose class probabilities are ``(K, rows, cols)``.

    Each pixel is wrong with probability ``1 - max_k p_k`` when the most probable class is drawn,
    so the sum is the expected number of corrections; cases are shown largest first.
    """
    return float(np.sum(1.0 - probabilities.max(axis=0)))


def labelset_names(dataset_name: str, case_ids: list[str]) -> list[str]:
    """Label sets of the dataset (:meth:`LabelSet.all_of`) holding at least one training case."""
    return [
        labelset.name
        for labelset in LabelSet.all_of(dataset_name)
        if any(labelset.label_path(case).is_file() for case in case_ids)
    ]


def read_labelset_case(dataset_name: str, name: str, case_id: str, shape: tuple[int, ...]) -> np.ndarray:
    """Label map ``(z, y, x)`` of one case of a label set (the caller checked ``name`` is listed).

    Raises
    ------
    InputError
        The case is not in the label set, or its grid is not the image's.
    """
    path = LabelSet.of(dataset_name, name).label_path(case_id)
    if not path.is_file():
        raise InputError(f"{path}: label set {name!r} has no map of case {case_id}")
    labels, _ = io.read_image(path)
    if labels.shape != tuple(shape):
        raise InputError(f"{path}: shape {labels.shape} is not the image's {tuple(shape)}")
    return labels
