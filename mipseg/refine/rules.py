"""Pseudo-label refinement of the MIP method as pure array functions (one grid, numpy ``(z, y, x)``).

Guo et al. (IEEE TMI 2024, code ``utils/CL_UN.py``; ``reference/seed-methods.md`` A.6) refine a
partial label set with two rules, both driven by out-of-fold predictions:

* **Uncertainty** (:func:`uncertainty_candidates`): of the *unlabelled* voxels on which the
  deterministic prediction and the mean of T stochastic passes agree, add the most certain
  foreground (top ``fg_top``, only within ``max_distance`` of that class's labelled voxels, S_1)
  and the most certain background (top ``bg_top``). Certainty = 1 - normalized entropy of the mean.
* **Confident learning** (:func:`confident_learning_issues`): over *labelled* body voxels, flag the
  labels the out-of-fold probabilities confidently contradict (cleanlab ``filter_by='both'``, or the
  same rule vectorized: :func:`confident_joint_issues`), and flip them (:func:`flip_issues`).

:func:`keep_foreground_near` undoes flips to foreground far from S_1 (mipseg's addition: the MIP
annotation says background there). :func:`merge_refinement` combines both rules as the method
intends (confident learning cleans labelled voxels, uncertainty labels unlabelled ones), turns
voxels claimed by two classes into ignore, and keeps seeds foreground. :func:`change_counts` feeds
the report (agreement with truth is :func:`mipseg.labelset.agreement`).

Label maps hold dataset labels (0 = background, 1.. = foreground classes) plus one ignore value.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from mipseg.pseudolabel import mip_backprojection as bp

# Published defaults (CL_UN.py; seed-methods.md A.6).
PASSES = 6
NOISE_STD = 0.1
NOISE_CLAMP = 0.2
FG_TOP = 0.75
BG_TOP = 0.45
MAX_DISTANCE = 4.0
BODY_THRESHOLD = 0.05
CL_METHODS = ("cleanlab", "confident_joint")
# cleanlab's tolerance for "p >= threshold" and for "prediction equals the given label".
_CL_EPSILON = 1e-6


def normalized_entropy(probabilities: np.ndarray) -> np.ndarray:
    """Entropy of class probabilities divided by ``ln K``, in ``[0, 1]``.

    Parameters
    ----------
    probabilities : np.ndarray, shape (K, ...)
        Sums to 1 over axis 0.

    Returns
    -------
    np.ndarray float32, shape (...)
        0 = certain, 1 = uniform over the K classes.
    """
    num_classes = probabilities.shape[0]
    entropy = np.zeros(probabilities.shape[1:], dtype=np.float32)
    for channel in probabilities:
        p = np.clip(channel, 1e-12, 1.0).astype(np.float32, copy=False)
        entropy -= p * np.log(p)
    return np.clip(entropy / np.float32(np.log(max(num_classes, 2))), 0.0, 1.0)


def body_mask(
    volume: np.ndarray, threshold: float = BODY_THRESHOLD, clip_fraction: float = bp.CLIP_FRACTION
) -> np.ndarray:
    """Voxels whose intensity, min-max normalized as in the pseudo-label step, is ``>= threshold``.

    The published code excludes air this way (``img3d >= 0.05`` on the clipped ``[0, 1]`` scale).

    Parameters
    ----------
    volume : np.ndarray, shape (z, y, x)
        Raw intensities (channel 0).
    """
    low, high = bp.intensity_scale(volume, clip_fraction)
    return bp.normalize_intensity(volume, low, high) >= threshold


def top_fraction(values: np.ndarray, fraction: float) -> np.ndarray:
    """Mask of the ``fraction`` largest entries of a 1D array (ties at the cut are all kept).

    The published rule sorts certainties descending and keeps those above the value at rank
    ``fraction * n``; a quantile gives the same cut in O(n).
    """
    if values.size == 0 or fraction <= 0:
        return np.zeros(values.shape, dtype=bool)
    if fraction >= 1:
        return np.ones(values.shape, dtype=bool)
    cut = np.quantile(values, 1.0 - fraction, method="higher")
    return values >= cut


def distance_to_mask(
    mask: np.ndarray, max_distance: float, spacing: Sequence[float] | None = None
) -> np.ndarray:
    """Euclidean distance of every voxel to the nearest voxel of ``mask`` (inf where none).

    Computed with a distance transform on the bounding box of ``mask`` grown by ``max_distance``
    (voxels outside it are farther than ``max_distance`` anyway), so memory stays proportional to
    the labelled region, not the volume.

    Parameters
    ----------
    mask : np.ndarray of bool, shape (z, y, x)
    spacing : sequence of 3 floats, optional
        Voxel size (z, y, x); distances are then in units of the smallest voxel edge, so that
        ``max_distance`` keeps meaning "voxels" on isotropic grids. None = unit voxels.

    Returns
    -------
    np.ndarray float32, shape (z, y, x)
    """
    distance = np.full(mask.shape, np.inf, dtype=np.float32)
    if not mask.any():
        return distance
    sampling = np.ones(mask.ndim) if spacing is None else np.asarray(spacing, float) / min(spacing)
    margin = [int(np.ceil(max_distance / s)) + 1 for s in sampling]
    coordinates = np.nonzero(mask)
    box = tuple(
        slice(max(int(c.min()) - m, 0), min(int(c.max()) + m + 1, size))
        for c, m, size in zip(coordinates, margin, mask.shape)
    )
    distance[box] = ndimage.distance_transform_edt(~mask[box], sampling=sampling)
    return distance


def uncertainty_candidates(
    deterministic_probs: np.ndarray,
    stochastic_probs: np.ndarray,
    labels: np.ndarray,
    ignore_label: int,
    *,
    fg_top: float = FG_TOP,
    bg_top: float = BG_TOP,
    max_distance: float = MAX_DISTANCE,
    spacing: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Confident new labels for unlabelled voxels (the uncertainty module of CL_UN.py).

    Parameters
    ----------
    deterministic_probs : np.ndarray, shape (K, z, y, x)
        Eval-mode (no dropout, no noise) softmax of the out-of-fold model.
    stochastic_probs : np.ndarray, shape (T, K, z, y, x) or (K, z, y, x)
        Softmax of T stochastic passes, or already their mean over T.
    labels : np.ndarray of int, shape (z, y, x)
        Current label set; ``ignore_label`` = unlabelled.
    fg_top, bg_top
        Fraction of the candidates of each foreground class / of background kept, most certain first.
    max_distance
        New foreground of class c must lie within this distance of a voxel labelled c (S_1).
    spacing
        Voxel size (z, y, x) for the distance (see :func:`distance_to_mask`); None = voxels.

    Returns
    -------
    add_foreground : np.ndarray uint8, shape (z, y, x)
        The foreground class to add at a voxel, 0 where none (a mask for binary problems).
    add_background : np.ndarray of bool, shape (z, y, x)
    """
    mean_probs = (
        stochastic_probs.mean(axis=0) if stochastic_probs.ndim == labels.ndim + 2 else stochastic_probs
    )
    if mean_probs.shape != deterministic_probs.shape or mean_probs.shape[1:] != labels.shape:
        raise ValueError(
            f"shapes differ: deterministic {deterministic_probs.shape}, stochastic {stochastic_probs.shape}, "
            f"labels {labels.shape}"
        )
    predicted = np.argmax(deterministic_probs, axis=0).astype(np.uint8)
    candidates = (labels == ignore_label) & (predicted == np.argmax(mean_probs, axis=0))
    certainty = 1.0 - normalized_entropy(mean_probs)
    add_foreground = np.zeros(labels.shape, dtype=np.uint8)
    add_background = np.zeros(labels.shape, dtype=bool)
    for label in range(mean_probs.shape[0]):
        where = np.flatnonzero(candidates & (predicted == label))
        if where.size == 0:
            continue
        keep = where[top_fraction(certainty.ravel()[where], bg_top if label == 0 else fg_top)]
        if label == 0:
            add_background.ravel()[keep] = True
            continue
        near = distance_to_mask(labels == label, max_distance, spacing).ravel()[keep] <= max_distance
        add_foreground.ravel()[keep[near]] = label
    return add_foreground, add_background


