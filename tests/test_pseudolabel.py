"""MIP back-projection: seeds, S_1, S_0, the label map, the stage's files, report and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mipseg import io
from mipseg.cli.pseudolabel import app as pseudolabel_app
from mipseg.dataset import load_dataset
from mipseg.errors import InputError
from mipseg.planning.mip import maximum_intensity_projection, ray_coordinates
from mipseg.pseudolabel import mip_backprojection as bp
from mipseg.pseudolabel.pseudolabel_api import PseudoLabelSettings, make_pseudo_labels

SHAPE = (32, 48, 48)
GEOMETRY = io.Geometry((0.7, 0.8, 1.5), (3.0, -2.0, 10.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def tube_phantom(
    rng: np.random.Generator, shape: tuple[int, int, int] = SHAPE
) -> tuple[np.ndarray, np.ndarray]:
    """Noisy tissue with four bright straight tubes (radius 1.5-2.5 voxels) and one grey blob.

    Returns the image (float32, MR-like units) and the vessel truth (bool), both (z, y, x).
    """
    grid = np.stack(np.indices(shape), axis=-1).astype(np.float32)
    extent = np.array(shape, dtype=np.float32)
    truth = np.zeros(shape, dtype=bool)
    for _ in range(4):
        a, b = rng.uniform(0.1, 0.9, 3) * extent, rng.uniform(0.1, 0.9, 3) * extent
        direction = b - a
        t = np.clip(((grid - a) @ direction) / float(direction @ direction), 0, 1)
        truth |= np.linalg.norm(grid - (a + t[..., None] * direction), axis=-1) <= rng.uniform(1.5, 2.5)
    image = rng.normal(100.0, 12.0, shape).astype(np.float32)
    image[truth] += rng.normal(320.0, 25.0, int(truth.sum()))
    blob = (np.linalg.norm(grid - extent * 0.5, axis=-1) < 4) & ~truth
    image[blob] += 150.0  # brighter than tissue, darker than vessels: not annotated, may hide vessels
    return image, truth


def simulated_annotation(image: np.ndarray, truth: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Annotation by the contract's rule (pixel = truth at the ray's brightest voxel) and the depth map."""
    _, depth = maximum_intensity_projection(image, axis)
    return truth[ray_coordinates(depth, axis)], depth


@pytest.fixture
def phantom() -> tuple[np.ndarray, np.ndarray]:
    return tube_phantom(np.random.default_rng(7))


def test_seeds_lie_on_annotated_rays_at_the_brightest_voxel(phantom) -> None:
    image, truth = phantom
    for axis in (0, 1, 2):
        annotation, depth = simulated_annotation(image, truth, axis)
        seeds = bp.seeds_from_annotation(annotation, depth, axis, image.shape)
        # exactly one seed per annotated ray, none on unannotated rays
        assert np.array_equal(seeds.sum(axis=axis), annotation.astype(int))
        # and it is the ray's brightest voxel
        seed_depth = np.argmax(seeds, axis=axis)
        assert np.array_equal(seed_depth[annotation], np.argmax(image, axis=axis)[annotation])
        assert truth[seeds].all()


def test_foreground_keeps_large_seeded_26_connected_components() -> None:
    normalized = np.zeros((8, 12, 12), np.float32)
    normalized[1:3, 1:3, 1:4] = 0.9  # 12 voxels, seeded -> kept
    normalized[3, 3, 4] = 0.9  # touches the block only diagonally: 26-connected, kept
    normalized[5:7, 8:10, 8:10] = 0.9  # 8 voxels, seeded, below min_size -> dropped (seed stays)
    normalized[1:4, 8:11, 1:4] = 0.9  # 27 voxels, no seed -> dropped
    normalized[6, 1, 1] = 0.5  # dim: below the threshold
    seeds = np.zeros(normalized.shape, bool)
    seeds[1, 1, 1] = seeds[5, 8, 8] = True
    foreground = bp.foreground_from_seeds(normalized, seeds, fg_factor=1.0, min_size=10)
    expected = np.zeros_like(seeds)
    expected[1:3, 1:3, 1:4] = True
    expected[3, 3, 4] = True
    expected[5, 8, 8] = True
    # threshold is the seed mean (0.9): ">" keeps nothing of value 0.9, so use a lower factor
    assert np.array_equal(foreground, seeds)
    foreground = bp.foreground_from_seeds(normalized, seeds, fg_factor=0.8, min_size=10)
    assert np.array_equal(foreground, expected)
    # clip=True treats values above 1 as 1 (the published clipped scale) without a clipping pass
    stretched = normalized * 1.5
    clipped = bp.foreground_from_seeds(np.clip(stretched, 0, 1), seeds, fg_factor=0.8, min_size=10)
    assert np.array_equal(
        bp.foreground_from_seeds(stretched, seeds, fg_factor=0.8, min_size=10, clip=True), clipped
    )


