"""Building blocks shared by the synthetic generators: grids, body masks, textures, bias, noise.

Everything works in physical millimetres on a ``(z, y, x)`` voxel grid with a given spacing,
so a structure keeps its physical size when the spacing changes (anisotropic slices simply
sample it more coarsely along z).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

Shape3 = tuple[int, int, int]
Spacing3 = tuple[float, float, float]


def voxel_centres_mm(shape: Shape3, spacing: Spacing3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Physical coordinates (mm) of voxel centres as broadcastable ``(z,1,1), (1,y,1), (1,1,x)`` arrays."""
    axes = [np.arange(n, dtype=np.float32) * np.float32(s) for n, s in zip(shape, spacing)]
    return axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]


def elliptical_body(
    shape: Shape3, spacing: Spacing3, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """An elliptical cylinder along z filling most of the field of view.

    Returns
    -------
    body : np.ndarray of bool, shape (z, y, x)
    radial : np.ndarray of float32, shape (y, x)
        Normalised elliptical radius (0 at the axis, 1 on the body surface), used to place a
        skin/fat shell and to keep structures inside the body.
    """
    _, y, x = voxel_centres_mm(shape, spacing)
    extent_y, extent_x = shape[1] * spacing[1], shape[2] * spacing[2]
    centre_y = extent_y / 2 + rng.uniform(-0.03, 0.03) * extent_y
    centre_x = extent_x / 2 + rng.uniform(-0.03, 0.03) * extent_x
    semi_y = rng.uniform(0.40, 0.45) * extent_y
    semi_x = rng.uniform(0.43, 0.47) * extent_x
    radial = np.sqrt(((y[0] - centre_y) / semi_y) ** 2 + ((x[0] - centre_x) / semi_x) ** 2)
    body = np.broadcast_to(radial <= 1.0, shape).copy()
    return body, radial.astype(np.float32)


def smooth_field(shape: Shape3, spacing: Spacing3, sigma_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-filtered white noise with zero mean and unit standard deviation.

    Parameters
    ----------
    sigma_mm
        Correlation length in millimetres (converted per axis with the spacing).

    Returns
    -------
    np.ndarray of float32, shape ``shape``
    """
    noise = rng.standard_normal(shape, dtype=np.float32)
    sigma_voxels = [sigma_mm / s for s in spacing]
    field = ndimage.gaussian_filter(noise, sigma_voxels, mode="wrap", truncate=3.0)
    field -= field.mean()
    std = float(field.std())
    return field / std if std > 0 else field


def bias_field(shape: Shape3, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Multiplicative low-order polynomial bias, as receive-coil sensitivity gives in MR.

    A random quadratic in normalised coordinates, exponentiated so it stays positive, scaled so
    that it spans about ``1 +- strength`` over the volume.

    Returns
    -------
    np.ndarray of float32, shape ``shape``, mean about 1
    """
    coords = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    z, y, x = coords[0][:, None, None], coords[1][None, :, None], coords[2][None, None, :]
    terms = [z, y, x, z * y, y * x, z * x, y * y, x * x]
    weights = rng.normal(0.0, 1.0, len(terms)).astype(np.float32)
    log_bias = sum(w * t for w, t in zip(weights, terms))
    log_bias = np.broadcast_to(log_bias, shape).astype(np.float32)
    spread = float(np.abs(log_bias).max()) or 1.0
    return np.exp(log_bias * (np.log1p(strength) / spread)).astype(np.float32)


def rician_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the image plus complex Gaussian noise, as MR magnitude images have."""
    real = image + rng.normal(0.0, sigma, image.shape).astype(np.float32)
    imaginary = rng.normal(0.0, sigma, image.shape).astype(np.float32)
    return np.sqrt(real * real + imaginary * imaginary).astype(np.float32)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3x3 rotation matrix (QR of a Gaussian matrix, sign-corrected)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def ellipsoid_level(
    grid: tuple[np.ndarray, np.ndarray, np.ndarray],
    centre: np.ndarray,
    semi_axes: np.ndarray,
    rotation: np.ndarray,
) -> np.ndarray:
    """Normalised ellipsoid radius at every grid point (< 1 inside).

    Parameters
    ----------
    grid
        Physical ``(z, y, x)`` coordinates (mm), each of the full volume shape or broadcastable.
    centre, semi_axes : np.ndarray, shape (3,)
        In mm, ``(z, y, x)`` order; the semi-axes are along the rotated frame's axes.
    rotation : np.ndarray, shape (3, 3)
        Columns are the ellipsoid's axes in ``(z, y, x)`` coordinates.
    """
    offsets = [g - c for g, c in zip(grid, centre)]
    total = 0.0
    for axis in range(3):
        along = (
            offsets[0] * rotation[0, axis] + offsets[1] * rotation[1, axis] + offsets[2] * rotation[2, axis]
        )
        total = total + (along / semi_axes[axis]) ** 2
    return np.sqrt(total).astype(np.float32)


def box_around(
    centre_mm: np.ndarray, reach_mm: float | np.ndarray, shape: Shape3, spacing: Spacing3
) -> tuple[slice, slice, slice] | None:
    """Voxel slices of the box within ``reach_mm`` of a point, clipped to the volume (None if outside)."""
    low = np.floor((centre_mm - reach_mm) / np.asarray(spacing)).astype(int)
    high = np.ceil((centre_mm + reach_mm) / np.asarray(spacing)).astype(int) + 1
    low = np.maximum(low, 0)
    high = np.minimum(high, shape)
    if np.any(high <= low):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high))