def confident_learning_issues(
    probabilities: np.ndarray, labels: np.ndarray, *, method: str = "confident_joint"
) -> np.ndarray:
    """Flag labels that out-of-fold probabilities confidently contradict (``filter_by='both'``).

    Parameters
    ----------
    probabilities : np.ndarray, shape (K, N)
        Out-of-fold softmax of N labelled voxels.
    labels : np.ndarray of int, shape (N,)
        Their given labels in ``0..K-1``.
    method
        ``"cleanlab"``: ``cleanlab.filter.find_label_issues(..., filter_by='both')`` (the published
        call); ``"confident_joint"``: :func:`confident_joint_issues`, the same rule vectorized.

    Returns
    -------
    np.ndarray of bool, shape (N,)
    """
    if method not in CL_METHODS:
        raise ValueError(f"method must be one of {CL_METHODS}, got {method!r}")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        return np.zeros(0, dtype=bool)
    if method == "confident_joint":
        return confident_joint_issues(probabilities, labels)
    present = np.unique(labels)
    if present.size < 2:  # cleanlab needs two classes; with one there is no confident off-diagonal
        return np.zeros(labels.shape, dtype=bool)
    import warnings

    from cleanlab.filter import find_label_issues

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # per-class "too few examples" chatter
        return find_label_issues(
            labels, np.ascontiguousarray(probabilities.T, dtype=np.float32), filter_by="both", n_jobs=1
        )


