"""Simulated 2D annotations of a dense label: on a MIP (brightest-voxel rule) or on one slice.

Also the "hardness" baseline of a dataset: the best Dice a single global intensity threshold
reaches, which a useful synthetic task must keep well below 1.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from mipseg.errors import InputError
from mipseg.metrics import dice_from_counts

SLICE_CHOICES = ("middle", "largest")


def simulate_mip_annotation(
    image: np.ndarray,
    label: np.ndarray,
    axis: int,
    *,
    annotator_noise: bool = False,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """What an annotator draws on the MIP of ``image`` along ``axis``.

    A MIP pixel is foreground exactly where the brightest voxel on its ray (the first one on
    ties, as ``np.argmax``) is foreground in ``label`` (Guo et al. 2024: the annotation
    labels the voxel the MIP shows). With ``annotator_noise`` the drawing is imperfect the
    way real ones are: some faint branches are missed and the strokes are one pixel wider.

    Parameters
    ----------
    image, label : np.ndarray, shape (z, y, x)
    axis : int
        Numpy axis of the projection (0 = z).
    annotator_noise
        Simulate a human annotator (needs ``rng``).
    rng
        Randomness for the missed branches.

    Returns
    -------
    np.ndarray of uint8, shape ``image.shape`` without ``axis``
        The label value of the brightest voxel (1 for vessel, 0 for background).
    """
    if image.shape != label.shape or image.ndim != 3:
        raise ValueError(f"image {image.shape} and label {label.shape} must be the same 3D shape")
    depth = np.expand_dims(np.argmax(image, axis=axis), axis)
    annotation = np.take_along_axis(label, depth, axis=axis).squeeze(axis).astype(np.uint8)
    if not annotator_noise:
        return annotation
    if rng is None:
        raise ValueError("annotator_noise needs an rng")
    mip = np.take_along_axis(image, depth, axis=axis).squeeze(axis)
    return _imperfect_drawing(annotation, mip, rng)


def _imperfect_drawing(annotation: np.ndarray, mip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Drop about half of the faint pieces (lowest-quartile MIP brightness), then dilate by one pixel."""
    drawn = annotation > 0
    if drawn.any():
        faint = drawn & (mip < np.percentile(mip[drawn], 25))
        pieces, count = ndimage.label(faint, structure=np.ones((3, 3)))
        missed = np.flatnonzero(rng.random(count) < 0.5) + 1
        drawn &= ~np.isin(pieces, missed)
        drawn = ndimage.binary_dilation(drawn, structure=ndimage.generate_binary_structure(2, 1))
    return (drawn * annotation.max(initial=1)).astype(np.uint8)


def simulate_slice_annotation(label: np.ndarray, choice: str | int = "middle") -> tuple[int, np.ndarray]:
    """The slice (along axis 0) an annotator labels, and its label.

    Parameters
    ----------
    label : np.ndarray, shape (z, y, x)
    choice
        ``"middle"``: middle of the foreground's z extent; ``"largest"``: the slice with the
        most foreground; an integer (or its text): that slice index.

    Returns
    -------
    index : int
    mask : np.ndarray of uint8, shape (y, x)
        ``label[index]`` (class values kept).

    Raises
    ------
    InputError
        Unknown choice, index outside the volume, or an empty slice (an annotation must hold
        foreground).
    """
    area = np.count_nonzero(label, axis=(1, 2))
    occupied = np.flatnonzero(area)
    if not len(occupied):
        raise InputError("label is empty: no slice to annotate")
    index = _slice_index(choice, area, occupied)
    if area[index] == 0:
        raise InputError(
            f"slice {index} holds no foreground (foreground is in slices {occupied[0]}..{occupied[-1]})"
        )
    return index, label[index].astype(np.uint8)


def _slice_index(choice: str | int, area: np.ndarray, occupied: np.ndarray) -> int:
    if isinstance(choice, (int, np.integer)) or (isinstance(choice, str) and choice.strip().isdigit()):
        index = int(choice)
        if not 0 <= index < len(area):
            raise InputError(f"slice {index} is outside the volume's {len(area)} slices")
        return index
    if choice == "middle":
        return int((occupied[0] + occupied[-1]) // 2)
    if choice == "largest":
        return int(np.argmax(area))
    raise InputError(f"slice choice {choice!r} must be 'middle', 'largest' or a slice index")


def best_threshold_dice(
    images: list[np.ndarray], labels: list[np.ndarray], num_thresholds: int = 200
) -> tuple[float, float]:
    """Best Dice over a dataset of one global intensity threshold ``image > t``.

    All voxels of all cases are pooled (one threshold for the whole dataset, as a naive
    baseline would pick it); thresholds are searched on a grid between the 50th and the
    99.99th percentile of the body voxels.

    Returns
    -------
    dice, threshold : float
    """
    values = np.concatenate([image.ravel() for image in images])
    truth = np.concatenate([label.ravel() > 0 for label in labels])
    low, high = np.percentile(values[values > 0], [50.0, 99.99])
    thresholds = np.linspace(low, high, num_thresholds)
    # Histograms make every threshold one cumulative sum instead of a pass over all voxels.
    edges = np.concatenate([thresholds, [np.inf]])
    positives = np.histogram(values[truth], bins=edges)[0][::-1].cumsum()[::-1]
    predicted = np.histogram(values, bins=edges)[0][::-1].cumsum()[::-1]
    # No truth and nothing above a threshold counts 0 (not NaN), so that argmax ranks every threshold.
    dice = np.nan_to_num(dice_from_counts(positives, predicted - positives, truth.sum() - positives), nan=0.0)
    best = int(np.argmax(dice))
    return float(dice[best]), float(thresholds[best])
