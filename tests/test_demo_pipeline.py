"""The demo (`make demo` = scripts/demo.sh) end to end at the smallest settings: no stage may break the chain.

Every stage is the real command-line tool in a subprocess, so a renamed flag, a changed output
folder or a stage that fails on tiny data fails this test.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
DEMO_SCRIPT = REPOSITORY / "scripts" / "demo.sh"
TINY_SETTINGS = {
    "DEMO_VESSEL_ID": "970",
    "DEMO_ORGAN_ID": "971",
    "DEMO_CASES": "2",  # two cases -> two folds: the smallest cross-validation refinement accepts
    "DEMO_TEST_CASES": "1",
    "DEMO_SHAPE": "16 32 32",
    "DEMO_EPOCHS": "1",
    "DEMO_ITERS": "1",
    "DEMO_VAL_ITERS": "1",
    "DEMO_FINETUNE_EPOCHS": "1",
    "DEMO_DENSE_EPOCHS": "1",
    "DEMO_PASSES": "1",
    "DEMO_ORGAN_CASES": "2",
    "DEMO_ORGAN_TEST_CASES": "1",
    "DEMO_ORGAN_SHAPE": "12 32 32",
    "DEMO_ORGAN_EPOCHS": "1",
    "DEMO_FLOW_ITERS": "1",
    "DEMO_NP": "1",
    "DEMO_NUM_WORKERS": "0",
    "DEMO_ORGAN_CLASSES": "3",  # the multi-organ path end to end (the demo's default is 1)
}
VESSEL_ROWS = (
    "best global threshold",
    "pseudo-labels",
    "refined labels",
    "model on pseudo-labels",
    "refined model",
    "dense-label upper bound",
)
ORGAN_ROWS = ("registration propagation", "flow propagation", "model on propagated labels")
ORGAN_CLASSES = ["organ", "neighbour_1", "neighbour_2"]  # DEMO_ORGAN_CLASSES=3 below


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run scripts/demo.sh once with tiny settings in fresh data roots; (finished process, root)."""
    root = tmp_path_factory.mktemp("demo")
    env = dict(os.environ)
    env.update(TINY_SETTINGS)
    env.update(
        MIPSEG_RAW=str(root / "raw"),
        MIPSEG_PREPROCESSED=str(root / "preprocessed"),
        MIPSEG_RESULTS=str(root / "results"),
        DEMO_REPORT=str(root / "demo_report.json"),
        # The virtualenv's console scripts (mipseg_*) and python, whichever interpreter runs pytest.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        OMP_NUM_THREADS="1",
        COLUMNS="160",
    )
    finished = subprocess.run(
        ["bash", str(DEMO_SCRIPT)], cwd=root, env=env, capture_output=True, text=True, timeout=900
    )
    return finished, root


