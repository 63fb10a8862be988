"""Metrics against values computed by hand on tiny arrays; folder evaluation and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mipseg import io
from mipseg.cli.evaluate import app
from mipseg.errors import InputError
from mipseg.evaluation.evaluate import evaluate_folders
from mipseg.metrics import (
    assd,
    cldice,
    compute_metrics,
    confusion_counts,
    dice,
    hd95,
    hd95_from_distances,
    iou,
    precision,
    recall,
    surface_distances,
)

METRICS = ("Dice", "IoU", "precision", "recall", "clDice", "HD95", "ASSD")


def cube(shape=(8, 8, 14), z=(2, 5), y=(2, 5), x=(2, 5)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[z[0] : z[1], y[0] : y[1], x[0] : x[1]] = True
    return mask


def tube(length: int = 24, radius: int = 3) -> np.ndarray:
    """Straight cylinder along x through the middle of an (11, 11, length) array."""
    z, y, _ = np.mgrid[:11, :11, :length]
    return (z - 5) ** 2 + (y - 5) ** 2 <= radius**2


# ---------------------------------------------------------------- overlap counts


def test_counts_and_overlap_metrics_by_hand():
    # Reference: 4 voxels; prediction: 3 voxels of which 2 overlap. 1 x 1 x 10 array.
    reference = np.zeros((1, 1, 10), bool)
    reference[0, 0, 0:4] = True
    prediction = np.zeros((1, 1, 10), bool)
    prediction[0, 0, 2:5] = True
    counts = confusion_counts(reference, prediction)
    assert counts == {"TP": 2, "FP": 1, "FN": 2, "TN": 5, "n_pred": 3, "n_ref": 4}
    assert dice(reference, prediction) == pytest.approx(4 / 7)  # 2*2 / (2*2 + 1 + 2)
    assert iou(reference, prediction) == pytest.approx(2 / 5)
    assert precision(reference, prediction) == pytest.approx(2 / 3)
    assert recall(reference, prediction) == pytest.approx(2 / 4)


def test_ignore_label_is_excluded_from_counts():
    reference = np.array([1, 1, 0, 0, 3, 3, 3, 0]).reshape(1, 1, 8)  # 3 = ignore
    prediction = np.array([1, 0, 1, 0, 1, 1, 0, 0]).reshape(1, 1, 8)
    result = compute_metrics(reference, prediction, [1], ignore_label=3)[1]
    # Without the ignore label the 2 predicted voxels under it would be 2 extra FP.
    assert (result["TP"], result["FP"], result["FN"], result["TN"]) == (1, 1, 1, 2)
    assert (result["n_pred"], result["n_ref"]) == (2, 2)
    assert result["Dice"] == pytest.approx(0.5)
    without_ignore = compute_metrics(reference, prediction, [1])[1]
    assert without_ignore["FP"] == 3 and without_ignore["TN"] == 3


def test_nan_rules_empty_vs_empty():
    empty = np.zeros((4, 4, 4), bool)
    result = compute_metrics(empty.astype(np.uint8), empty.astype(np.uint8), [1])[1]
    for name in METRICS:
        assert math.isnan(result[name]), name
    assert (result["TP"], result["FP"], result["FN"], result["TN"]) == (0, 0, 0, 64)


def test_nan_rules_empty_vs_nonempty():
    empty = np.zeros((6, 6, 6), np.uint8)
    something = empty.copy()
    something[2:4, 2:4, 2:4] = 1
    missed = compute_metrics(something, empty, [1])[1]  # reference has it, prediction not
    assert missed["Dice"] == 0 and missed["IoU"] == 0 and missed["clDice"] == 0 and missed["recall"] == 0
    assert math.isnan(missed["precision"]) and math.isnan(missed["HD95"]) and math.isnan(missed["ASSD"])
    hallucinated = compute_metrics(empty, something, [1])[1]  # prediction only
    assert hallucinated["Dice"] == 0 and hallucinated["precision"] == 0 and hallucinated["clDice"] == 0
    assert math.isnan(hallucinated["recall"]) and math.isnan(hallucinated["HD95"])
    assert math.isnan(hallucinated["ASSD"])


# ---------------------------------------------------------------- surface distances


def test_hd95_and_assd_with_anisotropic_spacing_by_hand():
    # 3x3x3 cubes, the prediction shifted by one voxel along z; spacing (z, y, x) = (3, 1, 1) mm.
    # Each cube has 26 surface voxels (all but its centre). Reference -> prediction: the
    # 9 voxels of the bottom face are 3 mm (one z step) from the prediction; the top-face
    # centre is the prediction's interior centre, 1 mm (one y step) from its surface; the
    # other 16 coincide with prediction surface (0 mm). The other direction is symmetric.
    reference, prediction = cube(), cube(z=(3, 6))
    to_prediction, to_reference = surface_distances(reference, prediction, (3.0, 1.0, 1.0))
    assert sorted(to_prediction) == [0.0] * 16 + [1.0] + [3.0] * 9
    assert sorted(to_reference) == [0.0] * 16 + [1.0] + [3.0] * 9
    # 95th percentile of 26 sorted values sits between positions 23 and 24: both 3 mm.
    assert hd95(reference, prediction, (3.0, 1.0, 1.0)) == pytest.approx(3.0)
    assert assd(reference, prediction, (3.0, 1.0, 1.0)) == pytest.approx((2 * (9 * 3 + 1)) / 52)
    # The same shift along x, where the spacing is 1 mm, costs 1 mm: spacing order is (z, y, x).
    shifted_x = cube(x=(3, 6))
    assert hd95(reference, shifted_x, (3.0, 1.0, 1.0)) == pytest.approx(1.0)
    assert assd(reference, shifted_x, (3.0, 1.0, 1.0)) == pytest.approx((2 * (9 * 1 + 1)) / 52)
    # Isotropic spacing makes the z shift cost 1 mm as well.
    assert hd95(reference, prediction) == pytest.approx(1.0)


def test_hd95_ignores_a_far_outlier_but_assd_does_not():
    # One stray predicted voxel 6 voxels (6 mm along x) from the reference surface.
    reference, prediction = cube(), cube(z=(3, 6))
    prediction[2, 3, 10] = True
    spacing = (3.0, 1.0, 1.0)
    _, to_reference = surface_distances(reference, prediction, spacing)
    assert sorted(to_reference) == [0.0] * 16 + [1.0] + [3.0] * 9 + [6.0]
    # 27 values: the 95th percentile lies between positions 24 and 25 (both 3 mm), not at 6 mm.
    assert hd95(reference, prediction, spacing) == pytest.approx(3.0)
    assert assd(reference, prediction, spacing) == pytest.approx((28 + 28 + 6) / 53)


def test_hd95_is_the_max_of_directed_percentiles():
    # One direction: 19 zeros and one 20 -> its 95th percentile interpolates to 0.05 * 20 = 1.
    # The pooled 95th percentile of all 40 distances would be 0.
    ones_way = np.array([0.0] * 19 + [20.0])
    assert hd95_from_distances(np.zeros(20), ones_way) == pytest.approx(1.0)
    assert hd95_from_distances(ones_way, np.zeros(20)) == pytest.approx(1.0)


def test_surface_distances_equal_distance_transform_on_random_masks():
    # Independent reference: distance_transform_edt of the inverted surface, read at the other surface.
    from scipy import ndimage

    from mipseg.metrics import surface

    rng = np.random.default_rng(0)
    reference = ndimage.binary_opening(rng.random((12, 16, 20)) > 0.6)
    prediction = ndimage.binary_opening(rng.random((12, 16, 20)) > 0.6)
    spacing = (2.5, 0.8, 1.1)
    to_prediction, to_reference = surface_distances(reference, prediction, spacing)
    expected_to_prediction = ndimage.distance_transform_edt(~surface(prediction), sampling=spacing)
    expected_to_reference = ndimage.distance_transform_edt(~surface(reference), sampling=spacing)
    np.testing.assert_allclose(to_prediction, expected_to_prediction[surface(reference)])
    np.testing.assert_allclose(to_reference, expected_to_reference[surface(prediction)])


def test_identical_masks_have_zero_distances():
    mask = cube()
    assert hd95(mask, mask, (2.0, 0.5, 0.5)) == 0.0
    assert assd(mask, mask, (2.0, 0.5, 0.5)) == 0.0


# ---------------------------------------------------------------- clDice


def test_cldice_on_a_tube():
    gt = tube()
    assert cldice(gt, gt) == pytest.approx(1.0)
    # The skeleton of the tube (length 24, radius 3) is its axis without 2 voxels at each
    # end: x = 2..21, 20 voxels. A prediction covering x < 12 holds 10 of them -> Tsens = 1/2;
    # its own skeleton lies inside the tube -> Tprec = 1; clDice = 2 * 1 * 0.5 / 1.5 = 2/3.
    half = gt.copy()
    half[:, :, 12:] = False
    assert cldice(gt, half) == pytest.approx(2 / 3)
    # A 4-voxel gap in the middle removes 4 of the 20 axis voxels: Tsens = 0.8, Tprec = 1.
    gap = gt.copy()
    gap[:, :, 10:14] = False
    assert cldice(gt, gap) == pytest.approx(2 * 0.8 / 1.8)
    # A one-voxel line on the axis has a tiny Dice but the full topology: clDice = 1.
    line = np.zeros_like(gt)
    line[5, 5, :] = True
    assert cldice(gt, line) == pytest.approx(1.0)
    assert dice(gt, line) < 0.1


# ---------------------------------------------------------------- folders and CLI


def write_case(folder: Path, name: str, array: np.ndarray, spacing=(3.0, 1.0, 1.0)) -> Path:
    return io.write_image(array.astype(np.uint8), io.Geometry.identity(spacing), folder / f"{name}.nii.gz")


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    # case_a: label 1 shifted along z (HD95 3 mm), label 2 perfect. case_b: label 1 perfect, no label 2.
    reference_a = cube().astype(np.uint8)
    reference_a[cube(x=(8, 11))] = 2
    prediction_a = cube(z=(3, 6)).astype(np.uint8)
    prediction_a[cube(x=(8, 11))] = 2
    write_case(gt, "case_a", reference_a)
    write_case(pred, "case_a", prediction_a)
    write_case(gt, "case_b", cube())
    write_case(pred, "case_b", cube())
    write_case(gt, "case_c", cube())  # reference without a prediction: skipped
    return gt, pred


def test_evaluate_folders_writes_summary(folders):
    gt, pred = folders
    summary = evaluate_folders(gt, pred, num_processes=1, show_progress=False)
    written = json.loads((pred / "summary.json").read_text())
    assert set(written) == {"metric_per_case", "mean", "foreground_mean"}
    assert summary["summary_file"] == str(pred / "summary.json")
    assert [Path(c["prediction_file"]).name for c in written["metric_per_case"]] == [
        "case_a.nii.gz",
        "case_b.nii.gz",
    ]
    case_a, case_b = (c["metrics"] for c in written["metric_per_case"])
    assert set(case_a) == {"1", "2"} and set(case_a["1"]) >= set(METRICS) | {"TP", "FP", "FN", "TN"}
    assert case_a["1"]["Dice"] == pytest.approx(2 * 18 / 54)  # 2 of 3 layers overlap
    assert case_a["1"]["HD95"] == pytest.approx(3.0)
    assert case_a["2"]["Dice"] == 1.0 and case_a["2"]["HD95"] == 0.0
    assert case_b["1"]["Dice"] == 1.0
    assert math.isnan(case_b["2"]["Dice"]) and case_b["2"]["TN"] == 8 * 8 * 14  # absent from both
    assert written["mean"]["1"]["Dice"] == pytest.approx((2 / 3 + 1) / 2)
    assert written["mean"]["2"]["Dice"] == 1.0  # nanmean skips case_b
    assert written["foreground_mean"]["Dice"] == pytest.approx(((2 / 3 + 1) / 2 + 1) / 2)
    assert written["foreground_mean"]["HD95"] == pytest.approx((1.5 + 0.0) / 2)


def test_evaluate_folders_labels_ignore_and_strict(folders, tmp_path):
    gt, pred = folders
    only_two = evaluate_folders(
        gt, pred, labels=[2], num_processes=1, show_progress=False, output=tmp_path / "s.json"
    )
    assert list(only_two["mean"]) == ["2"] and (tmp_path / "s.json").is_file()
    # Ignoring label 2 in the reference: label 1 only is scored, and predicted 2s under it do not count.
    ignored = evaluate_folders(gt, pred, ignore_label=2, num_processes=1, show_progress=False)
    assert list(ignored["mean"]) == ["1"]
    with pytest.raises(InputError, match="case_c.nii.gz: no prediction"):
        evaluate_folders(gt, pred, strict=True, num_processes=1, show_progress=False)
    write_case(tmp_path / "empty_gt", "case", np.zeros((4, 4, 4)))
    write_case(tmp_path / "empty_pred", "case", np.zeros((4, 4, 4)))
    with pytest.raises(InputError, match="no label except background"):
        evaluate_folders(tmp_path / "empty_gt", tmp_path / "empty_pred", num_processes=1, show_progress=False)
    write_case(pred, "case_d", cube())
    with pytest.raises(InputError, match="case_d.nii.gz: no reference"):
        evaluate_folders(gt, pred, num_processes=1, show_progress=False)


def test_evaluate_folders_in_worker_processes_matches_sequential(folders, tmp_path):
    gt, pred = folders
    sequential = evaluate_folders(gt, pred, num_processes=1, show_progress=False, output=tmp_path / "a.json")
    parallel = evaluate_folders(gt, pred, num_processes=2, show_progress=False, output=tmp_path / "b.json")
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    assert sequential["mean"]["1"]["Dice"] == parallel["mean"]["1"]["Dice"]


def test_dataset_json_gives_labels_and_ignore(folders, tmp_path):
    gt, pred = folders
    dataset_json = tmp_path / "dataset.json"
    io.write_json(
        {
            "channel_names": {"0": "CT"},
            "labels": {"background": 0, "vessel": 1, "ignore": 2},
            "numTraining": 2,
            "file_ending": ".nii.gz",
        },
        dataset_json,
    )
    summary = evaluate_folders(gt, pred, dataset_json=dataset_json, num_processes=1, show_progress=False)
    assert list(summary["mean"]) == ["1"]
    # In case_a the ignored label-2 block is predicted as 2 too; nothing of it enters label 1's counts.
    assert summary["metric_per_case"][0]["metrics"]["1"]["TN"] == 8 * 8 * 14 - 27 - (18 + 9 + 9)


def test_dataset_id_and_bad_inputs(folders, data_roots):
    gt, pred = folders
    dataset = data_roots["raw"] / "Dataset901_Tiny"
    io.write_json(
        {
            "channel_names": {"0": "CT"},
            "labels": {"background": 0, "a": 1, "b": 2},
            "numTraining": 2,
            "file_ending": ".nii.gz",
        },
        dataset / "dataset.json",
    )
    runner = CliRunner()
    result = runner.invoke(app, [str(gt), str(pred), "-d", "901", "-np", "1"])
    assert result.exit_code == 0, result.output
    assert list(json.loads((pred / "summary.json").read_text())["mean"]) == ["1", "2"]
    # Same shape, different spacing: a geometry mismatch naming both files.
    write_case(pred, "case_b", cube(), spacing=(1.0, 1.0, 1.0))
    result = runner.invoke(app, [str(gt), str(pred), "-np", "1"])
    assert result.exit_code == 2 and "case_b.nii.gz: geometry" in result.output
    (pred / "case_b.nii.gz").write_bytes(b"not an image")
    result = runner.invoke(app, [str(gt), str(pred), "-np", "1"])
    assert result.exit_code == 2 and "case_b.nii.gz: unreadable" in result.output
    assert "Traceback" not in result.output


def test_cli_exit_codes(folders, tmp_path):
    gt, pred = folders
    runner = CliRunner()
    result = runner.invoke(
        app, [str(gt), str(pred), "-o", str(tmp_path / "out.json"), "-l", "1", "2", "-np", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "foreground mean" in result.output and (tmp_path / "out.json").is_file()
    assert "case_c.nii.gz" in result.output  # the note about the skipped reference
    assert runner.invoke(app, ["-h"]).exit_code == 0
    assert list(json.loads((tmp_path / "out.json").read_text())["mean"]) == ["1", "2"]
    write_case(pred, "case_b", np.zeros((8, 8, 13)))  # wrong shape
    result = runner.invoke(app, [str(gt), str(pred), "-np", "1"])
    assert result.exit_code == 2
    assert "case_b.nii.gz: shape (8, 8, 13)" in result.output
    result = runner.invoke(app, [str(tmp_path / "missing"), str(pred)])
    assert result.exit_code == 2 and "folder not found" in result.output
