"""Surface mesh of a vessel mask in world coordinates: marching cubes, Taubin smoothing, binary STL.

Marching cubes (scikit-image) runs on voxel indices; the vertices are then mapped to world
coordinates with the image's origin, spacing and direction, so the mesh overlays the scan in
3D Slicer or ParaView (ITK's physical frame, LPS for DICOM-derived images, which is what
Slicer assumes for STL). Taubin's lambda/mu smoothing removes the voxel staircase without
shrinking the vessels as plain Laplacian smoothing does.

Smoothing and the STL writer are a few lines of scipy.sparse and numpy rather than trimesh:
on the 512 x 512 x 300 benchmark mask trimesh's Laplacian, vertex merging and volume took
35 s of the one-minute budget, these take about 3 s (documentation/analyze.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import sparse

from mipseg import io
from mipseg.analysis.geometry import index_to_world

SMOOTHING_ITERATIONS = 10
TAUBIN_LAMBDA = 0.5
TAUBIN_MU = -0.53
STL_RECORD = np.dtype([("normal", "<f4", (3,)), ("vertices", "<f4", (3, 3)), ("attribute", "<u2")])


@dataclass(frozen=True)
class Mesh:
    """Triangle mesh: ``vertices`` (n, 3) world ``(x, y, z)`` mm, ``faces`` (m, 3) vertex indices."""

    vertices: np.ndarray
    faces: np.ndarray

    @property
    def volume(self) -> float:
        """Signed enclosed volume (mm^3); positive when the faces wind outwards."""
        a, b, c = (self.vertices[self.faces[:, k]] for k in range(3))
        return float(np.einsum("ij,ij->", a, np.cross(b, c)) / 6.0)


def surface_mesh(
    mask: np.ndarray,
    geometry: io.Geometry,
    offset_zyx: Sequence[int] = (0, 0, 0),
    smoothing_iterations: int = SMOOTHING_ITERATIONS,
) -> Mesh:
    """Closed triangle mesh of the mask's surface, in world mm, faces wound outwards.

    Parameters
    ----------
    mask : np.ndarray of bool, shape (z, y, x)
        The vessel mask, possibly a crop of the image.
    geometry
        Geometry of the whole image.
    offset_zyx
        Index of the crop's first voxel in the whole image.
    smoothing_iterations
        Taubin iterations (0 = the raw marching-cubes surface).
    """
    from skimage.measure import marching_cubes

    # One voxel of background around the crop closes vessels cut by the crop or the image edge.
    padded = np.pad(mask, 1).astype(np.float32)
    vertices, faces, _, _ = marching_cubes(padded, level=0.5, allow_degenerate=False)
    del padded
    vertices = vertices.astype(float) + (np.asarray(offset_zyx, float) - 1.0)
    mesh = Mesh(index_to_world(vertices, geometry), faces.astype(np.int64))
    if smoothing_iterations > 0:
        mesh = Mesh(taubin_smooth(mesh.vertices, mesh.faces, smoothing_iterations), mesh.faces)
    if mesh.volume < 0:
        # A direction with negative determinant (a reflection) turns the faces inside out.
        mesh = Mesh(mesh.vertices, mesh.faces[:, ::-1].copy())
    return mesh


def taubin_smooth(vertices: np.ndarray, faces: np.ndarray, iterations: int) -> np.ndarray:
    """Taubin (1995) lambda/mu smoothing with the umbrella operator (equal neighbour weights).

    Parameters
    ----------
    vertices : np.ndarray, shape (n, 3)
    faces : np.ndarray of int, shape (m, 3)
    iterations
        Pairs of a shrinking (lambda) and an inflating (mu) step.
    """
    n = len(vertices)
    # In a closed, consistently wound mesh every edge is used once in each direction, so the
    # directed face edges list each neighbour pair once per vertex: a symmetric adjacency.
    first = faces.ravel()
    second = np.roll(faces, -1, axis=1).ravel()
    degree = np.bincount(first, minlength=n).astype(np.float32)
    weights = (1.0 / np.maximum(degree, 1.0))[first]
    umbrella = sparse.csr_matrix((weights, (first, second)), shape=(n, n))
    smoothed = vertices.astype(np.float32)
    for _ in range(iterations):
        for weight in (TAUBIN_LAMBDA, TAUBIN_MU):
            smoothed += np.float32(weight) * (umbrella @ smoothed - smoothed)
    return smoothed.astype(float)


def write_stl(mesh: Mesh, path: str | Path) -> Path:
    """Binary STL (float32 little-endian, facet normals from the winding), written atomically."""
    records = np.zeros(len(mesh.faces), STL_RECORD)
    corners = mesh.vertices.astype(np.float32)[mesh.faces]
    normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    lengths = np.linalg.norm(normals, axis=1, keepdims=True)
    records["normal"] = normals / np.where(lengths > 0, lengths, 1.0)
    records["vertices"] = corners
    header = b"mipseg_analyze surface, world coordinates in mm (ITK physical frame)".ljust(80, b" ")
    with io.atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(header)
        handle.write(np.uint32(len(records)).tobytes())
        handle.write(records.tobytes())
    return Path(path)


def read_stl(path: str | Path) -> Mesh:
    """Read a binary STL written by :func:`write_stl` (corners merged into shared vertices)."""
    data = Path(path).read_bytes()
    count = int(np.frombuffer(data, "<u4", count=1, offset=80)[0])
    records = np.frombuffer(data, STL_RECORD, count=count, offset=84)
    corners = records["vertices"].reshape(-1, 3).astype(float)
    vertices, inverse = np.unique(corners, axis=0, return_inverse=True)
    return Mesh(vertices, inverse.reshape(-1, 3))