def test_background_rules_and_axis_union() -> None:
    intensity = np.full((4, 5, 6), 0.5, np.float32)
    annotation0 = np.zeros((5, 6), bool)
    annotation0[2, 3] = True
    intensity[1, 0, 0] = 1.3  # bright voxel on an unannotated ray: unknown
    intensity[2, 2, 3] = 0.1  # dark voxel on the annotated ray: background
    background = bp.background_from_rays(
        intensity, bp.unannotated_rays({0: annotation0}, intensity.shape), 1.0
    )
    expected = np.ones(intensity.shape, bool)
    expected[:, 2, 3] = False
    expected[1, 0, 0] = False
    expected[2, 2, 3] = True
    assert np.array_equal(background, expected)
    # a second axis whose ray through (0, 2, 3) is unannotated makes that voxel background too
    annotation1 = np.ones((4, 6), bool)
    annotation1[0, 3] = False
    rays = bp.unannotated_rays({0: annotation0, 1: annotation1}, intensity.shape)
    both = bp.background_from_rays(intensity, rays, 1.0)
    assert both[0, 2, 3] and not both[1, 2, 3] and np.array_equal(both | expected, both)


@pytest.mark.parametrize(("overlap", "value"), [("vessel", 1), ("background", 0), ("ignore", 2)])
def test_label_map_values_and_overlap_rule(overlap: str, value: int) -> None:
    seeds = np.zeros((1, 1, 5), bool)
    seeds[0, 0, 0] = True
    foreground = np.array([[[1, 1, 1, 0, 0]]], bool)
    background = np.array([[[1, 0, 1, 1, 0]]], bool)
    labels = bp.combine_label_map(seeds, foreground, background, ignore_value=2, overlap=overlap)
    assert labels.dtype == np.uint8
    assert labels.tolist() == [[[1, 1, value, 0, 2]]]  # a seed is vessel whatever the rule


def test_foreground_the_annotation_contradicts_is_ignored() -> None:
    # a vessel (annotated along z) touching a brighter unannotated structure: S_1 grows into it
    volume = np.full((6, 10, 10), 100.0, np.float32)
    volume[2, 2:8, 4] = 400.0  # vessel along y
    volume[2:5, 7:9, 5:8] = 500.0  # bright non-vessel blob, 26-connected to the vessel's end
    annotation = np.zeros((10, 10), bool)
    annotation[2:8, 4] = True
    depth = maximum_intensity_projection(volume, 0)[1]
    published, seeds, _ = bp.pseudo_label_volume(
        volume,
        {0: annotation},
        {0: depth},
        ignore_value=2,
        overlap="vessel",
        fg_factor=0.9,
        min_size=1,
        rule="published",
    )
    assert (published[2:5, 7:9, 5:8] == 1).all()  # as published, S_1 leaks into the blob
    labels, _, counts = bp.pseudo_label_volume(
        volume, {0: annotation}, {0: depth}, ignore_value=2, fg_factor=0.9, min_size=1, rule="published"
    )
    # blob voxels are brighter than 1.2 x seed mean, so not S_0, yet on unannotated rays: ignored
    assert (labels[2:5, 7:9, 5:8] == 2).all() and counts["contradicted"] == 3 * 2 * 3
    assert (labels[seeds] == 1).all() and (labels[2, 2:8, 4] == 1).all()


