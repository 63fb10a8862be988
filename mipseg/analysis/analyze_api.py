"""The analysis stage behind ``mipseg_analyze``: vessel masks in, centreline graphs and measures out.

Per case (a label map from ``mipseg_predict`` or any mask SimpleITK reads) it writes
``{case}_branches.csv``, ``{case}_centreline.nii.gz``, ``{case}.stl``, ``{case}_qc.png`` and,
last, ``{case}_graph.json``, each atomically; the folder gets ``summary.csv`` and
``summary.json``. A case whose graph.json exists with the other files is finished, which is
what ``resume`` skips. Bad cases are listed at the end; the others are still analysed.
"""

from __future__ import annotations

import csv
import io as text_io
from pathlib import Path
from typing import Any

import numpy as np
from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice, get_bbox_from_mask, pad_bbox

from mipseg import io
from mipseg.analysis import DEFAULT_SPUR_FACTOR
from mipseg.analysis.geometry import check_geometry, index_to_world
from mipseg.analysis.graph import CentrelineGraph
from mipseg.analysis.measures import BRANCH_COLUMNS, branch_measures, case_measures
from mipseg.analysis.skeleton import centreline_graph
from mipseg.errors import InputError
from mipseg.planning.parallel import map_with_progress

SUMMARY_NAME = "summary.json"
SUMMARY_CSV_NAME = "summary.csv"
COORDINATES_NOTE = (
    "world (x, y, z) in mm = origin + direction @ (spacing * voxel index (x, y, z)), the frame of the "
    "image header (ITK physical space; LPS for images from DICOM)"
)


def output_paths(output_dir: str | Path, case_id: str, mesh: bool = True) -> dict[str, Path]:
    """Files written for one case; ``graph`` is written last and marks the case finished."""
    output_dir = Path(output_dir)
    paths = {
        "branches": output_dir / f"{case_id}_branches.csv",
        "centreline": output_dir / f"{case_id}_centreline.nii.gz",
        "qc": output_dir / f"{case_id}_qc.png",
    }
    if mesh:
        paths["mesh"] = output_dir / f"{case_id}.stl"
    paths["graph"] = output_dir / f"{case_id}_graph.json"
    return paths


def discover_masks(input_path: str | Path) -> list[tuple[str, Path]]:
    """``(case_id, file)`` for one mask file or every image file of a folder, sorted by case id."""
    input_path = Path(input_path)
    if input_path.is_file():
        files = [input_path]
    elif input_path.is_dir():
        files = sorted(
            p
            for p in input_path.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(io.IMAGE_ENDINGS)
        )
        if not files:
            raise InputError(f"{input_path}: no mask files ({', '.join(io.IMAGE_ENDINGS)})")
    else:
        raise InputError(f"{input_path}: no such folder or file")
    cases = [(p.name[: len(p.name) - len(io.compound_suffix(p))], p) for p in files]
    seen: dict[str, Path] = {}
    for case_id, path in cases:
        if case_id in seen:
            raise InputError(f"{path}: case {case_id} also given as {seen[case_id].name}")
        seen[case_id] = path
    return sorted(cases)


def vessel_mask(array: np.ndarray, path: str | Path, label: int | None) -> np.ndarray:
    """Boolean vessel mask of a label map: ``== label``, or the map itself when it is binary.

    Raises
    ------
    InputError
        Non-integer values, several labels without ``label``, or no vessel voxel.
    """
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        if not np.array_equal(np.rint(array), array):
            raise InputError(f"{path}: holds non-integer values (dtype {array.dtype}); expected a label map")
    if label is None:
        # min/max instead of np.unique: sorting a 512 x 512 x 300 volume costs seconds
        if array.size and (array.min() < 0 or array.max() > 1):
            raise InputError(
                f"{path}: not a binary mask (values {_some_values(array)}); "
                "choose the vessel class with --label"
            )
        mask = array.astype(bool, copy=False)
    else:
        mask = array == label
    if not mask.any():
        what = "empty mask" if label is None else f"no voxel of label {label} (values: {_some_values(array)})"
        raise InputError(f"{path}: {what}; nothing to analyse")
    return mask


def _some_values(array: np.ndarray) -> str:
    values = np.unique(array)
    return ", ".join(f"{v:g}" for v in values[:8]) + (", ..." if len(values) > 8 else "")


