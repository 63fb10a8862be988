"""Synthetic datasets: determinism, the brightest-voxel annotation rule, the written dataset, the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from mipseg import io
from mipseg.cli.synthesize import app
from mipseg.dataset import load_dataset
from mipseg.errors import InputError
from mipseg.synthetic import (
    annotate_suggested_slices,
    best_threshold_dice,
    make_organ_volume,
    make_vessel_volume,
    simulate_mip_annotation,
    simulate_slice_annotation,
    synthesize_dataset,
)

TINY = (24, 40, 40)


@pytest.fixture(scope="module")
def vessel_volume() -> tuple[np.ndarray, np.ndarray]:
    return make_vessel_volume(TINY, (1.0, 1.0, 1.0), np.random.default_rng(3))


def test_vessel_volume_is_deterministic_and_seed_dependent(vessel_volume):
    image, label = vessel_volume
    again_image, again_label = make_vessel_volume(TINY, (1.0, 1.0, 1.0), np.random.default_rng(3))
    other_image, other_label = make_vessel_volume(TINY, (1.0, 1.0, 1.0), np.random.default_rng(4))
    np.testing.assert_array_equal(image, again_image)
    np.testing.assert_array_equal(label, again_label)
    assert not np.array_equal(image, other_image)
    assert not np.array_equal(label, other_label)


def test_vessel_volume_looks_like_an_angiogram(vessel_volume):
    image, label = vessel_volume
    assert image.shape == label.shape == TINY
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert set(np.unique(label)) == {0, 1}
    # Air around the elliptical body is exactly 0, so cropping to nonzero removes something.
    assert image[:, 0, 0].max() == 0 and (image > 0).mean() < 0.9
    body = image > 0
    assert 0.001 < label[body].mean() < 0.2
    # Vessels are brighter than the tissue around them.
    near = ndimage.binary_dilation(label > 0, iterations=2) & (label == 0) & body
    assert np.median(image[label > 0]) > np.median(image[near]) + 100


def test_vessel_density_and_noise_scale_change_what_they_name(vessel_volume):
    image, label = vessel_volume
    crowded_image, crowded_label = make_vessel_volume(
        TINY, (1.0, 1.0, 1.0), np.random.default_rng(3), vessel_density=3.0
    )
    assert crowded_label.mean() > 1.5 * label.mean()
    noisy_image, noisy_label = make_vessel_volume(
        TINY, (1.0, 1.0, 1.0), np.random.default_rng(3), noise_scale=8.0
    )
    np.testing.assert_array_equal(noisy_label, label)  # the same anatomy, only a noisier image
    body = (image > 0) & (noisy_image > 0)
    residual, noisy_residual = (
        ndimage.median_filter(image, 3) - image,
        ndimage.median_filter(noisy_image, 3) - noisy_image,
    )
    assert np.std(noisy_residual[body]) > 2 * np.std(residual[body])


def _brightest_voxel_labels(image: np.ndarray, label: np.ndarray, axis: int) -> np.ndarray:
    """Reference: walk every ray and read the label at its (first) brightest voxel."""
    moved_image, moved_label = np.moveaxis(image, axis, -1), np.moveaxis(label, axis, -1)
    expected = np.zeros(moved_image.shape[:2], np.uint8)
    for row in range(expected.shape[0]):
        for column in range(expected.shape[1]):
            ray = moved_image[row, column]
            expected[row, column] = moved_label[row, column, int(np.flatnonzero(ray == ray.max())[0])]
    return expected


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_mip_annotation_is_the_label_of_the_brightest_voxel(vessel_volume, axis):
    image, label = vessel_volume
    annotation = simulate_mip_annotation(image, label, axis)
    assert annotation.dtype == np.uint8
    assert annotation.shape == tuple(s for a, s in enumerate(TINY) if a != axis)
    np.testing.assert_array_equal(annotation, _brightest_voxel_labels(image, label, axis))
    assert annotation.any()


def test_mip_annotation_hides_vessels_behind_brighter_structures():
    image = np.zeros((5, 1, 3), np.float32)
    label = np.zeros((5, 1, 3), np.uint8)
    image[1, 0, 0], label[1, 0, 0] = 500, 1  # vessel is the brightest voxel on its ray
    image[1, 0, 1], label[1, 0, 1] = 500, 1  # vessel behind a brighter distractor
    image[3, 0, 1] = 900
    image[:, 0, 2] = 7  # ties: the first voxel wins, as np.argmax
    label[0, 0, 2] = 1
    np.testing.assert_array_equal(simulate_mip_annotation(image, label, 0), [[1, 0, 1]])


def test_annotator_noise_only_drops_faint_pieces_and_dilates(vessel_volume):
    image, label = vessel_volume
    clean = simulate_mip_annotation(image, label, 0)
    noisy = simulate_mip_annotation(image, label, 0, annotator_noise=True, rng=np.random.default_rng(0))
    again = simulate_mip_annotation(image, label, 0, annotator_noise=True, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(noisy, again)
    assert not np.array_equal(noisy, clean)
    cross = ndimage.generate_binary_structure(2, 1)
    assert not np.any(noisy & ~ndimage.binary_dilation(clean, cross))  # at most one pixel wider
    mip = image.max(0)
    bright = (clean > 0) & (mip >= np.percentile(mip[clean > 0], 25))
    assert np.all(noisy[bright])  # only faint pieces may be missed


def test_organ_volume_and_slice_annotation():
    image, label = make_organ_volume((20, 48, 48), (3.0, 1.0, 1.0), np.random.default_rng(1))
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert image[:, 0, 0].max() == 0
    assert 0.005 < label.mean() < 0.3
    # Non-convex: the organ fills clearly less than its convex hull in the largest slice.
    from skimage.morphology import convex_hull_image

    z = int(np.argmax(label.sum((1, 2))))
    assert label[z].sum() < 0.97 * convex_hull_image(label[z]).sum()

    extent = np.flatnonzero(label.any((1, 2)))
    index, mask = simulate_slice_annotation(label, "middle")
    assert index == (extent[0] + extent[-1]) // 2
    np.testing.assert_array_equal(mask, label[index])
    index, mask = simulate_slice_annotation(label, "largest")
    assert index == z and mask.sum() == label.sum((1, 2)).max()
    index, mask = simulate_slice_annotation(label, str(extent[0]))
    assert index == extent[0]
    np.testing.assert_array_equal(mask, label[extent[0]])
    empty = next(k for k in range(label.shape[0]) if not label[k].any())
    with pytest.raises(InputError, match="no foreground"):
        simulate_slice_annotation(label, empty)
    with pytest.raises(InputError):
        simulate_slice_annotation(label, "top")


def test_best_threshold_dice():
    label = np.zeros((8, 8, 8), np.uint8)
    label[2:5, 2:5, 2:5] = 1
    separable = label * 100.0 + 10.0
    dice, threshold = best_threshold_dice([separable], [label])
    assert dice == pytest.approx(1.0) and 10 < threshold <= 110


def test_vessel_dataset_is_valid_and_matches_its_truth(data_roots):
    folder = synthesize_dataset(
        901, "vessels", num_cases=3, shape=TINY, spacing=(2.0, 0.8, 0.8), mip_axes=(0, 2), num_test_cases=1
    )
    assert folder == data_roots["raw"] / "Dataset901_SyntheticVessels"
    dataset = load_dataset(901, require_annotations=True, require_labels=True)
    assert dataset.spec.annotation == "mip" and dataset.spec.mip_axes == (0, 2)
    assert dataset.spec.labels == {"background": 0, "vessel": 1}
    assert dataset.case_ids == ["vessels_000", "vessels_001", "vessels_002"]
    assert [case.case_id for case in dataset.test_cases] == ["vessels_003"]
    assert (folder / "labelsTs" / "vessels_003.nii.gz").is_file()
    for case in dataset.cases:
        image, geometry = io.read_image(case.images[0])
        label, _ = io.read_image(case.label)
        assert image.shape == TINY
        assert geometry.spacing_zyx == pytest.approx((2.0, 0.8, 0.8))
        assert any(abs(o) > 1 for o in geometry.origin)
        for axis, png in case.annotations.items():
            np.testing.assert_array_equal(io.read_png(png), 255 * simulate_mip_annotation(image, label, axis))
    assert not list(folder.parent.glob(".*partial*"))  # the staging folder is gone


def _dataset_contents(folder: Path) -> dict[str, np.ndarray]:
    contents = {}
    for path in sorted(folder.rglob("*")):
        if path.name.endswith(".nii.gz"):
            contents[str(path.relative_to(folder))] = io.read_image(path)[0]
        elif path.suffix == ".png":
            contents[str(path.relative_to(folder))] = io.read_png(path)
    return contents


def test_datasets_are_deterministic_for_a_seed(data_roots):
    options = dict(num_cases=2, shape=(16, 32, 32), num_test_cases=1, annotator_noise=True)
    first = _dataset_contents(synthesize_dataset(902, "vessels", seed=5, name="A", **options))
    second = _dataset_contents(synthesize_dataset(903, "vessels", seed=5, name="B", **options))
    third = _dataset_contents(synthesize_dataset(904, "vessels", seed=6, name="C", **options))
    assert first.keys() == second.keys() == third.keys()
    assert len(first) == 2 + 2 + 2 + 1 + 1  # images, labels, PNGs, test image, test label
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    assert any(not np.array_equal(first[key], third[key]) for key in first)


def test_existing_dataset_is_kept_unless_overwrite(data_roots):
    folder = synthesize_dataset(905, "vessels", num_cases=1, shape=(16, 32, 32), num_test_cases=0)
    before = (folder / "imagesTr" / "vessels_000_0000.nii.gz").read_bytes()
    with pytest.raises(InputError, match="already exists"):
        synthesize_dataset(905, "vessels", num_cases=1, shape=(16, 32, 32), seed=1)
    with pytest.raises(InputError, match="already used"):
        synthesize_dataset(905, "vessels", num_cases=1, shape=(16, 32, 32), name="Other")
    assert (folder / "imagesTr" / "vessels_000_0000.nii.gz").read_bytes() == before
    synthesize_dataset(
        905, "vessels", num_cases=1, shape=(16, 32, 32), seed=1, overwrite=True, num_test_cases=0
    )
    assert (folder / "imagesTr" / "vessels_000_0000.nii.gz").read_bytes() != before


def test_organ_dataset_has_one_annotated_slice_per_case(data_roots):
    synthesize_dataset(
        906, "organs", num_cases=2, shape=(16, 40, 40), slice_choice="largest", num_test_cases=0
    )
    dataset = load_dataset(906, require_annotations=True, require_labels=True)
    assert dataset.spec.annotation == "slice"
    assert dataset.spec.labels == {"background": 0, "organ": 1}
    for case in dataset.cases:
        label, geometry = io.read_image(case.label)
        assert geometry.spacing_zyx == pytest.approx((3.0, 1.0, 1.0))
        [(index, png)] = case.annotations.items()
        assert index == int(np.argmax(label.sum((1, 2))))
        np.testing.assert_array_equal(io.read_png(png), 255 * label[index])


def test_suggested_slices_are_drawn_from_the_truth(data_roots, tmp_path):
    synthesize_dataset(907, "organs", num_cases=2, shape=(16, 40, 40), num_test_cases=0)
    first, second = load_dataset(907).cases
    empty = int(np.flatnonzero(~io.read_image(second.label)[0].any(axis=(1, 2)))[0])
    suggestions = io.write_json(
        {"cases": {first.case_id: {"slice": 7}, second.case_id: {"slice": empty}}}, tmp_path / "s.json"
    )
    assert annotate_suggested_slices(907, suggestions) == {first.case_id: 7, second.case_id: None}
    first, second = load_dataset(907).cases
    assert list(first.annotations) == [7] and not second.annotations
    np.testing.assert_array_equal(io.read_png(first.annotations[7]), 255 * io.read_image(first.label)[0][7])
    spec = io.read_json(first.images[0].parents[1] / "dataset.json")
    assert spec["synthetic"]["slice_choice"] == "suggested"
    several = io.write_json({"cases": {first.case_id: {"slices": [5, 9]}}}, tmp_path / "several.json")
    assert annotate_suggested_slices(907, several) == {first.case_id: 5}  # "slices" alone is enough
    assert sorted(load_dataset(907).cases[0].annotations) == [5, 9]
    with pytest.raises(InputError, match="--suggest first"):
        annotate_suggested_slices(907, tmp_path / "missing.json")


def test_bad_arguments_are_input_errors(data_roots):
    with pytest.raises(InputError) as error:
        synthesize_dataset(907, "vessels", num_cases=0, shape=(0, 32, 32), spacing=(1, -1, 1), mip_axes=(3,))
    assert len(error.value.problems) == 4
    with pytest.raises(InputError) as error:
        synthesize_dataset(907, "organs", vessel_density=0.0, noise_scale=2.0)
    assert [p.split(" ")[:2] for p in error.value.problems] == [["vessel", "density"], ["noise", "scale"]]
    assert "only --kind vessels" in error.value.problems[1]
    with pytest.raises(InputError, match="kind"):
        synthesize_dataset(907, "bones")
    assert not any(data_roots["raw"].iterdir())


def test_cli_writes_a_dataset_and_rejects_bad_input(data_roots):
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "-d",
            "908",
            "--kind",
            "vessels",
            "--cases",
            "2",
            "--shape",
            "16",
            "32",
            "32",
            "--spacing",
            "1",
            "1",
            "1",
        ]
        + ["--seed", "2", "--mip-axes", "0,1", "--test-cases", "0", "--annotator-noise"],
    )
    assert result.exit_code == 0, result.output
    assert "Dataset908_SyntheticVessels" in result.output
    dataset = load_dataset(908, require_annotations=True)
    assert dataset.spec.mip_axes == (0, 1) and len(dataset.cases) == 2

    result = runner.invoke(
        app, ["-d", "909", "--kind", "organs", "--cases", "1", "--shape", "12", "32", "32"]
    )
    assert result.exit_code == 0, result.output
    assert load_dataset(909).spec.annotation == "slice"

    assert runner.invoke(app, ["-d", "910", "--kind", "bones"]).exit_code == 2
    assert runner.invoke(app, ["-d", "910", "--kind", "vessels", "--shape", "0", "32", "32"]).exit_code == 2
    assert runner.invoke(app, ["-d", "908", "--kind", "vessels", "--cases", "1"]).exit_code == 2
    bad_density = runner.invoke(app, ["-d", "911", "--kind", "vessels", "--vessel-density", "nan"])
    assert bad_density.exit_code == 2 and "vessel density nan" in bad_density.output

    result = runner.invoke(
        app,
        ["-d", "911", "--kind", "vessels", "--cases", "1", "--test-cases", "0", "--shape", "16", "32", "32"]
        + ["--vessel-density", "2", "--noise-scale", "4"],
    )
    assert result.exit_code == 0, result.output
    synthetic = io.read_json(load_dataset(911).folder / "dataset.json")["synthetic"]
    assert synthetic["vessel_density"] == 2.0 and synthetic["noise_scale"] == 4.0
    assert "vessel_density" not in io.read_json(load_dataset(908).folder / "dataset.json")["synthetic"]