def confident_joint(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """cleanlab's calibrated confident joint ``C[given, true]`` in O(N K) with ``np.bincount``.

    Per-class threshold = mean probability of that class over voxels labelled with it; a voxel's
    true-label guess is its only class above threshold, or its argmax when several are; the
    counts are calibrated to the given label counts and to N (cleanlab ``count.py``).

    Returns
    -------
    np.ndarray int64, shape (K, K)
    """
    num_classes, n = probabilities.shape
    label_counts = np.bincount(labels, minlength=num_classes)
    sums = np.stack([np.bincount(labels, weights=p, minlength=num_classes) for p in probabilities])
    thresholds = np.where(label_counts > 0, np.diagonal(sums) / np.maximum(label_counts, 1), 2.0)
    above = probabilities >= (thresholds[:, None] - _CL_EPSILON)
    num_above = above.sum(axis=0)
    guess = np.where(num_above > 1, probabilities.argmax(axis=0), above.argmax(axis=0))
    confident = num_above > 0
    joint = np.bincount(labels[confident] * num_classes + guess[confident], minlength=num_classes**2).reshape(
        num_classes, num_classes
    )
    np.fill_diagonal(joint, np.maximum(np.diagonal(joint), 1))
    calibrated = joint / np.maximum(joint.sum(axis=1, keepdims=True), 1e-30) * label_counts[:, None]
    calibrated = calibrated / max(calibrated.sum(), 1e-30) * label_counts.sum()
    return np.stack([_round_preserving_sum(row) for row in calibrated])


def _round_preserving_sum(values: np.ndarray) -> np.ndarray:
    """Round to integers whose sum is the rounded sum (largest remainders get the extra ones)."""
    floors = np.floor(values)
    missing = int(round(values.sum() - floors.sum()))
    order = np.argsort(-(values - floors))
    floors[order[:missing]] += 1
    return floors.astype(np.int64)


def _smallest(values: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` smallest entries, O(n) (argpartition)."""
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    if count >= values.size:
        return np.arange(values.size)
    return np.argpartition(values, count - 1)[:count]


def confident_joint_issues(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """cleanlab's ``filter_by='both'`` rule without its per-class sorts and copies.

    For given class k: *prune by class* flags the ``sum_j!=k C[k, j]`` voxels labelled k with the
    lowest p_k; *prune by noise rate* flags, for each j != k, the ``C[k, j]`` voxels labelled k
    with the largest margin p_j - p_k. 'both' keeps voxels flagged by both, and never a voxel
    whose argmax is its given label. ``C`` = :func:`confident_joint`.

    Parameters
    ----------
    probabilities : np.ndarray, shape (K, N)
    labels : np.ndarray of int, shape (N,)

    Returns
    -------
    np.ndarray of bool, shape (N,)
    """
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = probabilities.shape[0]
    joint = confident_joint(probabilities, labels)
    issues = np.zeros(labels.shape, dtype=bool)
    for given in range(num_classes):
        members = np.flatnonzero(labels == given)
        if members.size <= 1:  # cleanlab's min_examples_per_class = 1
            continue
        own = probabilities[given, members]
        by_class = np.zeros(members.size, dtype=bool)
        by_class[_smallest(own, int(joint[given].sum() - joint[given, given]))] = True
        by_noise = np.zeros(members.size, dtype=bool)
        for true in range(num_classes):
            if true != given and joint[given, true] > 0:
                by_noise[_smallest(own - probabilities[true, members], int(joint[given, true]))] = True
        issues[members] = by_class & by_noise
    # cleanlab's _reduce_issues: a label the model itself predicts (within epsilon) is no issue
    given_probability = np.take_along_axis(probabilities, labels[None], axis=0)[0] + _CL_EPSILON
    issues &= probabilities.max(axis=0) > given_probability
    return issues


def flip_issues(labels: np.ndarray, issues: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Hard correction: flagged labels become the predicted class (= the other class when K = 2).

    Parameters
    ----------
    labels : np.ndarray of int, shape (N,)
    issues : np.ndarray of bool, shape (N,)
    probabilities : np.ndarray, shape (K, N)
    """
    corrected = np.array(labels, copy=True)
    corrected[issues] = np.argmax(probabilities[:, issues], axis=0)
    return corrected


def keep_foreground_near(
    before: np.ndarray,
    after: np.ndarray,
    max_distance: float = MAX_DISTANCE,
    spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """Undo changes to a foreground class c farther than ``max_distance`` from ``before == c`` (S_1).

    Confident learning may flip a background label anywhere; in MIP annotation a background voxel
    far from every annotated vessel lies on an unannotated ray, which the annotation contradicts, so
    such flips are not applied (the label keeps its old value). The same limit as for added
    foreground makes "foreground never appears far from S_1" hold for the whole refinement.

    Parameters
    ----------
    before, after : np.ndarray of int, shape (z, y, x)
        Label maps before and after a rule.

    Returns
    -------
    np.ndarray, a copy of ``after`` with those voxels reset to ``before``.
    """
    result = np.array(after, copy=True)
    for label in np.unique(after[after != before]):
        if label == 0:
            continue
        changed = (after == label) & (before != label)
        if changed.any():
            far = changed & (distance_to_mask(before == label, max_distance, spacing) > max_distance)
            result[far] = before[far]
    return result


def merge_refinement(
    labels: np.ndarray,
    cleaned: np.ndarray,
    add_foreground: np.ndarray,
    add_background: np.ndarray,
    *,
    ignore_label: int,
    seeds: np.ndarray | None = None,
) -> np.ndarray:
    """The refined label map: confident learning on labelled voxels, uncertainty on unlabelled ones.

    Every source *claims* a class per voxel: ``cleaned`` on voxels labelled in ``labels``,
    ``add_foreground`` (its class) and ``add_background`` (0) wherever they are set. One claimed
    class -> that class; two different classes -> ignore; no claim -> ignore. Seeds are set last
    (they stay foreground whatever the rules said).

    Parameters
    ----------
    labels : np.ndarray of int, shape (z, y, x)
        Label set before refinement.
    cleaned : np.ndarray of int, shape (z, y, x)
        ``labels`` after confident learning (only its labelled voxels are read).
    add_foreground : np.ndarray of int, shape (z, y, x)
        Class to add (0 = none), from :func:`uncertainty_candidates`.
    add_background : np.ndarray of bool, shape (z, y, x)
    seeds : np.ndarray of int, shape (z, y, x), optional
        Seed class at seed voxels, 0 or ``ignore_label`` elsewhere.

    Returns
    -------
    np.ndarray, dtype of ``labels``, shape (z, y, x)
    """
    labelled = labels != ignore_label
    claim = np.where(labelled, cleaned, ignore_label).astype(labels.dtype)
    conflict = np.zeros(labels.shape, dtype=bool)
    is_foreground, is_background = add_foreground > 0, add_background.astype(bool)
    for extra, new_class in ((is_foreground, add_foreground[is_foreground]), (is_background, 0)):
        current = claim[extra]
        conflict[extra] |= (current != ignore_label) & (current != new_class)
        claim[extra] = np.where(current == ignore_label, new_class, current)
    claim[conflict] = ignore_label
    if seeds is not None:
        is_seed = (seeds != ignore_label) & (seeds > 0)
        claim[is_seed] = seeds[is_seed]
    return claim


def change_counts(
    before: np.ndarray, after: np.ndarray, ignore_label: int, classes: Sequence[int]
) -> dict[str, dict[str, int]]:
    """Voxels flipped (``"a->b"``), added (ignore -> class) and removed (class -> ignore) per class."""
    pairs = np.bincount(
        before.astype(np.int64).ravel() * (ignore_label + 1) + after.astype(np.int64).ravel(),
        minlength=(ignore_label + 1) ** 2,
    ).reshape(ignore_label + 1, ignore_label + 1)
    return {
        "flipped": {f"{a}->{b}": int(pairs[a, b]) for a in classes for b in classes if a != b},
        "added": {str(c): int(pairs[ignore_label, c]) for c in classes},
        "removed": {str(c): int(pairs[c, ignore_label]) for c in classes},
    }
