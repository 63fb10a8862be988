"""What mipseg_find_best_configuration chose, and what its postprocessing does against dense truth.

For a dataset whose models are trained (folds with out-of-fold predictions) and that has dense
truth (synthetic data), runs ``find_best_configuration`` and prints two tables:

1. every candidate (models and pairwise ensembles): out-of-fold foreground Dice on the labelled
   voxels (what chooses) and against dense truth (reported only);
2. the winner's out-of-fold predictions under each postprocessing: none, the decided rules, and,
   for comparison, "keep the largest component" and a plain "min_size" of the decided size,
   scored on the labelled voxels and against dense truth (mean per-case Dice over classes).

Usage (data roots from MIPSEG_RAW / MIPSEG_PREPROCESSED / MIPSEG_RESULTS)::

    .venv/bin/python benchmarks/best_configuration.py -d 960 [--structure auto|vessel|organ]
"""

from __future__ import annotations

import argparse

import numpy as np
from rich.console import Console
from rich.table import Table

from mipseg import io, paths
from mipseg.inference.postprocessing import apply_rules
from mipseg.labelset import LabelSet
from mipseg.metrics import dice_per_class
from mipseg.planning.plans import load_plans
from mipseg.selection.oof import Candidate, foreground_mean
from mipseg.selection.selection_api import find_best_configuration, winner_cases

console = Console()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-d", "--dataset", required=True)
    parser.add_argument("--structure", default="auto")
    args = parser.parse_args()
    result = find_best_configuration(args.dataset, structure=args.structure)

    table = Table(title=f"candidates (out-of-fold, {len(result['cases'])} cases)")
    for column in ("candidate", "Dice labelled voxels (chooses)", "Dice dense truth (reported)"):
        table.add_column(column)
    for row in result["candidates"]:
        mark = " *" if row["name"] == result["best"]["name"] else ""
        dense = row.get("dense_foreground_dice", float("nan"))
        table.add_row(row["name"] + mark, f"{row['foreground_dice']:.4f}", f"{dense:.4f}")
    console.print(table)

    root = paths.results_dataset_dir(args.dataset)
    best = Candidate(tuple(root / name for name in result["best"]["models"]))
    reference_set = LabelSet.of(args.dataset, result["reference_labelset"])
    dense_set = LabelSet.of(args.dataset, "dense")
    rules = result["postprocessing"]["rules"]
    variants = {"none": {}, "decided " + str(rules): rules}
    classes = sorted(int(v) for v in result["candidates"][0]["labelset_dice"])
    variants["largest (organ rule)"] = {str(c): {"kind": "largest"} for c in classes}
    sizes = {v["min_size"] for v in rules.values() if "min_size" in v}
    for size in sorted(sizes):
        variants[f"min_size {size} (not tree)"] = {
            str(c): {"kind": "min_size", "min_size": size} for c in classes
        }
    spec = io.read_json(best.models[0] / "dataset.json")
    ignore = load_plans(best.models[0] / "plans.json").ignore_label
    table = Table(title=f"postprocessing of {best.name} (out-of-fold)")
    for column in ("rules", "Dice labelled voxels", "Dice dense truth"):
        table.add_column(column)
    for name, variant in variants.items():
        labelled = {str(c): [] for c in classes}
        dense = {str(c): [] for c in classes}
        for index, (segmentation, reference) in enumerate(
            winner_cases(best, result["cases"], reference_set, spec["labels"])
        ):
            processed = apply_rules(segmentation, variant)
            for value, dice in dice_per_class(reference, processed, classes, ignore).items():
                labelled[value].append(dice)
            truth = np.load(dense_set.preprocessed_file(result["cases"][index]))[0]
            for value, dice in dice_per_class(truth, processed, classes).items():
                dense[value].append(dice)
        table.add_row(name, f"{foreground_mean(labelled)[1]:.4f}", f"{foreground_mean(dense)[1]:.4f}")
    console.print(table)


if __name__ == "__main__":
    main()
