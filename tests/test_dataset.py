"""The dataset contract: each validation problem is reported with its file, exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mipseg import io
from mipseg.cli.validate import app as validate_app
from mipseg.dataset import load_dataset
from mipseg.errors import InputError

SHAPE = (6, 10, 12)
GEOMETRY = io.Geometry((0.8, 0.9, 2.0), (10.0, -5.0, 3.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def make_dataset(raw: Path, *, mode: str = "mip", cases: int = 2, channels: int = 1) -> Path:
    """A tiny valid dataset: bright tube along z in every case, labels, one annotation per case."""
    folder = raw / "Dataset900_Tiny"
    spec = {
        "channel_names": {str(c): f"MR{c}" for c in range(channels)},
        "labels": {"background": 0, "vessel": 1},
        "numTraining": cases,
        "file_ending": ".nii.gz",
        "annotation": mode,
        "mip_axes": [0, 1],
    }
    folder.mkdir(parents=True)
    io.write_json(spec, folder / "dataset.json")
    for index in range(cases):
        case = f"case_{index:03d}"
        label = np.zeros(SHAPE, np.uint8)
        label[:, 4:6, 5:7] = 1
        image = (label * 100 + 10).astype(np.float32)
        for channel in range(channels):
            io.write_image(image, GEOMETRY, folder / "imagesTr" / f"{case}_{channel:04d}.nii.gz")
        io.write_image(label, GEOMETRY, folder / "labelsTr" / f"{case}.nii.gz")
        if mode == "mip":
            for axis in (0, 1):
                io.write_png(
                    (label.max(axis) * 255).astype(np.uint8),
                    folder / "annotationsTr" / f"{case}_mip{axis}.png",
                )
        else:
            io.write_png(label[3].astype(np.uint8), folder / "annotationsTr" / f"{case}_slice3.png")
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_validate(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(validate_app, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize("mode", ["mip", "slice"])
def test_valid_dataset_loads(data_roots: dict[str, Path], mode: str) -> None:
    make_dataset(data_roots["raw"], mode=mode)
    dataset = load_dataset(900, require_annotations=True, require_labels=True)
    assert dataset.case_ids == ["case_000", "case_001"]
    assert dataset.spec.ignore_label == 2 and dataset.spec.num_classes == 2
    assert set(dataset.cases[0].annotations) == ({0, 1} if mode == "mip" else {3})
    code, output = run_validate("-d", "900")
    assert code == 0 and "Dataset900_Tiny: valid" in output


@pytest.mark.parametrize("mode", ["mip", "slice"])
def test_hidden_files_are_not_cases(data_roots: dict[str, Path], mode: str) -> None:
    # macOS writes "._{name}" beside every file copied to a foreign disk; a killed writer leaves
    # ".{stem}.partial-{id}{ending}": neither is a case, a label or a drawing
    folder = make_dataset(data_roots["raw"], mode=mode)
    drawing = "case_000_mip0.png" if mode == "mip" else "case_000_slice3.png"
    junk = [
        folder / "imagesTr" / "._case_000_0000.nii.gz",
        folder / "imagesTr" / ".case_009_0000.partial-0000dead.nii.gz",
        folder / "labelsTr" / "._case_000.nii.gz",
        folder / "annotationsTr" / f"._{drawing}",
    ]
    for path in junk:
        path.write_bytes(b"\x00\x05\x16\x07")  # AppleDouble magic: not an image
    dataset = load_dataset(900, require_annotations=True, require_labels=True)
    assert dataset.case_ids == ["case_000", "case_001"]
    code, output = run_validate("-d", "900", "--require-annotations")
    assert code == 0 and "Dataset900_Tiny: valid" in output, output


def _drop_key(folder: Path) -> str:
    spec = json.loads((folder / "dataset.json").read_text())
    del spec["file_ending"]
    (folder / "dataset.json").write_text(json.dumps(spec))
    return "missing key 'file_ending'"


def _missing_channel(folder: Path) -> str:
    spec = json.loads((folder / "dataset.json").read_text())
    spec["channel_names"]["1"] = "T2"
    (folder / "dataset.json").write_text(json.dumps(spec))
    (folder / "imagesTr" / "case_000_0000.nii.gz").rename(folder / "imagesTr" / "case_000_0001.nii.gz")
    return "case case_000 lacks channel file(s) case_000_0000.nii.gz"


def _channel_geometry(folder: Path) -> str:
    spec = json.loads((folder / "dataset.json").read_text())
    spec["channel_names"]["1"] = "T2"
    (folder / "dataset.json").write_text(json.dumps(spec))
    for case in ("case_000", "case_001"):
        image, geometry = io.read_image(folder / "imagesTr" / f"{case}_0000.nii.gz")
        moved = (
            io.Geometry(geometry.spacing, (0.0, 0.0, 0.0), geometry.direction)
            if case == "case_001"
            else geometry
        )
        io.write_image(image, moved, folder / "imagesTr" / f"{case}_0001.nii.gz")
    return "case_001_0001.nii.gz: geometry shape (6, 10, 12) spacing (2, 0.9, 0.8) origin (0, 0, 0) differs"


def _label_shape(folder: Path) -> str:
    io.write_image(np.zeros((6, 10, 11), np.uint8), GEOMETRY, folder / "labelsTr" / "case_001.nii.gz")
    return "case_001.nii.gz: geometry shape (6, 10, 11)"


def _label_geometry(folder: Path) -> str:
    label, _ = io.read_image(folder / "labelsTr" / "case_001.nii.gz")
    io.write_image(
        label,
        io.Geometry((1.0, 1.0, 1.0), GEOMETRY.origin, GEOMETRY.direction),
        folder / "labelsTr" / "case_001.nii.gz",
    )
    return "case_001.nii.gz: geometry shape (6, 10, 12) spacing (1, 1, 1)"


def _non_integer_label(folder: Path) -> str:
    label = np.full(SHAPE, 0.5, np.float32)
    io.write_image(label, GEOMETRY, folder / "labelsTr" / "case_000.nii.gz")
    return "case_000.nii.gz: label values must be integers"


def _unknown_label(folder: Path) -> str:
    label = np.zeros(SHAPE, np.uint8)
    label[0, 0, 0] = 7
    io.write_image(label, GEOMETRY, folder / "labelsTr" / "case_000.nii.gz")
    return "case_000.nii.gz: label values [7] are not in dataset.json labels [0, 1]"


def _annotation_size(folder: Path) -> str:
    io.write_png(np.full((9, 12), 255, np.uint8), folder / "annotationsTr" / "case_000_mip0.png")
    return "case_000_mip0.png: size (9, 12) (rows, columns) does not match the MIP grid (10, 12)"


def _empty_annotation(folder: Path) -> str:
    io.write_png(np.zeros((6, 12), np.uint8), folder / "annotationsTr" / "case_001_mip1.png")
    return "case_001_mip1.png: empty annotation"


def _truncated_image(folder: Path) -> str:
    path = folder / "imagesTr" / "case_001_0000.nii.gz"
    path.write_bytes(path.read_bytes()[:-30])
    return "case_001_0000.nii.gz: unreadable or truncated"


def _corrupt_json(folder: Path) -> str:
    (folder / "dataset.json").write_text('{"labels": ')
    return "dataset.json: not valid JSON"


def _annotation_axis(folder: Path) -> str:
    io.write_png(np.full((6, 10), 255, np.uint8), folder / "annotationsTr" / "case_000_mip2.png")
    return "case_000_mip2.png: axis 2 is not in dataset.json mip_axes [0, 1]"


def _orphan_label(folder: Path) -> str:
    io.write_image(np.zeros(SHAPE, np.uint8), GEOMETRY, folder / "labelsTr" / "case_009.nii.gz")
    return "case_009.nii.gz: no image in imagesTr for case 'case_009'"


def _bad_labels(folder: Path) -> str:
    spec = json.loads((folder / "dataset.json").read_text())
    spec["labels"] = {"background": 0, "vessel": 2}
    (folder / "dataset.json").write_text(json.dumps(spec))
    return "label values must be consecutive 0..1, found [0, 2]"


def _no_channel_suffix(folder: Path) -> str:
    (folder / "imagesTr" / "case_000_0000.nii.gz").rename(folder / "imagesTr" / "case_000.nii.gz")
    return "case_000.nii.gz: name does not follow {case}_{XXXX}.nii.gz"


def _wrong_file_ending(folder: Path) -> str:
    spec = json.loads((folder / "dataset.json").read_text())
    spec["file_ending"] = ".nii"
    (folder / "dataset.json").write_text(json.dumps(spec))
    return "no training images named {case}_0000.nii (found .nii.gz: is file_ending in dataset.json right?)"


PROBLEMS = [
    _drop_key,
    _no_channel_suffix,
    _wrong_file_ending,
    _missing_channel,
    _channel_geometry,
    _label_shape,
    _label_geometry,
    _non_integer_label,
    _unknown_label,
    _annotation_size,
    _empty_annotation,
    _truncated_image,
    _corrupt_json,
    _annotation_axis,
    _orphan_label,
    _bad_labels,
]


@pytest.mark.parametrize("break_dataset", PROBLEMS, ids=[p.__name__.strip("_") for p in PROBLEMS])
def test_each_problem_is_reported_with_exit_2_and_nothing_written(
    data_roots: dict[str, Path], break_dataset
) -> None:
    folder = make_dataset(data_roots["raw"])
    expected = break_dataset(folder)
    before = snapshot(data_roots["raw"].parent)
    with pytest.raises(InputError) as error:
        load_dataset(900)
    assert any(expected in problem for problem in error.value.problems), error.value.problems
    code, output = run_validate("-d", "900")
    assert code == 2
    assert expected.split(":")[0] in " ".join(output.split())
    assert "Traceback" not in output
    assert snapshot(data_roots["raw"].parent) == before


def test_every_problem_is_listed_at_once(data_roots: dict[str, Path]) -> None:
    folder = make_dataset(data_roots["raw"])
    expected = [_label_shape(folder), _empty_annotation(folder), _unknown_label(folder)]
    with pytest.raises(InputError) as error:
        load_dataset(900)
    for message in expected:
        assert any(message in problem for problem in error.value.problems)


def test_missing_annotation_only_when_required(data_roots: dict[str, Path]) -> None:
    folder = make_dataset(data_roots["raw"])
    (folder / "annotationsTr" / "case_001_mip1.png").unlink()
    load_dataset(900)
    with pytest.raises(InputError, match="case_001_mip1.png: annotation missing"):
        load_dataset(900, require_annotations=True)


def test_slice_annotation_outside_volume(data_roots: dict[str, Path]) -> None:
    folder = make_dataset(data_roots["raw"], mode="slice")
    io.write_png(np.ones((10, 12), np.uint8), folder / "annotationsTr" / "case_000_slice9.png")
    with pytest.raises(InputError, match="slice 9 is outside the image's 6 slices"):
        load_dataset(900)


def test_an_empty_slice_is_a_drawing_unless_every_slice_of_the_case_is_empty(
    data_roots: dict[str, Path],
) -> None:
    folder = make_dataset(data_roots["raw"], mode="slice")
    io.write_png(np.zeros((10, 12), np.uint8), folder / "annotationsTr" / "case_000_slice5.png")
    assert set(load_dataset(900, require_annotations=True).cases[0].annotations) == {3, 5}
    (folder / "annotationsTr" / "case_000_slice3.png").unlink()
    before = snapshot(folder)
    code, output = run_validate("-d", "900")
    assert code == 2 and "every drawn slice of case case_000 is empty" in output, output
    assert "case_000_slice5.png" in output and snapshot(folder) == before


def test_missing_dataset_folder(data_roots: dict[str, Path]) -> None:
    code, output = run_validate("-d", "Dataset901_Nothing")
    assert code == 2 and "dataset folder not found" in output


@pytest.mark.parametrize(
    "spec, expected",
    [
        (
            {"modality": {"0": "MRA"}, "labels": {"0": "background", "1": "vessel"}, "numTraining": 2},
            "this is nnU-Net v1's dataset.json: rename 'modality' to 'channel_names'",
        ),
        (
            {"channel_names": {"0": "CT"}, "labels": {"background": 0, "vessel": [1, 2]}, "numTraining": 2},
            "(region-based labels, lists of values, are not supported)",
        ),
    ],
    ids=["nnunet_v1", "regions"],
)
def test_dataset_json_of_other_nnunet_formats_is_named(data_roots: dict[str, Path], spec, expected) -> None:
    folder = make_dataset(data_roots["raw"])
    (folder / "dataset.json").write_text(json.dumps({**spec, "file_ending": ".nii.gz"}))
    code, output = run_validate("-d", "900")
    assert code == 2 and expected in " ".join(output.split()), output


def test_every_problem_of_a_dataset_json_is_reported_at_once(data_roots: dict[str, Path]) -> None:
    folder = make_dataset(data_roots["raw"], mode="mip")
    spec = json.loads((folder / "dataset.json").read_text())
    del spec["file_ending"]
    spec["labels"] = {"background": 0, "vessel": 2}
    spec["numTraining"] = -1
    (folder / "dataset.json").write_text(json.dumps(spec))
    code, output = run_validate("-d", "900")
    assert code == 2
    for expected in ("missing key 'file_ending'", "label values must be consecutive", "'numTraining'"):
        assert expected in output
