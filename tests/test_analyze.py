"""mipseg_analyze: accuracy on a synthetic tree, world coordinates, outputs, --continue, bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from mipseg import io
from mipseg.analysis.accuracy import clip_to_mask, compare_with_truth, drop_thin_segments, true_branches
from mipseg.analysis.analyze_api import analyze_folder, analyze_mask
from mipseg.analysis.geometry import index_to_world
from mipseg.analysis.mesh import read_stl
from mipseg.cli.analyze import app
from mipseg.synthetic import make_vessel_volume, make_vessel_volume_with_centrelines
from mipseg.synthetic.vessels import draw_vessels

# A rotation about an oblique axis followed by a reflection of x: non-identity, determinant -1.
_ANGLE = 0.6
_ROTATION = np.array(
    [
        [np.cos(_ANGLE), -np.sin(_ANGLE), 0.0],
        [np.sin(_ANGLE) * np.cos(0.4), np.cos(_ANGLE) * np.cos(0.4), -np.sin(0.4)],
        [np.sin(_ANGLE) * np.sin(0.4), np.cos(_ANGLE) * np.sin(0.4), np.cos(0.4)],
    ]
)
OBLIQUE = io.Geometry(
    spacing=(0.5, 0.7, 2.0),  # x, y, z: anisotropic
    origin=(-30.0, 12.5, 104.0),
    direction=tuple((_ROTATION @ np.diag([-1.0, 1.0, 1.0])).ravel()),
)


@pytest.fixture(scope="module")
def synthetic_tree():
    """One resolved synthetic tree (segments of radius >= 1 voxel), its label and true branches."""
    shape, spacing = (40, 64, 64), (1.0, 1.0, 1.0)
    _, _, trees = make_vessel_volume_with_centrelines(shape, spacing, np.random.default_rng(3))
    tree = drop_thin_segments(trees, 1.0)[2]
    label = draw_vessels([tree], shape, spacing, 1.0)[2].astype(bool)
    truth = clip_to_mask(true_branches([tree]), label, spacing)
    return label, truth, spacing


def test_generator_centrelines_leave_the_volume_unchanged():
    image, label = make_vessel_volume((24, 40, 40), (1.0, 1.0, 1.0), np.random.default_rng(5))
    again_image, again_label, trees = make_vessel_volume_with_centrelines(
        (24, 40, 40), (1.0, 1.0, 1.0), np.random.default_rng(5)
    )
    assert np.array_equal(image, again_image) and np.array_equal(label, again_label)
    for tree in trees:
        assert len(tree.segment) == len(tree.positions) and tree.parent[0] == -1
        assert np.all(tree.parent[1:] < np.arange(1, len(tree.parent)))
    # the drawn label holds the true centreline: most points fall on vessel voxels
    points = np.concatenate([tree.positions for tree in trees])
    index = np.clip(np.round(points).astype(int), 0, np.asarray(label.shape) - 1)
    assert label[tuple(index.T)].mean() > 0.9


def test_synthetic_tree_branches_radii_and_centreline(synthetic_tree):
    label, truth, spacing = synthetic_tree
    graph, branches, measures, _ = analyze_mask(label, io.Geometry.identity(spacing))
    result = compare_with_truth(graph, truth, spacing)
    assert len(truth) >= 5
    assert abs(result["measured_branches"] - len(truth)) <= 0.1 * len(truth)
    assert result["found_fraction"] == 1.0 and result["false_branches"] == 0
    assert result["centreline_distance_voxels"] < 1.0
    wide = [row for row in result["radius_classes"] if row["radius_voxels"] != "0-1" and row["branches"]]
    errors = np.concatenate([[row["mean_abs_error_voxels"]] * row["branches"] for row in wide])
    assert len(errors) >= 4 and errors.mean() < 0.5
    assert measures["branches"] == len(branches) == graph.num_branches
    assert measures["branch_points"] >= 2 and measures["components"] == 1
    assert measures["vessel_volume_mm3"] == pytest.approx(label.sum())
    for row in branches:
        assert row["tortuosity"] >= 1.0 - 1e-9
        assert row["min_radius_mm"] <= row["mean_radius_mm"] <= row["max_radius_mm"]


def _tube(shape=(24, 40, 60), radius_mm=2.5, spacing_zyx=(2.0, 0.7, 0.5)):
    """Straight tube along x (voxels 8..51) through (z, y) = centre, radius in mm."""
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    centre = (np.asarray(shape) - 1) / 2
    distance = np.hypot((z - centre[0]) * spacing_zyx[0], (y - centre[1]) * spacing_zyx[1])
    return (distance <= radius_mm) & (x >= 8) & (x <= 51)


def test_world_coordinates_of_graph_and_mesh_follow_the_image_geometry(tmp_path):
    mask = _tube()
    io.write_image(mask.astype(np.uint8), OBLIQUE, tmp_path / "in" / "tube.nii.gz")
    summary = analyze_folder(tmp_path / "in", tmp_path / "out")
    image = sitk.ReadImage(str(tmp_path / "in" / "tube.nii.gz"))
    graph = json.loads((tmp_path / "out" / "tube_graph.json").read_text())

    for node in graph["nodes"]:
        expected = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in node["voxel_zyx"][::-1]])
        assert np.allclose(node["world_mm"], expected, atol=1e-3)
    assert [e["kind"] for e in graph["edges"]] == ["end-end"]
    edge = graph["edges"][0]
    # the centreline ends lie on the tube axis, inside its two end caps (mm along x: 8 and 51)
    ends = np.asarray(
        [graph["nodes"][edge["source"]]["voxel_zyx"], graph["nodes"][edge["target"]]["voxel_zyx"]]
    )
    assert np.allclose(ends[:, :2], [[11.5, 19.5]] * 2, atol=1.0)
    assert ends[:, 2].min() >= 8 and ends[:, 2].max() <= 51
    assert edge["length_mm"] == pytest.approx(edge["chord_mm"], rel=0.02)
    assert edge["length_mm"] == pytest.approx(abs(ends[1, 2] - ends[0, 2]) * 0.5, rel=0.02)
    # within half of the 2-mm slice: the tube is two slices (4 mm) thick in z, its skeleton in one of them
    assert edge["mean_radius_mm"] == pytest.approx(2.5, abs=1.0)
    points = np.asarray(edge["points_world_mm"])
    assert np.allclose(points, index_to_world(_world_to_index(points, image), OBLIQUE), atol=1e-3)

    mesh = read_stl(tmp_path / "out" / "tube.stl")
    # closed and consistently wound: every directed edge once, its reverse once
    edges = np.concatenate([mesh.faces[:, [0, 1]], mesh.faces[:, [1, 2]], mesh.faces[:, [2, 0]]])
    assert len(np.unique(edges, axis=0)) == len(edges)
    assert set(map(tuple, edges)) == set(map(tuple, edges[:, ::-1]))
    voxel_volume = float(np.prod(OBLIQUE.spacing))
    assert mesh.volume == pytest.approx(mask.sum() * voxel_volume, rel=0.1)
    assert summary["cases"][0]["vessel_volume_mm3"] == pytest.approx(mask.sum() * voxel_volume)
    # every vertex maps back into the tube's voxel box (within a voxel after smoothing)
    index = _world_to_index(mesh.vertices, image)
    nonzero = np.argwhere(mask)
    assert np.all(index >= nonzero.min(axis=0) - 1.0) and np.all(index <= nonzero.max(axis=0) + 1.0)
    # outward normals although the direction is a reflection
    assert mesh.volume > 0


def _world_to_index(points: np.ndarray, image: sitk.Image) -> np.ndarray:
    return np.asarray(
        [image.TransformPhysicalPointToContinuousIndex(list(map(float, p)))[::-1] for p in points]
    )


def test_outputs_summary_and_continue(tmp_path, synthetic_tree):
    label = synthetic_tree[0]
    geometry = io.Geometry.identity((1.0, 1.0, 1.0))
    io.write_image(label.astype(np.uint8) * 2, geometry, tmp_path / "in" / "case_a.nii.gz")
    result = CliRunner().invoke(
        app, ["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--label", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "case_a:" in result.output and "branches" in result.output and "mean radius" in result.output
    out = tmp_path / "out"
    for name in ("_branches.csv", "_graph.json", "_centreline.nii.gz", ".stl", "_qc.png"):
        assert (out / f"case_a{name}").is_file(), name
    rows = list(csv.DictReader((out / "case_a_branches.csv").open()))
    centreline, centreline_geometry = io.read_image(out / "case_a_centreline.nii.gz")
    assert centreline_geometry.matches(geometry) and centreline.shape == label.shape
    assert sorted(np.unique(centreline[centreline > 0]).tolist()) == [int(r["branch"]) for r in rows]
    assert np.all(label[centreline > 0])
    with open(out / "summary.csv") as handle:
        assert next(csv.DictReader(handle))["branches"] == str(len(rows))

    graph_file = out / "case_a_graph.json"
    before = graph_file.stat().st_mtime_ns
    (out / "case_a_qc.png").unlink()
    io.write_image(label.astype(np.uint8), geometry, tmp_path / "in" / "case_b.nii.gz")
    result = CliRunner().invoke(
        app, ["-i", str(tmp_path / "in"), "-o", str(out), "--label", "1", "--continue"]
    )
    # case_a lacks its QC picture, so it is analysed again (now with --label 1: empty -> reported)
    assert result.exit_code == 2
    assert "case_a" in result.output and "no voxel of label 1" in result.output
    assert (out / "case_b_graph.json").is_file()
    io.write_image(label.astype(np.uint8), geometry, tmp_path / "in" / "case_a.nii.gz")
    result = CliRunner().invoke(app, ["-i", str(tmp_path / "in"), "-o", str(out), "--continue"])
    assert result.exit_code == 0, result.output
    assert graph_file.stat().st_mtime_ns != before
    again = out / "case_b_graph.json"
    stamp = again.stat().st_mtime_ns
    result = CliRunner().invoke(app, ["-i", str(tmp_path / "in"), "-o", str(out), "--continue"])
    assert result.exit_code == 0 and again.stat().st_mtime_ns == stamp
    assert len(json.loads((out / "summary.json").read_text())["cases"]) == 2


def _run(tmp_path, array, geometry=None, name="case.nii.gz", extra=()):
    folder = tmp_path / "in"
    io.write_image(array, geometry or io.Geometry.identity(), folder / name)
    return CliRunner().invoke(app, ["-i", str(folder), "-o", str(tmp_path / "out"), *extra])


def test_empty_mask_is_one_line_and_exit_2(tmp_path):
    result = _run(tmp_path, np.zeros((8, 16, 16), np.uint8))
    assert result.exit_code == 2 and "empty mask" in result.output


def test_non_binary_map_needs_label(tmp_path):
    array = np.zeros((8, 16, 16), np.uint8)
    array[4, 4:12, 8] = 1
    array[2, 4:12, 4] = 2
    result = _run(tmp_path, array)
    assert result.exit_code == 2 and "not a binary mask" in result.output and "--label" in result.output
    assert _run(tmp_path, array, extra=("--label", "2")).exit_code == 0


def test_probability_map_is_rejected(tmp_path):
    result = _run(tmp_path, np.full((8, 16, 16), 0.4, np.float32))
    assert result.exit_code == 2 and "non-integer" in result.output


def test_wrong_geometry_is_rejected(tmp_path):
    array = np.zeros((8, 16, 16), np.uint8)
    array[4, 4:12, 8] = 1
    sheared = io.Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0.5, 0, 0, 1, 0, 0, 0, 1))
    result = _run(tmp_path, array, sheared, name="case.mha")
    assert result.exit_code == 2 and "not orthonormal" in result.output


def test_unreadable_file_and_missing_folder(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "broken.nii.gz").write_bytes(b"not an image")
    result = CliRunner().invoke(app, ["-i", str(folder), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "broken" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["-i", str(tmp_path / "nowhere"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "no such folder" in result.output
    result = CliRunner().invoke(app, ["-i", str(folder), "-o", str(folder)])
    assert result.exit_code == 2 and "must differ" in result.output
