"""Resampling of images, label maps and probabilities, with nnU-Net's separate-z rule.

nnU-Net (``preprocessing/resampling/default_resampling.py``) resamples anisotropic data slice by
slice in-plane (2D, higher order) and only then along the coarse axis (order 0 by default), so
that thick slices are not blurred into each other. This module follows that rule with scipy and
scikit-image; label maps go through batchgenerators' ``resize_segmentation`` (one indicator per
label, so an ignore value is just another label and survives).

All arrays are channel-first ``(C, z, y, x)``; spacings are ``(z, y, x)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from batchgenerators.augmentations.utils import resize_segmentation
from scipy.ndimage import map_coordinates
from skimage.transform import resize

ANISOTROPY_THRESHOLD = 3.0  # nnU-Net's ANISO_THRESHOLD: resample the coarse axis separately above this ratio


def compute_new_shape(
    old_shape: Sequence[int], old_spacing: Sequence[float], new_spacing: Sequence[float]
) -> tuple[int, ...]:
    """Shape after resampling ``old_shape`` from ``old_spacing`` to ``new_spacing`` (nnU-Net's rounding)."""
    ratio = np.asarray(old_spacing, float) / np.asarray(new_spacing, float)
    return tuple(int(v) for v in np.round(ratio * np.asarray(old_shape, float)).astype(int))


def lowres_axis(spacing: Sequence[float]) -> int | None:
    """The single axis with the largest spacing, or ``None`` when two or three axes tie for it."""
    spacing = np.asarray(spacing, float)
    axes = np.flatnonzero(spacing == spacing.max())
    return int(axes[0]) if len(axes) == 1 else None


def separate_z_axis(
    current_spacing: Sequence[float],
    new_spacing: Sequence[float],
    threshold: float = ANISOTROPY_THRESHOLD,
) -> int | None:
    """Axis to resample on its own (nnU-Net's rule), or ``None`` for plain 3D resampling.

    The current spacing decides first; if it is isotropic enough the target spacing decides.
    """
    for spacing in (current_spacing, new_spacing):
        spacing = np.asarray(spacing, float)
        if spacing.max() / spacing.min() > threshold:
            return lowres_axis(spacing)
    return None


def resample_to_shape(
    array: np.ndarray,
    new_shape: Sequence[int],
    current_spacing: Sequence[float],
    new_spacing: Sequence[float],
    *,
    is_seg: bool,
    order: int,
    order_z: int = 0,
    separate_z_threshold: float = ANISOTROPY_THRESHOLD,
) -> np.ndarray:
    """Resample every channel of a ``(C, z, y, x)`` array to ``new_shape`` ``(z, y, x)``.

    Parameters
    ----------
    array : np.ndarray, shape (C, z, y, x)
    new_shape : (z, y, x)
    current_spacing, new_spacing : (z, y, x)
        Only used to decide whether (and along which axis) to resample separately.
    is_seg : bool
        Label map: each label's indicator is interpolated and the largest wins.
    order, order_z : int
        Interpolation order in-plane (or in 3D) and along the separate axis.

    Returns
    -------
    np.ndarray, shape (C, *new_shape)
        float32 for images/probabilities; the input dtype for label maps.
    """
    new_shape = tuple(int(s) for s in new_shape)
    if tuple(array.shape[1:]) == new_shape:
        return array if is_seg else array.astype(np.float32, copy=False)
    axis = separate_z_axis(current_spacing, new_spacing, separate_z_threshold)
    dtype = array.dtype if is_seg else np.float32
    result = np.zeros((array.shape[0], *new_shape), dtype=dtype)
    for c in range(array.shape[0]):
        channel = array[c] if is_seg else array[c].astype(float, copy=False)
        if axis is None:
            result[c] = _resize(channel, new_shape, order, is_seg)
        else:
            result[c] = _resample_separate_z(channel, new_shape, axis, order, order_z, is_seg)
    return result


def _resize(volume: np.ndarray, new_shape: tuple[int, ...], order: int, is_seg: bool) -> np.ndarray:
    if is_seg:
        return resize_segmentation(volume, new_shape, order=order)
    return resize(volume, new_shape, order=order, mode="edge", anti_aliasing=False)


def _resample_separate_z(
    volume: np.ndarray, new_shape: tuple[int, ...], axis: int, order: int, order_z: int, is_seg: bool
) -> np.ndarray:
    """In-plane 2D resampling of every slice along ``axis``, then 1D resampling along ``axis``."""
    moved = np.moveaxis(volume, axis, 0)
    target = list(new_shape)
    target_z = target.pop(axis)
    inplane = np.stack([_resize(s, tuple(target), order, is_seg) for s in moved])
    if inplane.shape[0] != target_z:
        inplane = _resample_first_axis(inplane, target_z, order_z, is_seg)
    return np.moveaxis(inplane, 0, axis)


def _resample_first_axis(volume: np.ndarray, target_z: int, order_z: int, is_seg: bool) -> np.ndarray:
    """Resample axis 0 only, with pixel-centre alignment as nnU-Net's ``map_coordinates`` call."""
    scale = volume.shape[0] / target_z
    z = (np.arange(target_z) + 0.5) * scale - 0.5
    if is_seg and order_z != 0:
        # one indicator per label so no intermediate label value can appear
        labels = np.unique(volume)
        scores = np.stack([_interpolate_first_axis((volume == v).astype(float), z, order_z) for v in labels])
        return labels[np.argmax(scores, axis=0)].astype(volume.dtype)
    result = _interpolate_first_axis(volume.astype(float, copy=False), z, order_z)
    return result.astype(volume.dtype) if is_seg else result


def _interpolate_first_axis(volume: np.ndarray, z: np.ndarray, order: int) -> np.ndarray:
    if order == 0:
        index = np.clip(np.round(z).astype(int), 0, volume.shape[0] - 1)
        return volume[index]
    grid = np.meshgrid(z, *[np.arange(s) for s in volume.shape[1:]], indexing="ij")
    return map_coordinates(volume, np.stack(grid), order=order, mode="nearest")