def test_quality_on_synthetic_vessels() -> None:
    rng = np.random.default_rng(0)
    for _ in range(3):
        image, truth = tube_phantom(rng)
        annotation, depth = simulated_annotation(image, truth, 0)
        labels, seeds, counts = bp.pseudo_label_volume(
            image, {0: annotation}, {0: depth}, ignore_value=2, rule="published"
        )
        score = bp.agreement_with_truth(labels, truth)
        assert score["precision"] >= 0.95, score
        assert score["background_error"] < 0.03, score
        assert score["recall"] > 0.2, score  # fg_factor 1.0 keeps only the brighter half
        assert counts["seeds"] == int(annotation.sum()) == int(seeds.sum())
        assert set(np.unique(labels).tolist()) == {0, 1, 2}


def test_calibrated_rule_finds_more_vessel_than_published() -> None:
    rng = np.random.default_rng(0)
    for _ in range(3):
        image, truth = tube_phantom(rng)
        views = {axis: simulated_annotation(image, truth, axis) for axis in (0, 1, 2)}
        annotations, depths = {a: v[0] for a, v in views.items()}, {a: v[1] for a, v in views.items()}
        scores = {
            rule: bp.agreement_with_truth(
                bp.pseudo_label_volume(image, annotations, depths, ignore_value=2, rule=rule)[0], truth
            )
            for rule in ("published", "calibrated")
        }
        print(scores)
        published, new = scores["published"], scores["calibrated"]
        assert new["recall"] >= published["recall"] + 0.1, scores
        assert new["precision"] >= published["precision"] - 0.05, scores
        assert new["background_error"] <= min(published["background_error"], 0.03), scores


def test_calibrated_rule_keeps_s1_inside_the_drawing_and_off_s0() -> None:
    volume = np.full((6, 10, 10), 100.0, np.float32)
    volume[2, 2:8, 4] = 400.0  # vessel along y, annotated along z
    volume[2:5, 7:9, 5:8] = 500.0  # bright non-vessel blob touching it, on unannotated rays
    volume[4, 1, 1] = 60.0  # a dark voxel on an unannotated ray
    annotation = np.zeros((10, 10), bool)
    annotation[2:8, 4] = True
    depth = maximum_intensity_projection(volume, 0)[1]
    labels, seeds, counts = bp.pseudo_label_volume(volume, {0: annotation}, {0: depth}, ignore_value=2)
    assert (labels[2, 2:8, 4] == 1).all() and (labels[2:5, 7:9, 5:8] == 2).all()
    assert labels[4, 1, 1] == 0 and counts["overlap"] == 0
    with pytest.raises(ValueError, match="rule"):
        bp.pseudo_label_volume(volume, {0: annotation}, {0: depth}, ignore_value=2, rule="guess")


def test_edge_growth_adds_the_faint_rim_near_s1_and_nothing_far() -> None:
    rng = np.random.default_rng(3)
    shape = (24, 32, 32)
    grid = np.indices(shape).astype(np.float32)
    radial = np.hypot(grid[0] - 12, grid[2] - 16)  # a tube along y
    truth = radial <= 2.6
    volume = rng.normal(100.0, 5.0, shape).astype(np.float32)
    volume[radial <= 1.0] += 900.0  # bright core: above the grow threshold
    volume[(radial > 1.0) & truth] += 150.0  # faint rim: 30 noise levels, far below the grow threshold
    # a faint piece on the tube's rays but 5 voxels from its core: in the hull, out of reach
    volume[18:21, 10:20, 15:18] += 150.0
    annotation = truth.any(axis=0)
    depth = maximum_intensity_projection(volume, 0)[1]
    scores = {}
    for radius in (0.0, 1.5):
        labels, _, _ = bp.pseudo_label_volume(
            volume, {0: annotation}, {0: depth}, ignore_value=2, edge_radius=radius
        )
        scores[radius] = bp.agreement_with_truth(labels, truth)
        assert not (labels[18:21, 10:20, 15:18] == 1).any()
    assert scores[0.0]["recall"] < 0.5 and scores[0.0]["precision"] == 1.0, scores
    assert scores[1.5]["recall"] >= 0.9 and scores[1.5]["precision"] == 1.0, scores


