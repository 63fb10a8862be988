"""QC picture: maximum intensity projection of the mask with the centrelines coloured by radius."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mipseg import io
from mipseg.analysis.graph import CentrelineGraph

COLOUR_MAP = "turbo"


def qc_picture(
    mask: np.ndarray,
    graph: CentrelineGraph,
    spacing_zyx: tuple[float, float, float],
    path: str | Path,
    title: str,
    axis: int = 0,
) -> Path:
    """Write a PNG of the mask's MIP along numpy ``axis`` with the centreline voxels on top.

    Parameters
    ----------
    mask : np.ndarray of bool, shape (z, y, x)
        The whole vessel mask.
    graph
        Its centreline graph, in voxel coordinates of ``mask``.
    spacing_zyx
        Voxel spacing (mm); pixels are drawn with their physical aspect ratio.
    title
        Line above the picture (case name and totals).
    axis
        Projection axis (0 = z: the axial MIP).

    Notes
    -----
    Centreline voxels are drawn thinnest first, so where vessels overlap in projection the
    thicker one stays visible; branch points are white rings, end points are not marked.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    rows_axis, columns_axis = [a for a in range(3) if a != axis]
    projection = mask.max(axis=axis)
    row_mm, column_mm = spacing_zyx[rows_axis], spacing_zyx[columns_axis]
    height, width = projection.shape[0] * row_mm, projection.shape[1] * column_mm
    scale = 7.0 / max(height, width)
    figure = Figure(figsize=(width * scale + 1.6, height * scale + 0.8))
    FigureCanvasAgg(figure)
    ax = figure.add_axes((0.1, 0.08, 0.68, 0.84))
    extent = (-0.5 * column_mm, width - 0.5 * column_mm, height - 0.5 * row_mm, -0.5 * row_mm)
    ax.imshow(projection, cmap="gray", vmin=0, vmax=2.5, extent=extent, interpolation="nearest")
    order = np.argsort(graph.radii, kind="stable")
    points = graph.points[order]
    radii = graph.radii[order]
    norm = Normalize(vmin=0.0, vmax=float(radii.max()) if len(radii) else 1.0)
    dots = ax.scatter(
        points[:, columns_axis] * column_mm,
        points[:, rows_axis] * row_mm,
        c=radii,
        cmap=COLOUR_MAP,
        norm=norm,
        s=max(1.0, 2000.0 / max(projection.shape)),
        linewidths=0,
    )
    junctions = graph.node_degrees >= 3
    ax.scatter(
        graph.node_positions[junctions, columns_axis] * column_mm,
        graph.node_positions[junctions, rows_axis] * row_mm,
        s=12,
        facecolors="none",
        edgecolors="white",
        linewidths=0.6,
    )
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    names = "zyx"
    ax.set_xlabel(f"{names[columns_axis]} (mm)")
    ax.set_ylabel(f"{names[rows_axis]} (mm)")
    ax.set_title(title, fontsize=9)
    colour_axis = figure.add_axes((0.82, 0.1, 0.03, 0.75))
    figure.colorbar(dots, cax=colour_axis, label="radius (mm)")
    with io.atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    return Path(path)
