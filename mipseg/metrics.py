"""Segmentation metrics on boolean masks: overlap, surface distances in mm, and clDice.

The one home of Dice in mipseg (:func:`dice_from_counts`): evaluation, training validation, label-set
reports, postprocessing and benchmarks all call it, so every Dice follows the same empty-mask rule.
Shared layer: any stage may import it (it imports no stage).

All arrays are numpy ``(z, y, x)``; ``spacing`` is the voxel size in mm in the same
``(z, y, x)`` order. Every metric follows one set of rules for empty masks (see
:func:`metrics_from_counts` and the surface/skeleton functions), so that averaging with
``np.nanmean`` over cases means the same thing for every metric:

- both reference and prediction empty: every ratio and distance is NaN (nothing to score);
- Dice, IoU, clDice: 0 when exactly one side is empty;
- precision: NaN when nothing is predicted; recall: NaN when the reference is empty;
- HD95, ASSD: NaN when either side is empty (a distance to nothing is undefined).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.morphology import skeletonize

METRIC_NAMES = ("Dice", "IoU", "precision", "recall", "clDice", "HD95", "ASSD")
COUNT_NAMES = ("TP", "FP", "FN", "TN", "n_pred", "n_ref")

# 6-connected erosion: a voxel is on the surface if any face neighbour is background, the
# usual definition for surface distances (a thinner surface than 26-connectivity would give).
_FACE_CONNECTIVITY = ndimage.generate_binary_structure(3, 1)


def confusion_counts(
    reference: np.ndarray, prediction: np.ndarray, valid: np.ndarray | None = None
) -> dict[str, int]:
    """Voxel counts TP, FP, FN, TN, n_pred (= TP + FP) and n_ref (= TP + FN).

    Parameters
    ----------
    reference, prediction : np.ndarray of bool, shape (z, y, x)
    valid : np.ndarray of bool, shape (z, y, x), optional
        Voxels to count; voxels outside it (the ignore label) are left out of every count.
    """
    if valid is not None:
        reference, prediction = reference & valid, prediction & valid
        total = int(np.count_nonzero(valid))
    else:
        total = reference.size
    tp = int(np.count_nonzero(reference & prediction))
    n_ref = int(np.count_nonzero(reference))
    n_pred = int(np.count_nonzero(prediction))
    fp, fn = n_pred - tp, n_ref - tp
    return {"TP": tp, "FP": fp, "FN": fn, "TN": total - tp - fp - fn, "n_pred": n_pred, "n_ref": n_ref}


def metrics_from_counts(counts: dict[str, int]) -> dict[str, float]:
    """Dice, IoU, precision and recall from :func:`confusion_counts`, with NaN where undefined.

    Dice = 2 TP / (2 TP + FP + FN) and IoU = TP / (TP + FP + FN) are NaN when TP + FP + FN = 0
    (both masks empty, as nnU-Net); precision = TP / (TP + FP) is NaN when nothing is predicted;
    recall = TP / (TP + FN) is NaN when the reference is empty.
    """
    tp, fp, fn = counts["TP"], counts["FP"], counts["FN"]
    return {
        "Dice": float(dice_from_counts(tp, fp, fn)),
        "IoU": _ratio(tp, tp + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
    }


def dice_from_counts(tp: ArrayLike, fp: ArrayLike, fn: ArrayLike) -> np.ndarray:
    """Dice = 2 TP / (2 TP + FP + FN), elementwise over arrays of voxel counts.

    Empty-mask rule (the only one in mipseg): **NaN when TP + FP + FN = 0**, i.e. reference and
    prediction are both empty (nothing to score, as nnU-Net); 0 when exactly one of them is empty.
    Average with ``np.nanmean``; a caller that needs a number for "both empty" (e.g. to rank
    candidates) replaces the NaN itself and says why.

    Parameters
    ----------
    tp, fp, fn : int or np.ndarray of int, broadcastable
        True positives, false positives, false negatives.

    Returns
    -------
    np.ndarray of float64, the broadcast shape (0-d for scalars: use ``float()``)
    """
    tp, fp, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn))
    denominator = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * tp / np.where(denominator > 0, denominator, 1), np.nan)


def dice_per_class(
    reference: np.ndarray, prediction: np.ndarray, classes: Sequence[int], ignore_label: int | None = None
) -> dict[str, float]:
    """Dice of every class of two label maps, keyed by the class value as a string.

    Parameters
    ----------
    reference, prediction : np.ndarray of int, shape (z, y, x)
    classes
        Class values to score, each as the mask ``== class``.
    ignore_label
        Reference value of unknown voxels, left out of both masks (``None``: every voxel counts).

    Returns
    -------
    dict
        ``str(class) -> Dice`` (NaN where both masks are empty, see :func:`dice_from_counts`).
    """
    valid = None if ignore_label is None else reference != ignore_label
    scores = {}
    for value in classes:
        counts = confusion_counts(reference == value, prediction == value, valid)
        scores[str(value)] = float(dice_from_counts(counts["TP"], counts["FP"], counts["FN"]))
    return scores


def dice(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Dice coefficient of two boolean masks; NaN if both are empty."""
    return metrics_from_counts(confusion_counts(reference, prediction))["Dice"]