def test_more_axes_add_seeds_and_recall(phantom) -> None:
    image, truth = phantom
    one = {0: simulated_annotation(image, truth, 0)}
    three = {axis: simulated_annotation(image, truth, axis) for axis in (0, 1, 2)}
    results = []
    for views in (one, three):
        labels, seeds, _ = bp.pseudo_label_volume(
            image, {a: v[0] for a, v in views.items()}, {a: v[1] for a, v in views.items()}, ignore_value=2
        )
        results.append((bp.agreement_with_truth(labels, truth), seeds))
    (score1, seeds1), (score3, seeds3) = results
    assert np.array_equal(seeds1 & seeds3, seeds1) and seeds3.sum() > seeds1.sum()
    assert score3["recall"] >= score1["recall"] and score3["precision"] >= 0.95


def make_raw_dataset(raw: Path, *, cases: int = 2, axes: tuple[int, ...] = (0,), labels: bool = True) -> Path:
    folder = raw / "Dataset901_Tubes"
    folder.mkdir(parents=True)
    io.write_json(
        {
            "channel_names": {"0": "MRA"},
            "labels": {"background": 0, "vessel": 1},
            "numTraining": cases,
            "file_ending": ".nii.gz",
            "annotation": "mip",
            "mip_axes": list(axes),
        },
        folder / "dataset.json",
    )
    rng = np.random.default_rng(3)
    for index in range(cases):
        case = f"tubes_{index:03d}"
        image, truth = tube_phantom(rng)
        io.write_image(image, GEOMETRY, folder / "imagesTr" / f"{case}_0000.nii.gz")
        if labels:
            io.write_image(truth.astype(np.uint8), GEOMETRY, folder / "labelsTr" / f"{case}.nii.gz")
        for axis in axes:
            annotation, _ = simulated_annotation(image, truth, axis)
            io.write_png(
                annotation.astype(np.uint8) * 255, folder / "annotationsTr" / f"{case}_mip{axis}.png"
            )
    return folder


def test_stage_writes_a_label_set_that_round_trips(data_roots: dict[str, Path]) -> None:
    raw = make_raw_dataset(data_roots["raw"], axes=(0, 1))
    folder = make_pseudo_labels(901, show_progress=False)
    assert folder == data_roots["preprocessed"] / "Dataset901_Tubes" / "labelsets" / "pseudo"
    description = io.read_json(folder / "labelset.json")
    assert (description["background"], description["vessel"], description["ignore"]) == (0, 1, 2)
    assert description["seeds"] == "{case}_seeds.nii.gz" and description["mip_axes"] == [0, 1]
    dataset = load_dataset(901, require_annotations=True)
    report = io.read_json(folder / "report.json")
    assert list(report["cases"]) == dataset.case_ids
    for case in dataset.cases:
        image, geometry = io.read_image(case.images[0])
        labels, label_geometry = io.read_image(folder / f"{case.case_id}.nii.gz")
        seed_map, seed_geometry = io.read_image(folder / f"{case.case_id}_seeds.nii.gz")
        assert labels.dtype == np.uint8 and labels.shape == image.shape
        assert label_geometry.matches(geometry) and seed_geometry.matches(geometry)
        # the files hold exactly what the array function computes
        annotations = {a: io.read_png(case.annotations[a]) > 0 for a in (0, 1)}
        depths = {a: maximum_intensity_projection(image, a)[1] for a in (0, 1)}
        expected, seeds, counts = bp.pseudo_label_volume(image, annotations, depths, ignore_value=2)
        assert np.array_equal(labels, expected)
        assert np.array_equal(seed_map == 1, seeds) and set(np.unique(seed_map).tolist()) == {1, 2}
        entry = report["cases"][case.case_id]
        assert entry["counts"] == counts
        assert entry["agreement"]["vessel"]["precision"] >= 0.95
        for axis in (0, 1):
            rgb = _read_rgb(folder / "qc" / f"{case.case_id}_mip{axis}.png")
            assert rgb.shape == (*annotations[axis].shape, 3)
            # green: drawn and in S_1; yellow: S_1 off the drawing; red: drawn, missed by S_1
            projection = (labels == 1).any(axis=axis)
            red = (rgb[..., 0] > rgb[..., 1] + 60) & (rgb[..., 0] > rgb[..., 2] + 60)
            green = (rgb[..., 1] > rgb[..., 0] + 60) & (rgb[..., 1] > rgb[..., 2] + 60)
            yellow = (rgb[..., 0] > rgb[..., 2] + 60) & (rgb[..., 1] > rgb[..., 2] + 60) & ~red & ~green
            drawn = annotations[axis]
            assert np.array_equal(red, drawn & ~projection)
            assert np.array_equal(green, drawn & projection) and (drawn & projection).mean() > 0.01
            assert np.array_equal(yellow, projection & ~drawn)
    assert report["summary"]["num_cases_scored"] == 2
    assert (raw / "labelsTr").is_dir()  # truth untouched, only read for the report


