"""Multi-organ synthetic datasets (``--organ-classes``): every class labelled and drawn; default unchanged."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from typer.testing import CliRunner

from mipseg import io
from mipseg.annotation_png import read_annotation
from mipseg.cli.synthesize import app
from mipseg.dataset import load_dataset
from mipseg.errors import InputError
from mipseg.synthetic import annotate_suggested_slices, make_organ_volume, synthesize_dataset

# sha256 of make_organ_volume((12, 32, 32), (3, 1, 1), default_rng((3, 0))), computed with the code from
# before --organ-classes existed (commit fccd549): the one-class volumes must stay exactly these.
ONE_CLASS_IMAGE_SHA256 = "7cadc1abe703150fbc4331374388186e21d7f24348a341c53d17d2b595a42645"
ONE_CLASS_LABEL_SHA256 = "85c858a5843c0d94754fa607c1a82bf272ef168acdde7276d9d7691c529d6b0d"
THREE_CLASSES = {"background": 0, "organ": 1, "neighbour_1": 2, "neighbour_2": 3}


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def test_default_one_class_volume_is_unchanged() -> None:
    for options in ({}, {"organ_classes": 1}):
        image, label = make_organ_volume(
            (12, 32, 32), (3.0, 1.0, 1.0), np.random.default_rng((3, 0)), **options
        )
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert _sha256(image) == ONE_CLASS_IMAGE_SHA256
        assert _sha256(label) == ONE_CLASS_LABEL_SHA256


def test_default_dataset_json_is_unchanged(data_roots) -> None:
    folder = synthesize_dataset(930, "organs", num_cases=1, shape=(12, 32, 32), num_test_cases=0)
    spec = io.read_json(folder / "dataset.json")
    assert spec["labels"] == {"background": 0, "organ": 1}
    assert spec["synthetic"] == {
        "kind": "organs",
        "seed": 0,
        "shape": [12, 32, 32],
        "spacing": [3.0, 1.0, 1.0],
        "annotator_noise": None,
        "slice_choice": "middle",
    }
    # a one-class drawing stays white on black
    [png] = (folder / "annotationsTr").glob("*.png")
    assert set(np.unique(io.read_png(png)).tolist()) == {0, 255}


@pytest.mark.parametrize("organ_classes", [2, 3, 4])
def test_neighbours_become_classes_the_organ_stays(organ_classes: int) -> None:
    rng = (5, 0)
    _, one = make_organ_volume((16, 40, 40), (3.0, 1.0, 1.0), np.random.default_rng(rng))
    _, several = make_organ_volume(
        (16, 40, 40), (3.0, 1.0, 1.0), np.random.default_rng(rng), organ_classes=organ_classes
    )
    # the organ is drawn before the neighbours: the same organ, now with labelled neighbours
    np.testing.assert_array_equal(several == 1, one == 1)
    assert sorted(np.unique(several).tolist()) == list(range(organ_classes + 1))
    organ_voxels = np.count_nonzero(several == 1)
    for value in range(2, organ_classes + 1):
        assert np.count_nonzero(several == value) >= 0.05 * organ_voxels, value


def test_multi_organ_dataset_labels_and_draws_every_class(data_roots) -> None:
    synthesize_dataset(931, "organs", num_cases=3, shape=(16, 40, 40), num_test_cases=1, organ_classes=3)
    dataset = load_dataset(931, require_annotations=True, require_labels=True)
    assert dataset.spec.labels == THREE_CLASSES
    spec = io.read_json(dataset.folder / "dataset.json")
    assert spec["synthetic"]["organ_classes"] == 3
    for case in dataset.cases:
        label, _ = io.read_image(case.label)
        assert sorted(np.unique(label).tolist()) == [0, 1, 2, 3], case.case_id
        [(index, png)] = case.annotations.items()
        drawing = read_annotation(png, dataset.spec)
        np.testing.assert_array_equal(drawing, label[index])
        assert sorted(np.unique(drawing).tolist()) == [0, 1, 2, 3], (case.case_id, index)
    [test_label] = (dataset.folder / "labelsTs").glob("*.nii.gz")
    assert sorted(np.unique(io.read_image(test_label)[0]).tolist()) == [0, 1, 2, 3]


def test_suggested_slices_keep_every_class(data_roots, tmp_path) -> None:
    synthesize_dataset(932, "organs", num_cases=1, shape=(16, 40, 40), num_test_cases=0, organ_classes=3)
    [case] = load_dataset(932).cases
    label = io.read_image(case.label)[0]
    only_organ = [int(z) for z in range(len(label)) if set(np.unique(label[z]).tolist()) == {0, 1}]
    several = [int(z) for z in range(len(label)) if len(np.unique(label[z])) == 4]
    assert only_organ and several  # the neighbours cover some of the organ's slices, not all
    suggestions = io.write_json(
        {"cases": {case.case_id: {"slice": only_organ[0], "slices": [only_organ[0], several[0]]}}},
        tmp_path / "s.json",
    )
    annotate_suggested_slices(932, suggestions)
    [case] = load_dataset(932, require_annotations=True).cases
    assert sorted(case.annotations) == sorted([only_organ[0], several[0]])
    spec = load_dataset(932).spec
    for index, png in case.annotations.items():
        # class values, not 255: with several classes the pixel value is the class
        np.testing.assert_array_equal(io.read_png(png), label[index])
        np.testing.assert_array_equal(read_annotation(png, spec), label[index])


def test_organ_classes_are_checked(data_roots) -> None:
    with pytest.raises(InputError, match="organ classes 5 must be 1..4"):
        synthesize_dataset(933, "organs", organ_classes=5)
    with pytest.raises(InputError, match="only --kind organs"):
        synthesize_dataset(933, "vessels", organ_classes=2)
    with pytest.raises(InputError, match="must be 1..4"):
        make_organ_volume((12, 32, 32), (3.0, 1.0, 1.0), np.random.default_rng(0), organ_classes=0)
    assert not any(data_roots["raw"].iterdir())


def test_cli_organ_classes(data_roots) -> None:
    runner = CliRunner()
    arguments = [
        "-d",
        "934",
        "--kind",
        "organs",
        "--cases",
        "1",
        "--test-cases",
        "0",
        "--shape",
        "12",
        "32",
        "32",
    ]
    result = runner.invoke(app, [*arguments, "--organ-classes", "3"])
    assert result.exit_code == 0, result.output
    assert "3 organ classes" in result.output
    assert load_dataset(934).spec.labels == THREE_CLASSES
    result = runner.invoke(app, ["-d", "935", "--kind", "organs", "--organ-classes", "9"])
    assert result.exit_code == 2 and "organ classes 9" in result.output
    assert runner.invoke(app, ["-d", "935", "--kind", "vessels", "--organ-classes", "2"]).exit_code == 2
