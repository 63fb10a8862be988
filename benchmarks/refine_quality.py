"""Does refinement move pseudo-labels closer to the truth, and does fine-tuning keep (or gain) Dice?

Runs the whole MIP loop on a synthetic vessel dataset at a configurable budget::

    synthesize -> plan -> pseudolabel -> train K folds with dropout (pseudo) -> refine
               -> fine-tune K folds on "refined" (--init-from the fold's pseudo model)
               -> predict the test cases with both fold ensembles -> evaluate against labelsTs

and prints two tables: the label sets against dense truth (precision / recall / Dice of the
foreground set, precision / recall of the background set, labelled fraction; mean over training
cases), and the test Dice / clDice of the base ensemble ("pseudo") and of the fine-tuned one
("refined"). With ``--control`` it also trains the base folds for the fine-tuning epochs more on
"pseudo", so that extra training alone can be told apart from better labels.

Usage (CPU, minutes; numbers at such budgets are noisy, use a GPU and more epochs for real ones)::

    .venv/bin/python benchmarks/refine_quality.py --cases 6 --folds 2 --shape 32 64 64 \\
        --epochs 10 --iters 20 --finetune-epochs 5 [--workdir DIR] [--device auto] [--json out.json]

Everything is written under ``--workdir`` (a temporary folder by default): the three data roots are
pointed there, so no existing dataset is touched. A missing pipeline stage stops the run with a
line naming it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

console = Console()
STAGES = {
    "synthesize": ("mipseg.synthetic", "synthesize_dataset"),
    "plan": ("mipseg.planning.plan_api", "plan_and_preprocess"),
    "pseudolabel": ("mipseg.pseudolabel.pseudolabel_api", "make_pseudo_labels"),
    "train": ("mipseg.training.train_api", "train_fold"),
    "refine": ("mipseg.refine.refine_api", "refine_labelset"),
    "predict": ("mipseg.inference.predict_api", "predict_folder"),
    "evaluate": ("mipseg.evaluation.evaluate", "evaluate_folders"),
}


def stage(name: str):
    """The function of a pipeline stage; exits with a clear line when the stage does not exist yet."""
    module_name, function = STAGES[name]
    try:
        return getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as error:
        raise SystemExit(f"stage {name!r} is missing: {module_name}.{function} ({error})") from None


def label_quality(labelset_dir: Path, truth_dir: Path, case_ids: list[str], ignore: int) -> dict[str, float]:
    """Mean over cases of the foreground / background sets of a label set against dense truth.

    Scored by :func:`mipseg.labelset.agreement` (what the label sets' report.json records).
    """
    from mipseg import io
    from mipseg.labelset import agreement

    rows: list[dict[str, float]] = []
    for case_id in case_ids:
        labels, _ = io.read_image(labelset_dir / f"{case_id}.nii.gz")
        truth = (io.read_image(truth_dir / f"{case_id}.nii.gz")[0] > 0).astype(np.uint8)
        scores = agreement(labels, truth, {"background": 0, "vessel": 1})
        rows.append(
            {
                "fg precision": scores["vessel"]["precision"],
                "fg recall": scores["vessel"]["recall"],
                "fg Dice": scores["vessel"]["dice"],
                "bg precision": scores["background"]["precision"],
                "bg recall": scores["background"]["recall"],
                "labelled": float((labels != ignore).mean()),
            }
        )
    return {key: float(np.nanmean([row[key] for row in rows])) for key in rows[0]}


def write_splits(preprocessed: Path, case_ids: list[str], folds: int) -> list[dict]:
    """Replace the benchmark dataset's 5-fold splits with ``folds`` folds (same KFold rule)."""
    from mipseg import io
    from mipseg.planning.splits import generate_splits

    splits = generate_splits(case_ids, folds)
    io.write_json(splits, preprocessed / "splits.json")
    return splits


def test_scores(dataset: str, raw: Path, labels: str, output: Path, device: str) -> dict[str, float]:
    """Dice and clDice of the vessel label for the fold ensemble trained on ``labels``."""
    from mipseg.inference.predict_api import PredictionSettings

    stage("predict")(
        raw / "imagesTs",
        output,
        dataset,
        labels=labels,
        settings=PredictionSettings(trainer="plain"),
        device=device,
        show_progress=False,
    )
    summary = stage("evaluate")(
        raw / "labelsTs", output, dataset_json=raw / "dataset.json", num_processes=1, show_progress=False
    )
    vessel = summary["mean"].get("1", next(iter(summary["mean"].values())))
    return {"Dice": float(vessel["Dice"]), "clDice": float(vessel.get("clDice", float("nan")))}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mipseg import io, paths
    from mipseg.dataset import load_dataset
    from mipseg.refine.refine_api import RefineSettings
    from mipseg.training.loop import TrainingConfig

    for name in STAGES:  # fail before hours of training, not after
        stage(name)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mipseg_refine_bench_"))
    for variable, folder in (
        ("MIPSEG_RAW", "raw"),
        ("MIPSEG_PREPROCESSED", "preprocessed"),
        ("MIPSEG_RESULTS", "results"),
    ):
        os.environ[variable] = str(workdir / folder)
        (workdir / folder).mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.time()
    stage("synthesize")(
        args.dataset_id,
        "vessels",
        num_cases=args.cases,
        shape=tuple(args.shape),
        seed=args.seed,
        num_test_cases=args.test_cases,
        annotator_noise=args.annotator_noise,
        overwrite=True,
        show_progress=False,
    )
    dataset = paths.resolve_dataset(args.dataset_id)
    raw, preprocessed = paths.raw_dataset_dir(dataset), paths.preprocessed_dataset_dir(dataset)
    stage("plan")(dataset, num_processes=1, device=args.device)
    stage("pseudolabel")(dataset, show_progress=False)
    case_ids = load_dataset(dataset, read_voxels=False).case_ids
    splits = write_splits(preprocessed, case_ids, args.folds)
    timings["prepare"] = time.time() - started

    def config(epochs: int, dropout: float) -> TrainingConfig:
        return TrainingConfig(
            epochs=epochs,
            iters_per_epoch=args.iters,
            val_iters=2,
            num_workers=0,
            device=args.device,
            dropout=dropout,
            seed=args.seed,
            initial_lr=args.lr,
        )

    train = stage("train")
    started = time.time()
    for fold in range(len(splits)):
        train(dataset, fold, labels="pseudo", config=config(args.epochs, args.dropout), show_progress=False)
    timings["train base folds"] = time.time() - started
    started = time.time()
    settings = RefineSettings(passes=args.passes, cl_method=args.cl_method, seed=args.seed)
    refined_dir = stage("refine")(
        dataset, "pseudo", "refined", settings=settings, device=args.device, show_progress=False
    )
    timings["refine"] = time.time() - started
    started = time.time()
    base_dir = paths.model_dir(dataset, "plain", "pseudo")
    for fold in range(len(splits)):
        init = base_dir / f"fold_{fold}" / "checkpoint_final.pt"
        train(
            dataset,
            fold,
            labels="refined",
            config=config(args.finetune_epochs, 0.0),
            init_from=init,
            show_progress=False,
        )
    timings["fine-tune folds"] = time.time() - started

    ignore = io.read_json(raw / "dataset.json")["labels"].get("ignore", 2)
    quality = {
        name: label_quality(paths.labelset_dir(dataset, name), raw / "labelsTr", case_ids, ignore)
        for name in ("pseudo", "refined")
    }
    started = time.time()
    scores = {
        "base (pseudo)": test_scores(dataset, raw, "pseudo", workdir / "pred_pseudo", args.device),
        "fine-tuned (refined)": test_scores(dataset, raw, "refined", workdir / "pred_refined", args.device),
    }
    if args.control:
        for fold in range(len(splits)):
            train(
                dataset,
                fold,
                labels="pseudo",
                config=config(args.epochs + args.finetune_epochs, args.dropout),
                resume=True,
                show_progress=False,
            )
        scores["control (pseudo, same extra epochs)"] = test_scores(
            dataset, raw, "pseudo", workdir / "pred_control", args.device
        )
    timings["predict + evaluate"] = time.time() - started
    report = io.read_json(refined_dir / "report.json")
    return {
        "quality": quality,
        "test": scores,
        "timings_s": timings,
        "refine_summary": report["summary"],
        "workdir": str(workdir),
        "arguments": vars(args),
    }


def show(result: dict[str, Any]) -> None:
    quality = Table(title="label sets vs dense truth (mean over training cases)")
    keys = list(next(iter(result["quality"].values())))
    quality.add_column("label set")
    for key in keys:
        quality.add_column(key, justify="right")
    for name, row in result["quality"].items():
        quality.add_row(name, *(f"{row[k]:.4f}" for k in keys))
    console.print(quality)
    test = Table(title="test cases: fold ensemble vs labelsTs (vessel)")
    for column in ("model", "Dice", "clDice"):
        test.add_column(column, justify="right" if column != "model" else "left")
    for name, row in result["test"].items():
        test.add_row(name, f"{row['Dice']:.4f}", f"{row['clDice']:.4f}")
    console.print(test)
    console.print("changes:", result["refine_summary"].get("counts", {}).get("changes"))
    console.print("timings (s):", {k: round(v, 1) for k, v in result["timings_s"].items()})


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset-id", type=int, default=987)
    parser.add_argument("--cases", type=int, default=6, help="training cases")
    parser.add_argument("--test-cases", type=int, default=2)
    parser.add_argument("--shape", type=int, nargs=3, default=(32, 64, 64))
    parser.add_argument("--folds", type=int, default=2, help="cross-validation folds (each trains twice)")
    parser.add_argument("--epochs", type=int, default=10, help="base training epochs per fold")
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20, help="iterations per epoch")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--passes", type=int, default=6)
    parser.add_argument("--cl-method", default="confident_joint")
    parser.add_argument("--annotator-noise", action="store_true", help="imperfect simulated drawings")
    parser.add_argument("--control", action="store_true", help="also train base folds the extra epochs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("MIPSEG_BENCH_THREADS", "1"))))
    result = run(args)
    show(result)
    if args.json:
        from mipseg import io

        io.write_json(result, args.json)


if __name__ == "__main__":
    main()
