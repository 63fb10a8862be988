"""Issue 23's smaller things: -np checks, nnU-Net's -tr/-chk spellings, class names in evaluate, width."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mipseg import io
from mipseg.cli.evaluate import app as evaluate_app
from mipseg.cli.plan import app as plan_app
from mipseg.errors import InputError
from mipseg.evaluation.evaluate import evaluate_folders
from mipseg.training.checkpoint import checkpoint_kind


@pytest.mark.parametrize("value", ["0", "-1"])
def test_plan_and_evaluate_reject_np_below_one(value: str, data_roots, tmp_path: Path) -> None:
    outcome = CliRunner().invoke(plan_app, ["-d", "900", "-np", value])
    assert outcome.exit_code == 2 and f"-np must be at least 1, got {value}" in outcome.output
    outcome = CliRunner().invoke(evaluate_app, [str(tmp_path), str(tmp_path), "-np", value])
    assert outcome.exit_code == 2 and f"-np must be at least 1, got {value}" in outcome.output
    with pytest.raises(InputError, match="-np"):
        evaluate_folders(tmp_path, tmp_path, num_processes=int(value))


def test_nnunet_checkpoint_spellings() -> None:
    assert [checkpoint_kind(n) for n in ("final", "checkpoint_final.pth", "checkpoint_best.pt")] == [
        "final",
        "final",
        "best",
    ]
    assert checkpoint_kind("checkpoint_other.pth") == "checkpoint_other.pth"  # reported as it was given


def test_evaluate_table_names_classes_and_is_not_cut(tmp_path: Path) -> None:
    reference, prediction = tmp_path / "gt", tmp_path / "pred"
    label = np.zeros((4, 8, 8), np.uint8)
    label[1:3, 2:6, 2:6] = 1
    label[0, 0, 0:2] = 2
    for folder in (reference, prediction):
        io.write_image(label, io.Geometry.identity(), folder / "case_000.nii.gz")
    spec = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "spleen": 2}}
    spec.update(numTraining=1, file_ending=".nii.gz")
    io.write_json(spec, tmp_path / "dataset.json")
    outcome = CliRunner().invoke(
        evaluate_app, [str(reference), str(prediction), "--dataset-json", str(tmp_path / "dataset.json")]
    )
    assert outcome.exit_code == 0, outcome.output
    assert "liver (1)" in outcome.output and "spleen (2)" in outcome.output
    assert "…" not in outcome.output and str(prediction / "summary.json") in outcome.output


def test_ct_suggested_slice_uses_the_soft_tissue_window() -> None:
    from mipseg.propagation.slice_selection import ct_slice_picture

    hounsfield = np.array([[-1000.0, -160.0, 40.0, 60.0, 240.0, 1500.0]])
    picture = ct_slice_picture(hounsfield)
    assert picture[0, 0] == 0 and picture[0, 1] == 0 and picture[0, 4] == 255 and picture[0, -1] == 255
    # liver (~60 HU) and muscle (~40 HU) differ by 12-13 grey levels; scaled from air to bone by ~2
    assert int(picture[0, 3]) - int(picture[0, 2]) >= 12
