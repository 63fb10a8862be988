"""Training on propagated organ labels: what makes the model beat its own labels (issue 22, item 3).

Works on the synthetic source of ``benchmarks/organ_models.py`` (same work folder, dataset, flow
model and simulated drawings; that script's cached steps are reused or run first), one drawn slice
per volume (the suggested slice), flow propagation. Each variant is a label set made by the real
``mipseg_propagate`` / ``mipseg_refine`` commands; a 3D model is trained on it with ``mipseg_train -f
all`` (``--epochs`` x ``--iters``; the default 8 x 15 gives organ_models.py's 120 iterations), once per
``--seeds``, and scored on the unseen test volumes:

- ``band B``: ``--ignore-band B`` (B = 0..3 pixels of ignore around every propagated boundary);
- ``growth G``: ``--ignore-band 1 --ignore-band-growth G`` (the band widens by G pixels per slice of
  distance from the drawn slice: far slices count less, the only down-weighting an ignore label gives);
- ``refined``: the 5 fold models on the default label set (``--dropout 0.3``, the same schedule),
  ``mipseg_refine --labels flow_1 --trainer plain`` (confident learning + uncertainty, as on MIP label
  sets), then the model on the refined set.

Per label set: errors (labelled voxels whose label is not the truth's) and ignored voxels as a share
of the training volumes, and the Dice of its foreground against the truth (ignore counts as not
foreground). Per model: mean Dice on the test volumes over seeds, and the gap to the labels' own
Dice (``model - labels``: the target is > 0). Cached in ``{work}/synthetic/item3_state.json``.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/organ_label_training.py --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import organ_models
from _pipeline import run_command

BASE = "flow_1"
BAND_VARIANTS = {f"band{b}": ["--ignore-band", str(b)] for b in (0, 1, 2, 3)}
GROWTH_VARIANTS = {
    f"growth{str(g).replace('.', '')}": ["--ignore-band", "1", "--ignore-band-growth", str(g)]
    for g in (0.25, 0.5)
}


def labelset_quality(folder: Path, truths: Path) -> dict[str, float]:
    """Errors, ignored voxels (shares of all voxels) and foreground Dice of a label set, pooled over cases."""
    from mipseg import io
    from mipseg.metrics import dice

    ignore = io.read_json(folder / "labelset.json")["ignore"]
    errors = ignored = total = 0
    labelled_all, truth_all = [], []
    for path in sorted(folder.glob("*.nii.gz")):
        if path.name.endswith("_seeds.nii.gz"):
            continue
        labels, _ = io.read_image(path)
        truth, _ = io.read_image(truths / path.name)
        known = labels != ignore
        errors += int(np.count_nonzero(known & (labels != truth)))
        ignored += int(np.count_nonzero(~known))
        total += labels.size
        labelled_all.append((labels > 0) & known)
        truth_all.append(truth > 0)
    return {
        "errors": errors / total,
        "ignored": ignored / total,
        "dice": float(dice(np.concatenate(truth_all, axis=None), np.concatenate(labelled_all, axis=None))),
    }


def train_and_score(labels: str, seed: int, env: dict, d: str, raw: Path, classes: dict, args) -> float:
    """Train ``-f all`` on a label set, predict the test volumes, mean Dice over classes."""
    output = args.work / "synthetic" / "predictions_item3" / f"{labels}_seed{seed}"
    organ_models.train_and_predict(d, labels, seed, raw, output, env, args)
    truths = sorted((raw / "labelsTs").glob("*.nii.gz"))
    return organ_models.folder_scores(output, truths, classes)["mean"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--work", type=Path, default=Path("/tmp/i22/organ_models"))
    parser.add_argument(
        "--skip", nargs="*", default=[], help="Variants not to run (band0, growth05, refined, dense, ...)."
    )
    args = parser.parse_args()
    args.work = args.work.resolve()
    from mipseg import io, paths

    # organ_models.py's own defaults (6 + 3 volumes of 24x48x48, flow model of 100 iterations), one
    # slice, no models: a hand-made namespace fell behind every flag added there since
    base_args = organ_models.build_parser().parse_args(
        ["--sources", "synthetic", "--slices", "1", "--models", "--epochs", str(args.epochs),
         "--iters", str(args.iters), "--work", str(args.work)]
    )  # fmt: skip
    organ_models.run_source("synthetic", 970, base_args)  # the dataset, flow model and drawings (cached)
    work = args.work / "synthetic"
    env = dict(os.environ)
    d = "970"
    state = organ_models.State(work / "item3_state.json")
    raw = Path(organ_models.State(work / "state.json")["dataset"])
    spec = io.read_json(raw / "dataset.json")
    classes = {k: v for k, v in spec["labels"].items() if k not in ("background", "ignore")}
    labelsets = paths.preprocessed_dataset_dir(d) / "labelsets"
    organ_models.draw_suggested(raw, work / "suggested_1.json")
    flow = ["--iters", "100", "--device", "cpu"]

    def run(command: list[str]) -> float:
        return run_command(command, env, "organ_label_training")

    variants = {**BAND_VARIANTS, **GROWTH_VARIANTS}
    for name, flags in variants.items():
        if name not in args.skip and f"labels_{name}" not in state:
            run(["mipseg_propagate", "-d", d, "--method", "flow", "--name", f"{BASE}_{name}", *flow, *flags])
            state.set(f"labels_{name}", labelset_quality(labelsets / f"{BASE}_{name}", raw / "labelsTr"))
    if "refined" not in args.skip and "labels_refined" not in state:
        run(["mipseg_propagate", "-d", d, "--method", "flow", "--name", BASE, *flow])
        schedule = ["--epochs", str(args.epochs), "--iters-per-epoch", str(args.iters), "--val-iters", "1"]
        for fold in range(5):
            run(["mipseg_train", "-d", d, "-f", str(fold), "--labels", BASE, "--dropout", "0.3", *schedule,
                 "--device", "cpu", "--num-workers", "0", "--seed", "0"])  # fmt: skip
        run(["mipseg_refine", "-d", d, "--labels", BASE, "--name", f"{BASE}_refined", "--trainer", "plain",
             "--device", "cpu"])  # fmt: skip
        state.set("labels_refined", labelset_quality(labelsets / f"{BASE}_refined", raw / "labelsTr"))
    names = [n for n in [*variants, "refined", "dense"] if n not in args.skip]
    if "dense" in names:
        state.set("labels_dense", {"errors": 0.0, "ignored": 0.0, "dice": 1.0})  # labelsTr itself
    iterations = args.epochs * args.iters
    suffix = "" if iterations == 120 else f"_it{iterations}"  # 120: organ_models.py's schedule
    for seed in args.seeds:
        for name in names:
            key = f"model_{name}_seed{seed}{suffix}"
            if key not in state:
                labels = "dense" if name == "dense" else f"{BASE}_{name}"
                state.set(key, train_and_score(labels, seed, env, d, raw, classes, base_args))
    print(f"{iterations} training iterations per model, seeds {args.seeds}")
    print(
        f"{'label set':<14}{'errors %':>10}{'ignored %':>11}{'labels Dice':>13}{'model Dice':>12}"
        f"{'per seed':>20}{'model-labels':>14}"
    )
    reference = state["labels_band0"]["dice"] if "labels_band0" in state else float("nan")
    for name in names:
        quality = state[f"labels_{name}"]
        models = [state[f"model_{name}_seed{s}{suffix}"] for s in args.seeds]
        mean = float(np.mean(models))
        print(
            f"{name:<14}{100 * quality['errors']:>10.2f}{100 * quality['ignored']:>11.2f}"
            f"{quality['dice']:>13.3f}"
            f"{mean:>12.3f}{' / '.join(f'{m:.3f}' for m in models):>20}{mean - reference:>+14.3f}"
        )
    print("model-labels: against the propagated labels without a band (band0), where every variant starts")
    (work / f"item3_results{suffix}.json").write_text(json.dumps(state.data, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