def analyze_mask(
    mask: np.ndarray, geometry: io.Geometry, *, spur_factor: float = DEFAULT_SPUR_FACTOR
) -> tuple[CentrelineGraph, list[dict[str, Any]], dict[str, Any], tuple[slice, ...]]:
    """Centreline graph, branch rows and case measures of one boolean ``(z, y, x)`` mask.

    The work runs on the mask's bounding box (plus one voxel), so time and memory follow the
    vessels, not the field of view.

    Returns
    -------
    graph
        In voxel coordinates of the whole image.
    branches
        :func:`~mipseg.analysis.measures.branch_measures` rows.
    measures
        :func:`~mipseg.analysis.measures.case_measures`.
    crop
        The bounding-box slices the work ran on.
    """
    box = pad_bbox(get_bbox_from_mask(mask), 1, mask.shape)
    crop = bounding_box_to_slice(box)
    cropped = np.ascontiguousarray(mask[crop])
    graph = centreline_graph(cropped, geometry.spacing_zyx, spur_factor=spur_factor)
    graph = graph.shifted([start for start, _ in box])
    branches = branch_measures(graph, geometry)
    measures = case_measures(cropped, graph, branches, geometry, mask.shape)
    return graph, branches, measures, crop


def analyze_case(
    path: str | Path,
    output_dir: str | Path,
    case_id: str,
    *,
    label: int | None = None,
    spur_factor: float = DEFAULT_SPUR_FACTOR,
    mesh: bool = True,
    qc_axis: int = 0,
) -> dict[str, Any]:
    """Analyse one mask file and write its outputs (:func:`output_paths`); returns its case measures."""
    from mipseg.analysis.mesh import surface_mesh, write_stl
    from mipseg.analysis.qc import qc_picture

    array, geometry = io.read_image(path)
    check_geometry(geometry, path)
    mask = vessel_mask(array, path, label)
    del array
    graph, branches, measures, crop = analyze_mask(mask, geometry, spur_factor=spur_factor)
    paths = output_paths(output_dir, case_id, mesh)
    _write_branches_csv(branches, paths["branches"])
    io.write_image(_centreline_labels(graph, mask.shape), geometry, paths["centreline"])
    if mesh:
        offset = [s.start for s in crop]
        write_stl(surface_mesh(mask[crop], geometry, offset), paths["mesh"])
    title = (
        f"{case_id}: {measures['branches']} branches, {measures['total_length_mm']:.1f} mm, "
        f"mean radius {measures['mean_radius_mm']:.2f} mm"
    )
    qc_picture(mask, graph, geometry.spacing_zyx, paths["qc"], title, axis=qc_axis)
    settings = {"label": label, "spur_factor": spur_factor}
    io.write_json(
        _graph_document(case_id, path, geometry, mask.shape, graph, branches, measures, settings),
        paths["graph"],
    )
    return measures


def case_is_done(output_dir: str | Path, case_id: str, mesh: bool = True) -> bool:
    """True if every output of the case exists (graph.json is written last)."""
    return all(p.is_file() for p in output_paths(output_dir, case_id, mesh).values())


def analyze_folder(
    input_path: str | Path,
    output_dir: str | Path,
    *,
    label: int | None = None,
    spur_factor: float = DEFAULT_SPUR_FACTOR,
    mesh: bool = True,
    qc_axis: int = 0,
    resume: bool = False,
    num_processes: int = 1,
) -> dict[str, Any]:
    """Analyse every mask of ``input_path`` (a folder or one file) into ``output_dir``.

    Parameters
    ----------
    input_path
        A folder of masks (``mipseg_predict`` output, or any image files) or one file.
    output_dir
        Where the per-case files and ``summary.csv`` / ``summary.json`` go; not the input folder.
    label
        Class to analyse in a multi-label map; ``None`` requires binary masks.
    spur_factor
        End branches shorter than this many radii are spurs (0 keeps all).
    mesh
        Write ``{case}.stl``.
    qc_axis
        Projection axis of the QC picture (numpy axis, 0 = z).
    resume
        Skip cases whose outputs all exist.
    num_processes
        Cases analysed at once (each holds its volume, distance map and skeleton in memory).

    Returns
    -------
    dict
        The summary written to ``summary.json``: ``cases`` (one entry of case measures per
        case), ``mean`` and ``settings``.

    Raises
    ------
    InputError
        Bad arguments (before any work), or after the other cases were written, one line per
        case that could not be analysed.
    """
    output_dir = Path(output_dir)
    if num_processes < 1:
        raise InputError(f"-np {num_processes}: must be at least 1")
    if spur_factor < 0:
        raise InputError(f"--spur-factor {spur_factor}: must be 0 or more")
    if qc_axis not in (0, 1, 2):
        raise InputError(f"--qc-axis {qc_axis}: must be 0, 1 or 2")
    cases = discover_masks(input_path)
    if Path(input_path).is_dir() and output_dir.resolve() == Path(input_path).resolve():
        raise InputError(f"{output_dir}: the output folder must differ from the input folder")
    output_dir.mkdir(parents=True, exist_ok=True)
    io.remove_stale_partials(
        output_dir,
        [io.file_stem(path) for case_id, _ in cases for path in output_paths(output_dir, case_id).values()],
    )
    todo = [(c, p) for c, p in cases if not (resume and case_is_done(output_dir, c, mesh))]
    tasks = [(str(p), str(output_dir), c, label, spur_factor, mesh, qc_axis) for c, p in todo]
    results = dict(
        zip([c for c, _ in todo], map_with_progress(_analyze_job, tasks, num_processes, "analysing"))
    )
    problems = [f"{case_id}: {result}" for case_id, result in results.items() if isinstance(result, str)]
    per_case = []
    for case_id, _ in cases:
        measures = results.get(case_id)
        if measures is None:
            measures = io.read_json(output_paths(output_dir, case_id, mesh)["graph"])["measures"]
        if isinstance(measures, dict):
            per_case.append({"case": case_id, **measures})
    summary = _write_summary(per_case, output_dir, {"label": label, "spur_factor": spur_factor})
    if problems:
        raise InputError([f"{len(problems)} case(s) could not be analysed:"] + problems)
    return summary


