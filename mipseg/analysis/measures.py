"""What vascular researchers measure: per branch (length, radii, tortuosity) and per case (totals, density).

All lengths in mm and volumes in mm^3, from the voxel spacing; end points in world
coordinates. The radius of a branch is taken away from its branch points: within a radius of a
junction the distance transform measures the junction's width, not the vessel's, so those
voxels are left out of the branch's mean, minimum and maximum (unless nothing else is left).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from mipseg.analysis.geometry import index_to_world
from mipseg.analysis.skeleton import CentrelineGraph
from mipseg.io import Geometry

BRANCH_COLUMNS = (
    "branch",
    "start_node",
    "end_node",
    "kind",
    "length_mm",
    "chord_mm",
    "tortuosity",
    "mean_radius_mm",
    "min_radius_mm",
    "max_radius_mm",
    "start_x_mm",
    "start_y_mm",
    "start_z_mm",
    "end_x_mm",
    "end_y_mm",
    "end_z_mm",
    "num_voxels",
)
KINDS = {(1, 1): "end-end", (1, 3): "end-junction", (3, 3): "junction-junction"}


def radius_voxels(graph: CentrelineGraph, branch: int, spacing_zyx) -> np.ndarray:
    """Indices into ``graph.points`` whose radius describes ``branch``: junction neighbourhoods left out."""
    path = graph.branches[branch]
    spacing = np.asarray(spacing_zyx, float)
    keep = np.ones(len(path), bool)
    for node in set(graph.branch_nodes[branch].tolist()):
        if graph.node_degrees[node] < 3:
            continue
        centre = graph.node_positions[node] * spacing
        reach = np.linalg.norm(graph.points[path] * spacing - centre, axis=1)
        nearest = int(np.argmin(reach))
        keep &= reach > graph.radii[path[nearest]]
    return path[keep] if keep.any() else path


def branch_measures(graph: CentrelineGraph, geometry: Geometry) -> list[dict[str, Any]]:
    """One row per branch (keys :data:`BRANCH_COLUMNS`), branches numbered from 1."""
    spacing = np.asarray(geometry.spacing_zyx, float)
    world_nodes = index_to_world(graph.node_positions, geometry)
    rows = []
    for index, path in enumerate(graph.branches):
        start, end = (int(n) for n in graph.branch_nodes[index])
        chord = float(np.linalg.norm(world_nodes[end] - world_nodes[start]))
        length = float(graph.branch_lengths[index])
        radii = graph.radii[radius_voxels(graph, index, spacing)]
        rows.append(
            {
                "branch": index + 1,
                "start_node": start,
                "end_node": end,
                "kind": _kind(graph, start, end),
                "length_mm": length,
                "chord_mm": chord,
                "tortuosity": length / chord if chord > 0 else float("nan"),
                "mean_radius_mm": float(radii.mean()),
                "min_radius_mm": float(radii.min()),
                "max_radius_mm": float(radii.max()),
                **dict(zip(("start_x_mm", "start_y_mm", "start_z_mm"), world_nodes[start].tolist())),
                **dict(zip(("end_x_mm", "end_y_mm", "end_z_mm"), world_nodes[end].tolist())),
                "num_voxels": len(path),
            }
        )
    return rows


def case_measures(
    mask: np.ndarray,
    graph: CentrelineGraph,
    branches: list[dict[str, Any]],
    geometry: Geometry,
    image_shape: tuple[int, int, int],
) -> dict[str, Any]:
    """Totals of one case.

    Parameters
    ----------
    mask : np.ndarray of bool, shape (z, y, x)
        The vessel mask (cropped or not: only its voxel count and components are used).
    graph, branches
        Its centreline graph and :func:`branch_measures`.
    geometry, image_shape
        Geometry and ``(z, y, x)`` shape of the whole image: its field of view is the reference
        volume of the densities.

    Returns
    -------
    dict
        ``branches``, ``branch_points`` (nodes of degree >= 3), ``end_points``, ``components``
        (26-connected pieces of the mask), ``total_length_mm``, ``vessel_volume_mm3``,
        ``mean_radius_mm`` (branch mean radii weighted by length), ``volume_fraction`` (vessel
        volume over field-of-view volume) and ``length_density_mm_per_mm3`` (total length over
        field-of-view volume).
    """
    voxel_volume = float(np.prod(geometry.spacing))
    field_of_view = voxel_volume * float(np.prod(image_shape))
    _, components = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    lengths = np.asarray([row["length_mm"] for row in branches], float)
    radii = np.asarray([row["mean_radius_mm"] for row in branches], float)
    total_length = float(lengths.sum())
    volume = float(np.count_nonzero(mask)) * voxel_volume
    return {
        "branches": graph.num_branches,
        "branch_points": int(np.count_nonzero(graph.node_degrees >= 3)),
        "end_points": int(np.count_nonzero(graph.node_degrees == 1)),
        "components": int(components),
        "total_length_mm": total_length,
        "vessel_volume_mm3": volume,
        "mean_radius_mm": float((lengths * radii).sum() / total_length) if total_length > 0 else float("nan"),
        "volume_fraction": volume / field_of_view,
        "length_density_mm_per_mm3": total_length / field_of_view,
    }


def _kind(graph: CentrelineGraph, start: int, end: int) -> str:
    if start == end:
        return "loop"
    degrees = tuple(sorted(min(int(graph.node_degrees[n]), 3) for n in (start, end)))
    return KINDS.get(degrees, "loop")
