"""Surface mesh of a vessel mask in world coordinates: marching cubes, light Taubin smoothing, binary STL.

Marching cubes (scikit-image) runs on voxel indices; the vertices are then mapped to world
coordinates with the image's origin, spacing and direction, so the mesh overlays the scan in
3D Slicer or ParaView (ITK's physical frame, LPS for DICOM-derived images; Slicer reads STL as
LPS). Taubin's lambda/mu smoothing (trimesh) removes the voxel staircase without shrinking
the vessels as plain Laplacian smoothing does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mipseg import io
from mipseg.analysis.geometry import index_to_world

SMOOTHING_ITERATIONS = 10
TAUBIN_LAMBDA = 0.5
TAUBIN_MU = -0.53


def surface_mesh(
    mask: np.ndarray,
    geometry: io.Geometry,
    offset_zyx: Sequence[int] = (0, 0, 0),
    smoothing_iterations: int = SMOOTHING_ITERATIONS,
):
    """Closed triangle mesh of the mask's surface, in world mm, outward normals.

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

    Returns
    -------
    trimesh.Trimesh
    """
    import trimesh
    from skimage.measure import marching_cubes

    # One voxel of background around the crop closes vessels cut by the crop or the image edge.
    padded = np.pad(mask, 1).astype(np.float32)
    vertices, faces, _, _ = marching_cubes(padded, level=0.5, allow_degenerate=False)
    vertices += np.asarray(offset_zyx, float) - 1.0
    mesh = trimesh.Trimesh(index_to_world(vertices, geometry), faces, process=True)
    if smoothing_iterations > 0:
        trimesh.smoothing.filter_taubin(
            mesh, lamb=TAUBIN_LAMBDA, nu=-TAUBIN_MU, iterations=smoothing_iterations
        )
    if mesh.volume < 0:
        # The direction matrix may be a reflection (negative determinant), which turns faces inside out.
        mesh.invert()
    return mesh


def write_stl(mesh, path: str | Path) -> Path:
    """Binary STL, written atomically."""
    with io.atomic_path(path) as tmp:
        mesh.export(str(tmp), file_type="stl")
    return Path(path)
