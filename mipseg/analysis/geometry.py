"""Voxel indices to world coordinates, and the checks that make that mapping trustworthy."""

from __future__ import annotations

import numpy as np

from mipseg.errors import InputError
from mipseg.io import Geometry


def direction_matrix(geometry: Geometry) -> np.ndarray:
    """The 3x3 direction cosine matrix; column k is the world direction of image axis k (x, y, z)."""
    return np.asarray(geometry.direction, float).reshape(3, 3)


def index_to_world(indices_zyx: np.ndarray, geometry: Geometry) -> np.ndarray:
    """World (physical) coordinates of continuous voxel indices, as SimpleITK computes them.

    Parameters
    ----------
    indices_zyx : np.ndarray, shape (n, 3)
        Voxel indices in numpy ``(z, y, x)`` order (fractions allowed).
    geometry
        Spacing, origin and direction of the image.

    Returns
    -------
    np.ndarray of float64, shape (n, 3)
        ``origin + direction @ (spacing * index_xyz)``: world ``(x, y, z)`` in mm, the frame
        of the image header (LPS for images from DICOM through ITK).
    """
    index_xyz = np.asarray(indices_zyx, float).reshape(-1, 3)[:, ::-1]
    scaled = index_xyz * np.asarray(geometry.spacing, float)
    return scaled @ direction_matrix(geometry).T + np.asarray(geometry.origin, float)


def check_geometry(geometry: Geometry, path: object) -> None:
    """Raise :class:`InputError` unless spacing is positive and finite and direction is orthonormal.

    Lengths and radii are measured in mm from the spacing, and world coordinates need a
    rotation (or reflection) as direction; anything else would give wrong numbers silently.
    """
    spacing = np.asarray(geometry.spacing, float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"{path}: spacing {tuple(geometry.spacing)} must be positive (mm)")
    direction = direction_matrix(geometry)
    if not np.all(np.isfinite(direction)) or not np.allclose(direction @ direction.T, np.eye(3), atol=1e-4):
        raise InputError(
            f"{path}: direction {tuple(round(v, 6) for v in geometry.direction)} is not orthonormal"
        )