def _analyze_job(path, output_dir, case_id, label, spur_factor, mesh, qc_axis) -> dict[str, Any] | str:
    """:func:`analyze_case` in a worker; an input problem comes back as its message."""
    try:
        return analyze_case(
            path, output_dir, case_id, label=label, spur_factor=spur_factor, mesh=mesh, qc_axis=qc_axis
        )
    except InputError as error:
        return "; ".join(error.problems)


def _centreline_labels(graph: CentrelineGraph, shape: tuple[int, int, int]) -> np.ndarray:
    """Image of the centreline voxels valued by branch number (1, 2, ...); junction voxels get the last."""
    dtype = np.uint16 if graph.num_branches < np.iinfo(np.uint16).max else np.uint32
    labels = np.zeros(shape, dtype)
    for index, path in enumerate(graph.branches):
        labels[tuple(graph.points[path].T)] = index + 1
    return labels


def _write_branches_csv(rows: list[dict[str, Any]], path: Path) -> None:
    buffer = text_io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(BRANCH_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _rounded(value) for key, value in row.items()})
    with io.atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())


def _graph_document(case_id, source, geometry, shape, graph, branches, measures, settings) -> dict[str, Any]:
    """The JSON graph: nodes with world coordinates, edges with the branch measures and polylines."""
    world_nodes = index_to_world(graph.node_positions, geometry)
    world_points = index_to_world(graph.points, geometry)
    kinds = {0: "loop", 1: "end", 2: "loop"}  # degree 2 is left only where a loop meets itself
    nodes = [
        {
            "id": node,
            "kind": kinds.get(int(degree), "branch" if degree >= 3 else "end"),
            "degree": int(degree),
            "radius_mm": _rounded(float(graph.node_radii[node])),
            "world_mm": [_rounded(v) for v in world_nodes[node]],
            "voxel_zyx": [_rounded(v) for v in graph.node_positions[node]],
        }
        for node, degree in enumerate(graph.node_degrees)
    ]
    edges = []
    for row, path in zip(branches, graph.branches):
        edge = {"id": row["branch"], "source": row["start_node"], "target": row["end_node"]}
        edge.update({k: _rounded(v) for k, v in row.items() if k not in ("branch", "start_node", "end_node")})
        edge["points_world_mm"] = [[_rounded(v) for v in point] for point in world_points[path]]
        edge["radii_mm"] = [_rounded(float(r)) for r in graph.radii[path]]
        edges.append(edge)
    return {
        "case": case_id,
        "source_file": str(source),
        "coordinates": COORDINATES_NOTE,
        "geometry": geometry.to_dict(),
        "shape_zyx": list(shape),
        "settings": settings,
        "measures": {k: _rounded(v) for k, v in measures.items()},
        "nodes": nodes,
        "edges": edges,
    }


def _write_summary(
    per_case: list[dict[str, Any]], output_dir: Path, settings: dict[str, Any]
) -> dict[str, Any]:
    names = [k for k in (per_case[0] if per_case else {}) if k != "case"]
    mean = {name: _rounded(float(np.nanmean([c[name] for c in per_case]))) for name in names}
    summary = {"cases": per_case, "mean": mean, "settings": settings}
    io.write_json(summary, output_dir / SUMMARY_NAME)
    buffer = text_io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["case", *names], lineterminator="\n")
    writer.writeheader()
    for case in per_case:
        writer.writerow({k: _rounded(v) for k, v in case.items()})
    with io.atomic_path(output_dir / SUMMARY_CSV_NAME) as tmp:
        tmp.write_text(buffer.getvalue())
    return summary


def _rounded(value: Any) -> Any:
    """Floats to 4 decimals (0.1 micrometre): files stay small and diffable."""
    if isinstance(value, float | np.floating):
        return round(float(value), 4)
    if isinstance(value, np.integer):
        return int(value)
    return value
