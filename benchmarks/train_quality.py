"""Does a model trained on MIP pseudo-labels beat its own labels? Synthetic vessels, fixed CPU budget.

Runs the pipeline end to end with the real commands in a scratch folder:
``mipseg_synthesize -> mipseg_plan -> mipseg_pseudolabel -> mipseg_train (pseudo, dense) ->
mipseg_predict`` and reports Dice against the synthetic dense truth of

(a) the best global intensity threshold, chosen on the test cases themselves (an oracle);
(b) the pseudo-labels themselves (vessel = 1, everything else background), on the training
    cases (the only ones that have annotations);
(c) the plain 3D U-Net trained on the pseudo-labels, on the test cases;
(d) the same network trained on the dense labels (upper bound), on the test cases;

and the ratio (c)/(d). Both trainings get the same wall-clock budget (``--minutes``), turned
into a number of epochs from a measured time per iteration. Run it on an otherwise idle machine
for meaningful numbers; results go to ``WORKDIR/train_quality.json``.

Usage::

    python benchmarks/train_quality.py --workdir /tmp/mipseg_quality --minutes 10
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from _pipeline import run_command

from mipseg.metrics import dice

STAGES = ("synthesize", "plan", "pseudolabel", "train", "predict")
DATASET_ID = 960


def require_stages() -> None:
    """Exit with a clear message if a pipeline command is not implemented yet."""
    missing = [s for s in STAGES if importlib.util.find_spec(f"mipseg.cli.{s}") is None]
    if missing:
        sys.exit(f"train_quality: pipeline stage(s) missing: {', '.join('mipseg_' + s for s in missing)}")


def run(command: list[str], env: dict[str, str]) -> float:
    """Run one pipeline command of this virtualenv; exit on failure; returns seconds."""
    return run_command(command, env, "train_quality")


def folder_dice(predictions: list[np.ndarray], truths: list[np.ndarray]) -> dict[str, float]:
    """Mean per-case Dice and Dice of all voxels pooled (:func:`mipseg.metrics.dice`: NaN when both
    masks are empty, left out of the mean)."""
    pooled = dice(
        np.concatenate([t.ravel() for t in truths]), np.concatenate([p.ravel() for p in predictions])
    )
    return {
        "mean_case_dice": float(np.nanmean([dice(t, p) for p, t in zip(predictions, truths)])),
        "pooled_dice": pooled,
    }


def read_mask(path: Path, value: int | None = None) -> np.ndarray:
    from mipseg import io

    array, _ = io.read_image(path)
    return array == value if value is not None else array > 0


def epochs_for_budget(
    dataset: str, minutes: float, iters_per_epoch: int, env: dict[str, str]
) -> tuple[int, float]:
    """Epochs that fit the budget, from the measured seconds per training iteration of the plans."""
    sys.path.insert(0, str(Path(__file__).parent))
    import torch
    from train_speed import time_training_steps

    from mipseg.planning.plans import load_plans

    plans = load_plans(Path(env["MIPSEG_PREPROCESSED"]) / dataset / "plans.json")
    seconds = time_training_steps(plans, torch.device("cpu"), steps=3, warmup=1)
    # ~15 % on top for validation batches, data loading hiccups and checkpoints
    epochs = max(1, int(minutes * 60 / (1.15 * seconds * iters_per_epoch)))
    return epochs, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("mipseg_quality"))
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--test-cases", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=3, default=[48, 80, 80])
    parser.add_argument("--minutes", type=float, default=10.0, help="Training budget per model.")
    parser.add_argument("--iters-per-epoch", type=int, default=25)
    parser.add_argument(
        "--epochs", type=int, help="Fix the epochs instead of deriving them from --minutes (busy machines)."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--trainer", default="plain", help="Trainer of model (c); the dense upper bound (d) is always plain."
    )
    args = parser.parse_args()
    require_stages()

    work = args.workdir.resolve()
    # a scratch folder: stale preprocessed label sets of an earlier run at another shape would fail the plan
    for stale in ("preprocessed", "results", "predictions_pseudo", "predictions_dense"):
        shutil.rmtree(work / stale, ignore_errors=True)
    env = {
        **os.environ,
        "MIPSEG_RAW": str(work / "raw"),
        "MIPSEG_PREPROCESSED": str(work / "preprocessed"),
        "MIPSEG_RESULTS": str(work / "results"),
    }
    os.environ.update({k: env[k] for k in ("MIPSEG_RAW", "MIPSEG_PREPROCESSED", "MIPSEG_RESULTS")})
    d = str(DATASET_ID)
    shape = [str(s) for s in args.shape]
    run(["mipseg_synthesize", "-d", d, "--kind", "vessels", "--cases", str(args.cases), "--shape", *shape,
         "--test-cases", str(args.test_cases), "--seed", str(args.seed), "--overwrite"], env)  # fmt: skip
    run(["mipseg_plan", "-d", d, "--device", "cpu"], env)
    run(["mipseg_pseudolabel", "-d", d], env)

    from mipseg import paths
    from mipseg.synthetic.annotation import best_threshold_dice

    dataset = paths.resolve_dataset(DATASET_ID)
    raw = work / "raw" / dataset
    epochs, seconds_per_iteration = epochs_for_budget(dataset, args.minutes, args.iters_per_epoch, env)
    epochs = args.epochs or epochs
    print(f"{seconds_per_iteration:.2f} s/iteration -> {epochs} epochs of {args.iters_per_epoch} iterations")
    results: dict[str, object] = {
        "cases": args.cases,
        "test_cases": args.test_cases,
        "shape": args.shape,
        "minutes_per_model": None if args.epochs else args.minutes,  # --epochs replaces the budget
        "trainer_c": args.trainer,
        "epochs": epochs,
        "iters_per_epoch": args.iters_per_epoch,
        "seconds_per_iteration": seconds_per_iteration,
    }
    for labels in ("pseudo", "dense"):
        start = time.time()
        trainer = args.trainer if labels == "pseudo" else "plain"
        run(["mipseg_train", "-d", d, "-f", "all", "--labels", labels, "--trainer", trainer,
             "--epochs", str(epochs), "--iters-per-epoch", str(args.iters_per_epoch), "--val-iters", "2",
             "--device", "cpu", "--seed", str(args.seed)], env)  # fmt: skip
        results[f"train_minutes_{labels}"] = round((time.time() - start) / 60, 2)
        output = str(work / f"predictions_{labels}")
        run(["mipseg_predict", "-i", str(raw / "imagesTs"), "-o", output, "-d", d, "-f", "all",
             "--labels", labels, "--trainer", trainer, "--device", "cpu", "--disable-tta"], env)  # fmt: skip

    from mipseg import io

    test_truth_files = sorted((raw / "labelsTs").glob("*.nii.gz"))
    test_truths = [read_mask(p) for p in test_truth_files]
    test_images = [
        io.read_image(raw / "imagesTs" / p.name.replace(".nii.gz", "_0000.nii.gz"))[0]
        for p in test_truth_files
    ]
    threshold_dice, threshold = best_threshold_dice(test_images, test_truths)
    results["a_best_global_threshold"] = {"pooled_dice": threshold_dice, "threshold": threshold}
    pseudo_dir = work / "preprocessed" / dataset / "labelsets" / "pseudo"
    train_truth_files = sorted((raw / "labelsTr").glob("*.nii.gz"))
    results["b_pseudo_labels_on_training_cases"] = folder_dice(
        [read_mask(pseudo_dir / p.name, value=1) for p in train_truth_files],
        [read_mask(p) for p in train_truth_files],
    )
    for key, labels in (("c_model_on_pseudo_labels", "pseudo"), ("d_model_on_dense_labels", "dense")):
        predictions = [read_mask(work / f"predictions_{labels}" / p.name) for p in test_truth_files]
        results[key] = folder_dice(predictions, test_truths)
    c, dense = results["c_model_on_pseudo_labels"], results["d_model_on_dense_labels"]
    results["ratio_c_over_d"] = c["mean_case_dice"] / max(dense["mean_case_dice"], 1e-8)
    (work / "train_quality.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