def test_demo_runs_every_stage_and_prints_the_table(
    demo_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    finished, root = demo_run
    assert finished.returncode == 0, finished.stdout[-4000:] + finished.stderr[-4000:]
    # Each command is shown before it runs, so users can copy it.
    for command in (
        "mipseg_synthesize",
        "mipseg_plan",
        "mipseg_pseudolabel",
        "mipseg_train",
        "mipseg_refine",
        "mipseg_predict",
        "mipseg_evaluate",
        "mipseg_propagate",
        "mipseg_analyze",
    ):
        assert f"$ {command} " in finished.stdout, command
    assert "mipseg demo: Dice" in finished.stdout
    assert "total:" in finished.stdout

    report = json.loads((root / "demo_report.json").read_text())
    methods = [row["method"] for row in report["rows"]]
    for expected in VESSEL_ROWS + ORGAN_ROWS:
        assert any(method.startswith(expected) for method in methods), (expected, methods)
    for row in report["rows"]:
        assert not math.isnan(row["dice"]) and 0.0 <= row["dice"] <= 1.0, row
        assert f"{row['dice']:.3f}" in finished.stdout

    # The organ rows again, per class: every class of the multi-organ dataset, their mean = the row's Dice.
    assert "organs per class" in finished.stdout
    organ_rows = {row["method"]: row for row in report["rows"] if row["pipeline"] == "organs"}
    class_rows = report["organ_classes"]
    assert [row["method"] for row in class_rows] == list(organ_rows)
    for expected in ORGAN_ROWS:
        assert any(row["method"].startswith(expected) for row in class_rows), expected
    for row in class_rows:
        assert list(row["dice"]) == ORGAN_CLASSES, row
        values = list(row["dice"].values())
        assert all(0.0 <= value <= 1.0 for value in values), row
        assert row["mean"] == pytest.approx(organ_rows[row["method"]]["dice"])
        assert row["mean"] == pytest.approx(sum(values) / len(values)), row


def test_demo_writes_every_stage_output(demo_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    finished, root = demo_run
    assert finished.returncode == 0
    vessels = "Dataset970_SyntheticVessels"
    organs = "Dataset971_SyntheticOrgans"
    preprocessed, results = root / "preprocessed", root / "results"
    for labelset in ("pseudo", "refined"):
        assert (preprocessed / vessels / "labelsets" / labelset / "report.json").is_file()
    for labelset in ("registration", "propagated"):
        assert (preprocessed / organs / "labelsets" / labelset / "report.json").is_file()
    assert (preprocessed / organs / "suggested_slices.json").is_file()
    vessel_models = sorted(p.name for p in (results / vessels).glob("*__*__3d_fullres"))
    assert sorted(name.split("__")[1] for name in vessel_models) == ["dense", "pseudo", "refined"]
    for model in vessel_models:
        folds = sorted(p.name for p in (results / vessels / model).glob("fold_*/checkpoint_final.pt"))
        assert folds, model
    for labelset in ("pseudo", "refined", "dense"):
        predictions = results / vessels / "demo_predictions" / labelset
        assert len(list(predictions.glob("*.nii.gz"))) == 1
        assert (predictions / "summary.json").is_file()
    assert (results / organs / "demo_predictions" / "propagated" / "summary.json").is_file()
    # the organ dataset has three classes, and the simulated drawings hold the classes of their slice
    spec = json.loads((root / "raw" / organs / "dataset.json").read_text())
    assert list(spec["labels"]) == ["background", *ORGAN_CLASSES]
    assert sorted((root / "raw" / organs / "annotationsTr").glob("*.png"))

    # QC pictures exist and their paths are printed.
    pictures = json.loads((root / "demo_report.json").read_text())["qc_pictures"]
    for kind in (
        "pseudo-label MIP overlays",
        "prediction MIP overlays (test)",
        "prediction slice overlays (test)",
    ):
        assert pictures[kind], kind
        for picture in pictures[kind]:
            assert Path(picture).is_file()
            assert picture in finished.stdout.replace("\n", "")


def test_demo_says_its_time_and_a_second_run_continues_where_it_stopped(
    demo_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    finished, root = demo_run
    assert "The demo takes about" in finished.stdout.splitlines()[0] + finished.stdout.splitlines()[1]
    # as if cut during the last prediction: its "started" line stays, its "done" line and the evaluation's
    # are gone; a re-run skips everything else, continues the prediction and evaluates again
    done = root / "results" / "demo_done.txt"
    lines = done.read_text().splitlines()
    evaluate = max(i for i, line in enumerate(lines) if line.startswith("done\tmipseg_evaluate"))
    predict = max(i for i, line in enumerate(lines) if line.startswith("done\tmipseg_predict"))
    assert predict < evaluate
    done.write_text("\n".join(line for i, line in enumerate(lines) if i not in (predict, evaluate)) + "\n")
    env = dict(os.environ, **TINY_SETTINGS, MIPSEG_RAW=str(root / "raw"))
    env.update(MIPSEG_PREPROCESSED=str(root / "preprocessed"), MIPSEG_RESULTS=str(root / "results"))
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1")
    again = subprocess.run(
        ["bash", str(DEMO_SCRIPT)], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "continuing the demo" in again.stdout
    assert again.stdout.count("(done in an earlier run)") >= 20
    ran = [line for line in again.stdout.splitlines() if line.startswith("\x1b[36m$ ")]
    assert len(ran) == 3, ran
    assert "mipseg_predict" in ran[0] and ran[0].removesuffix("\x1b[0m").endswith("--continue"), ran
    assert "mipseg_evaluate" in ran[1] and "--continue" not in ran[1] and "demo_report" in ran[2], ran
    assert "mipseg demo: Dice" in again.stdout


def test_overlay_colours_classes_not_just_foreground():
    import numpy as np

    from mipseg.demo_report import MIN_PICTURE_SIZE, overlay

    truth = np.zeros((MIN_PICTURE_SIZE, MIN_PICTURE_SIZE), np.uint8)
    truth[:10, :10], truth[:10, 10:20] = 1, 2
    prediction = truth.copy()
    prediction[:10, 10:20] = 1  # the neighbour predicted as the organ
    prediction[20:30, :10] = 2  # predicted where the truth is background
    picture = overlay(np.zeros(truth.shape, np.float32), truth, prediction)
    green, red, yellow = (0, 120, 0), (138, 0, 0), (144, 132, 0)
    assert tuple(picture[5, 5]) == green
    assert tuple(picture[5, 15]) == red
    assert tuple(picture[25, 5]) == yellow
    assert tuple(picture[40, 40]) == (0, 0, 0)