def _read_rgb(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_stage_continue_and_settings(data_roots: dict[str, Path]) -> None:
    make_raw_dataset(data_roots["raw"], labels=False)
    folder = make_pseudo_labels(901, show_progress=False)
    report = io.read_json(folder / "report.json")
    assert "agreement" not in report["cases"]["tubes_000"]  # no labelsTr: counts only
    (folder / "tubes_001.nii.gz").unlink()
    before = (folder / "tubes_000.nii.gz").stat().st_mtime_ns
    make_pseudo_labels(901, resume=True, show_progress=False)
    assert (folder / "tubes_001.nii.gz").is_file()
    assert (folder / "tubes_000.nii.gz").stat().st_mtime_ns == before  # finished case skipped
    with pytest.raises(InputError, match="settings"):
        make_pseudo_labels(901, resume=True, settings=PseudoLabelSettings(fg_factor=0.9), show_progress=False)
    with pytest.raises(InputError, match="fg-factor"):
        make_pseudo_labels(901, settings=PseudoLabelSettings(fg_factor=-1), show_progress=False)


def test_stored_depth_map_is_used_and_checked(data_roots: dict[str, Path]) -> None:
    make_raw_dataset(data_roots["raw"], cases=1, labels=False)
    mips = data_roots["preprocessed"] / "Dataset901_Tubes" / "mips"
    mips.mkdir(parents=True)
    np.save(mips / "tubes_000_mip0_depth.npy", np.zeros((SHAPE[1], SHAPE[2] + 1), np.int16))
    with pytest.raises(InputError, match=r"tubes_000_mip0_depth\.npy: depth map"):
        make_pseudo_labels(901, show_progress=False)
    image = io.read_image(data_roots["raw"] / "Dataset901_Tubes" / "imagesTr" / "tubes_000_0000.nii.gz")[0]
    depth = maximum_intensity_projection(image, 0)[1]
    np.save(mips / "tubes_000_mip0_depth.npy", (depth + 1) % SHAPE[0])  # stale: not the brightest voxels
    with pytest.raises(InputError, match="does not point at the brightest voxel"):
        make_pseudo_labels(901, show_progress=False)
    np.save(mips / "tubes_000_mip0_depth.npy", depth)
    folder = make_pseudo_labels(901, show_progress=False)
    assert io.read_json(folder / "report.json")["cases"]["tubes_000"]["counts"]["seeds"] > 0


def _wrong_size(folder: Path) -> str:
    io.write_png(np.full((5, 5), 255, np.uint8), folder / "annotationsTr" / "tubes_000_mip0.png")
    return "tubes_000_mip0.png: size (5, 5)"


def _empty(folder: Path) -> str:
    io.write_png(np.zeros(SHAPE[1:], np.uint8), folder / "annotationsTr" / "tubes_000_mip0.png")
    return "tubes_000_mip0.png: empty annotation"


def _missing(folder: Path) -> str:
    (folder / "annotationsTr" / "tubes_001_mip0.png").unlink()
    return "tubes_001_mip0.png: annotation missing"


def _not_mip(folder: Path) -> str:
    spec = json.loads((folder / "dataset.json").read_text())
    spec["annotation"] = "slice"
    (folder / "dataset.json").write_text(json.dumps(spec))
    for png in (folder / "annotationsTr").glob("*.png"):
        png.unlink()
    return 'pseudo-labels need "mip" annotations'


@pytest.mark.parametrize("breaker", [_wrong_size, _empty, _missing, _not_mip])
def test_bad_annotations_give_clear_errors(data_roots: dict[str, Path], breaker) -> None:
    folder = make_raw_dataset(data_roots["raw"], labels=False)
    message = breaker(folder)
    result = CliRunner().invoke(pseudolabel_app, ["-d", "901"])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not (data_roots["preprocessed"] / "Dataset901_Tubes" / "labelsets").exists()


def test_cli_runs_with_flags(data_roots: dict[str, Path]) -> None:
    make_raw_dataset(data_roots["raw"], cases=1, axes=(0, 2))
    result = CliRunner().invoke(
        pseudolabel_app, ["-d", "901", "--name", "pseudo_ax0", "--axes", "0", "--overlap", "vessel"]
    )
    assert result.exit_code == 0, result.output
    folder = data_roots["preprocessed"] / "Dataset901_Tubes" / "labelsets" / "pseudo_ax0"
    description = io.read_json(folder / "labelset.json")
    assert description["settings"]["axes"] == [0] and description["settings"]["overlap"] == "vessel"
    assert (folder / "qc" / "tubes_000_mip0.png").is_file() and not (
        folder / "qc" / "tubes_000_mip2.png"
    ).exists()
    result = CliRunner().invoke(pseudolabel_app, ["-d", "901", "--axes", "1"])
    assert result.exit_code == 2 and "not in dataset.json mip_axes" in result.output
    result = CliRunner().invoke(
        pseudolabel_app, ["-d", "901", "--name", "pub", "--rule", "published", "--fg-factor", "0.9"]
    )
    assert result.exit_code == 0, result.output
    settings = io.read_json(folder.parent / "pub" / "labelset.json")["settings"]
    assert settings["rule"] == "published" and settings["fg_factor"] == 0.9
    result = CliRunner().invoke(
        pseudolabel_app,
        ["-d", "901", "--rule", "magic", "--grow-factor", "1.5", "--reference", "local"]
        + ["--edge-radius", "-1"],
    )
    assert result.exit_code == 2
    for wrong in (
        "--rule must be one of",
        "--grow-factor must be in (0, 1)",
        "--reference must be one of",
        "--edge-radius must be in [0, 10]",
    ):
        assert wrong in result.output, result.output


def test_faint_seeds_are_dropped_by_the_floor() -> None:
    intensity = np.zeros((1, 1, 6), np.float32)
    intensity[0, 0] = [1.0, 0.9, 1.1, 0.2, 0.5, 0.0]
    seeds = np.ones_like(intensity, dtype=bool)
    seeds[0, 0, 5] = False
    kept = bp.drop_faint_seeds(intensity, seeds, 0.7)  # median 0.9 -> floor 0.63
    assert kept[0, 0].tolist() == [True, True, True, False, False, False]
    assert np.array_equal(bp.drop_faint_seeds(intensity, seeds, 0.0), seeds)


def test_synthetic_vessel_dataset_end_to_end(data_roots: dict[str, Path]) -> None:
    from mipseg.synthetic import synthesize_dataset

    synthesize_dataset(
        902, "vessels", num_cases=2, shape=(32, 48, 48), num_test_cases=0, seed=1, show_progress=False
    )
    folder = make_pseudo_labels(902, show_progress=False, num_processes=2)
    summary = io.read_json(folder / "report.json")["summary"]
    assert summary["num_cases_scored"] == 2
    assert summary["agreement_mean"]["vessel"]["precision"] >= 0.95, summary
    assert summary["agreement_mean"]["vessel"]["background_error"] < 0.03, summary
    for case_id in ("vessels_000", "vessels_001"):
        assert (folder / f"{case_id}.nii.gz").is_file() and (folder / "qc" / f"{case_id}_mip0.png").is_file()