def iou(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Intersection over union (Jaccard) of two boolean masks; NaN if both are empty."""
    return metrics_from_counts(confusion_counts(reference, prediction))["IoU"]


def precision(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Share of predicted voxels that are in the reference; NaN if nothing is predicted."""
    return metrics_from_counts(confusion_counts(reference, prediction))["precision"]


def recall(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Share of reference voxels that are predicted (sensitivity); NaN if the reference is empty."""
    return metrics_from_counts(confusion_counts(reference, prediction))["recall"]


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels of a boolean mask: the mask minus its 6-connected erosion.

    Voxels on the array border count as surface (outside the array is background).
    """
    return mask & ~ndimage.binary_erosion(mask, structure=_FACE_CONNECTIVITY, border_value=0)


def surface_distances(
    reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each surface voxel of one mask to the nearest surface voxel of the other.

    Surfaces are found on the bounding box of both masks plus a one-voxel margin (the same
    surfaces as on the whole image, at a fraction of the cost). Nearest surface voxels are
    found with a ``scipy.spatial.cKDTree`` on voxel centres scaled by ``spacing``: the same
    exact Euclidean distances as ``distance_transform_edt(~surface, sampling=spacing)`` read
    at the other surface, but 10-40x faster when the masks span a large volume (vessel trees),
    because the cost grows with the number of surface voxels, not with the box volume.

    Parameters
    ----------
    reference, prediction : np.ndarray of bool, shape (z, y, x)
    spacing : 3 floats
        Voxel size in mm, (z, y, x).

    Returns
    -------
    reference_to_prediction : np.ndarray of float, shape (number of reference surface voxels,)
    prediction_to_reference : np.ndarray of float, shape (number of prediction surface voxels,)
        Both empty when either mask is empty.
    """
    _check_pair(reference, prediction)
    if not reference.any() or not prediction.any():
        return np.zeros(0), np.zeros(0)
    box = _union_bounding_box(reference, prediction, margin=1)
    scale = np.asarray(spacing, dtype=float)
    reference_points = np.argwhere(surface(reference[box])) * scale
    prediction_points = np.argwhere(surface(prediction[box])) * scale
    reference_to_prediction, _ = cKDTree(prediction_points).query(reference_points)
    prediction_to_reference, _ = cKDTree(reference_points).query(prediction_points)
    return reference_to_prediction, prediction_to_reference


def hd95_from_distances(reference_to_prediction: np.ndarray, prediction_to_reference: np.ndarray) -> float:
    """Max of the two directed 95th percentiles (numpy linear interpolation); NaN if either is empty."""
    if reference_to_prediction.size == 0 or prediction_to_reference.size == 0:
        return math.nan
    return float(max(np.percentile(reference_to_prediction, 95), np.percentile(prediction_to_reference, 95)))


def assd_from_distances(reference_to_prediction: np.ndarray, prediction_to_reference: np.ndarray) -> float:
    """Mean of all surface distances of both directions pooled; NaN if either is empty."""
    if reference_to_prediction.size == 0 or prediction_to_reference.size == 0:
        return math.nan
    total = float(reference_to_prediction.sum()) + float(prediction_to_reference.sum())
    return total / (reference_to_prediction.size + prediction_to_reference.size)


def hd95(reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """95th percentile Hausdorff distance in mm: max of the two directed 95th percentiles.

    NaN if either mask is empty.
    """
    return hd95_from_distances(*surface_distances(reference, prediction, spacing))


def assd(reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """Average symmetric surface distance in mm (both directions pooled); NaN if either is empty."""
    return assd_from_distances(*surface_distances(reference, prediction, spacing))


def cldice(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Centerline Dice (Shit et al., CVPR 2021) of two boolean 3D masks.

    Tprec = |S(pred) ∩ ref| / |S(pred)|, Tsens = |S(ref) ∩ pred| / |S(ref)| with S the
    ``skimage.morphology.skeletonize`` skeleton; clDice = 2 Tprec Tsens / (Tprec + Tsens).
    NaN if both masks are empty, 0 if exactly one is. Skeletons are computed on the bounding
    box of both masks (+1 voxel), which gives the same skeleton as the whole image.
    """
    _check_pair(reference, prediction)
    has_reference, has_prediction = bool(reference.any()), bool(prediction.any())
    if not has_reference and not has_prediction:
        return math.nan
    if not has_reference or not has_prediction:
        return 0.0
    box = _union_bounding_box(reference, prediction, margin=1)
    reference, prediction = reference[box], prediction[box]
    prediction_skeleton, reference_skeleton = _skeleton(prediction), _skeleton(reference)
    topology_precision = np.count_nonzero(prediction_skeleton & reference) / np.count_nonzero(
        prediction_skeleton
    )
    topology_sensitivity = np.count_nonzero(reference_skeleton & prediction) / np.count_nonzero(
        reference_skeleton
    )
    return _ratio(
        2 * topology_precision * topology_sensitivity, topology_precision + topology_sensitivity, 0.0
    )


def compute_metrics(
    reference: np.ndarray,
    prediction: np.ndarray,
    labels: Sequence[int],
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    ignore_label: int | None = None,
) -> dict[int, dict[str, float]]:
    """Every metric for every label of one case.

    Parameters
    ----------
    reference, prediction : np.ndarray of int, shape (z, y, x)
        Label maps of the same shape.
    labels
        Label values to score, each as a binary mask ``== label``.
    spacing : 3 floats
        Voxel size in mm, (z, y, x), for HD95 and ASSD.
    ignore_label
        Reference value marking unknown voxels. They are left out of the voxel counts and
        removed from the prediction before surface and skeleton metrics.

    Returns
    -------
    dict
        label -> {Dice, IoU, precision, recall, clDice, HD95, ASSD (floats, NaN where
        undefined), TP, FP, FN, TN, n_pred, n_ref (ints)}.
    """
    _check_pair(reference, prediction)
    valid = None if ignore_label is None else reference != ignore_label
    results: dict[int, dict[str, float]] = {}
    for label in labels:
        reference_mask = reference == label
        prediction_mask = prediction == label
        if valid is not None:
            prediction_mask &= valid
        counts = confusion_counts(reference_mask, prediction_mask, valid)
        distances = surface_distances(reference_mask, prediction_mask, spacing)
        results[int(label)] = {
            **metrics_from_counts(counts),
            "clDice": cldice(reference_mask, prediction_mask),
            "HD95": hd95_from_distances(*distances),
            "ASSD": assd_from_distances(*distances),
            **counts,
        }
    return results


def absent_label_metrics(num_valid_voxels: int) -> dict[str, float]:
    """Metrics of a label that neither reference nor prediction contains: all NaN, every voxel TN."""
    counts = {"TP": 0, "FP": 0, "FN": 0, "TN": int(num_valid_voxels), "n_pred": 0, "n_ref": 0}
    return {**{name: math.nan for name in METRIC_NAMES}, **counts}


def _skeleton(mask: np.ndarray) -> np.ndarray:
    skeleton = skeletonize(mask)
    # Thinning keeps at least one voxel per connected component; the fallback only guards
    # against an empty skeleton of a non-empty mask so that the ratios stay defined.
    return skeleton if skeleton.any() else mask


def _union_bounding_box(a: np.ndarray, b: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Slices of the bounding box of ``a | b`` grown by ``margin`` voxels, clipped to the array."""
    (box,) = ndimage.find_objects((a | b).astype(np.uint8))
    return tuple(slice(max(0, s.start - margin), min(size, s.stop + margin)) for s, size in zip(box, a.shape))


def _check_pair(reference: np.ndarray, prediction: np.ndarray) -> None:
    if reference.shape != prediction.shape:
        raise ValueError(
            f"reference shape {reference.shape} differs from prediction shape {prediction.shape}"
        )
    if reference.ndim != 3:
        raise ValueError(f"expected (z, y, x) arrays, got {reference.ndim} dimensions")


def _ratio(numerator: float, denominator: float, undefined: float = math.nan) -> float:
    return float(numerator) / float(denominator) if denominator else undefined
