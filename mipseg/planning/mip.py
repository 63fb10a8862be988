"""Maximum intensity projections and their depth (argmax) maps, in the raw voxel grid."""

from __future__ import annotations

import numpy as np


def maximum_intensity_projection(volume: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """MIP of a volume along one numpy axis, and the index of the brightest voxel on each ray.

    Parameters
    ----------
    volume : np.ndarray, shape (z, y, x)
    axis : int
        Numpy axis to project along (0 = z).

    Returns
    -------
    mip : np.ndarray
        ``volume.max(axis)``; shape is ``volume.shape`` without ``axis`` (rows = first remaining axis).
    depth : np.ndarray of int16/int32
        ``volume.argmax(axis)``: for each MIP pixel, the index along ``axis`` of its brightest
        voxel (the first one on ties, as numpy does).
    """
    if volume.ndim != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {volume.shape}")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    depth = np.argmax(volume, axis=axis)
    depth = depth.astype(np.int16 if volume.shape[axis] < 2**15 else np.int32)
    mip = np.take_along_axis(volume, np.expand_dims(depth, axis).astype(np.intp), axis=axis).squeeze(axis)
    return mip, depth


def ray_coordinates(depth: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full ``(z, y, x)`` index arrays of the voxels a depth map points at.

    ``volume[ray_coordinates(depth, axis)] == mip`` where
    ``mip, depth = maximum_intensity_projection(volume, axis)``.
    """
    rows, cols = np.indices(depth.shape)
    if axis == 0:
        return depth.astype(np.intp), rows, cols
    if axis == 1:
        return rows, depth.astype(np.intp), cols
    return rows, cols, depth.astype(np.intp)
