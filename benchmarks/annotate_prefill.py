"""How many pixels a person changes from each of mipseg_annotate's starting points.

On synthetic datasets the true drawing is known: on a MIP it is the brightest-voxel rule
(``simulate_mip_annotation``: a pixel is vessel where the brightest voxel of its ray is), on a slice
it is the slice of the dense truth. The number of pixels a person has to paint or erase to turn a
starting drawing into the true one (``mipseg.annotate.prefill.pixels_to_change``) stands for
annotation time. Starting points, exactly as the page computes them:

* empty;
* threshold of the image at ``default_level`` (where the slider starts: Otsu's level among the
  pixels above Otsu's level), and at the best level for that drawing (the best a person can reach
  with the slider alone: an oracle);
* the label set projected along the axis: for vessels ``pseudo`` made from the axis-0 drawing only,
  scored on the axis-1 and axis-2 drawings (the case "draw axis 0, then the others start
  pre-filled"); for organs ``propagated`` from the middle slice, scored on a second slice halfway to
  the organ's end (the case "draw a second slice");
* a model's prediction (fold ``all`` trained on another synthetic dataset's label set for a few
  minutes on the CPU, so it never saw these cases), predicted and cached by ``ModelPrefill``.

Projections use the brightest-voxel rule (``brightest``) and, for comparison, "any labelled voxel on
the ray" (``any``). The script also prints the rank correlation between the model's expected changes
(the case order of the page) and the pixels actually changed from the model's drawing.

Usage::

    .venv/bin/python benchmarks/annotate_prefill.py [--cases 6] [--train-cases 8] [--epochs 12]
        [--iters 25] [--work /tmp/annotate_prefill]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from scipy.stats import spearmanr
from skimage.filters import threshold_multiotsu, threshold_otsu

sys.path.insert(0, str(Path(__file__).parent))
from _pipeline import run_command  # noqa: E402

SHAPES = {"vessels": (40, 80, 80), "organs": (32, 80, 80)}
STARTS = ("empty", "threshold (default)", "threshold (best level)", "label set", "label set (any)", "model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=6, help="cases to annotate per kind")
    parser.add_argument("--train-cases", type=int, default=8, help="cases the model is trained on")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--iters", type=int, default=25, help="iterations per epoch")
    parser.add_argument("--work", type=Path, default=Path("/tmp/annotate_prefill"))
    parser.add_argument("--kinds", nargs="+", default=["vessels", "organs"])
    parser.add_argument("--reuse", action="store_true", help="measure again on --work's datasets and models")
    args = parser.parse_args()
    if args.work.exists() and not args.reuse:
        shutil.rmtree(args.work)
    env = dict(os.environ)
    for variable, name in (("MIPSEG_RAW", "raw"), ("MIPSEG_PREPROCESSED", "pre"), ("MIPSEG_RESULTS", "res")):
        env[variable] = os.environ[variable] = str(args.work / name)
    rows, correlations = [], {}
    began = time.time()
    for offset, kind in enumerate(args.kinds):
        train_id, annotate_id = 951 + 2 * offset, 952 + 2 * offset
        if args.reuse:
            from mipseg import paths

            labels = "pseudo" if kind == "vessels" else "propagated"
            model_dir = paths.results_dataset_dir(annotate_id) / f"plain__{labels}__3d_fullres"
        else:
            model_dir = train_model(kind, train_id, annotate_id, args, env)
            make_label_set(kind, annotate_id, env)
        kind_rows, correlations[kind] = measure(kind, annotate_id, model_dir)
        rows += kind_rows
    print_table(rows, correlations, time.time() - began, args)


def train_model(kind: str, train_id: int, annotate_id: int, args, env: dict[str, str]) -> Path:
    """Synthesize the training and the to-annotate datasets; train on the first, copy the model over."""
    shape = [str(s) for s in SHAPES[kind]]
    common = ["--kind", kind, "--shape", *shape, "--test-cases", "0"]
    axes = ["--mip-axes", "0,1,2"] if kind == "vessels" else []
    caller = "annotate_prefill"
    run_command(
        ["mipseg_synthesize", "-d", str(train_id), *common, "--cases", str(args.train_cases)], env, caller
    )
    run_command(
        [
            "mipseg_synthesize",
            "-d",
            str(annotate_id),
            *common,
            *axes,
            "--cases",
            str(args.cases),
            "--seed",
            "7",
        ],
        env,
        caller,
    )
    run_command(["mipseg_plan", "-d", str(train_id), "-np", "1"], env, caller)
    labels = "pseudo" if kind == "vessels" else "propagated"
    if kind == "vessels":
        run_command(["mipseg_pseudolabel", "-d", str(train_id)], env, caller)
    else:
        run_command(["mipseg_propagate", "-d", str(train_id), "--method", "registration"], env, caller)
    train = ["mipseg_train", "-d", str(train_id), "-f", "all", "--labels", labels, "--trainer", "plain"]
    train += ["--epochs", str(args.epochs), "--iters-per-epoch", str(args.iters), "--val-iters", "1"]
    run_command(train + ["--device", "cpu", "--num-workers", "0"], env, caller)
    from mipseg import paths

    source = paths.model_dir(train_id, "plain", labels)
    destination = paths.results_dataset_dir(annotate_id) / source.name
    shutil.copytree(source, destination)
    return destination


def make_label_set(kind: str, annotate_id: int, env: dict[str, str]) -> None:
    """The label set the page offers: pseudo from axis 0 only / propagated from the middle slice."""
    if kind == "vessels":
        command = ["mipseg_pseudolabel", "-d", str(annotate_id), "--axes", "0"]
    else:
        command = ["mipseg_propagate", "-d", str(annotate_id), "--method", "registration"]
    run_command(command, env, "annotate_prefill")


def best_threshold_changes(plane: np.ndarray, truth: np.ndarray) -> int:
    """Fewest pixels to change over 200 slider positions (percentiles 50..99.9 of the plane)."""
    from mipseg.annotate.prefill import pixels_to_change, threshold_drawing

    levels = np.unique(np.percentile(plane, np.linspace(50, 99.9, 200)))
    return min(pixels_to_change(threshold_drawing(plane, level), truth) for level in levels)


THRESHOLD_RULES = {
    "Otsu": threshold_otsu,
    "multi-Otsu (3 classes) upper": lambda plane: threshold_multiotsu(plane, classes=3)[-1],
    "90th percentile": lambda plane: float(np.percentile(plane, 90)),
    "Otsu of the pixels above Otsu (default)": None,
}


def threshold_rules(plane: np.ndarray, truth: np.ndarray) -> dict[str, int]:
    """Pixels to change from the threshold at each candidate starting level of the slider."""
    from mipseg.annotate.prefill import default_level, pixels_to_change, threshold_drawing

    return {
        f"rule: {name}": pixels_to_change(threshold_drawing(plane, (rule or default_level)(plane)), truth)
        for name, rule in THRESHOLD_RULES.items()
    }


def measure(kind: str, annotate_id: int, model_dir: Path) -> tuple[list[dict], float]:
    """Pixels to change per drawing and start; Spearman of expected vs actual model changes per case."""
    from mipseg import io
    from mipseg.annotate import prefill
    from mipseg.annotate.annotate_api import open_session
    from mipseg.annotate.store import Target
    from mipseg.synthetic.annotation import simulate_mip_annotation

    session = open_session(annotate_id, trainer="plain", labels=model_dir.name.split("__")[1], device="cpu")
    started = time.time()
    session.start_model()
    session.model.wait()
    print(f"  model predictions of {len(session.store.case_ids)} cases: {time.time() - started:.0f} s")
    labelset = "pseudo" if kind == "vessels" else "propagated"
    ignore = session.store.spec.ignore_label
    rows, expected, actual = [], [], []
    for case in session.store.dataset.cases:
        volume, _ = session.views.volume(case.case_id)
        truth3d, _ = io.read_image(case.label)
        labels = prefill.read_labelset_case(session.store.dataset.name, labelset, case.case_id, volume.shape)
        model_labels = session.model.labels(case.case_id)
        if kind == "vessels":
            targets = [(Target(case.case_id, "mip", axis), axis != 0) for axis in (0, 1, 2)]
        else:
            extent = np.flatnonzero(truth3d.any(axis=(1, 2)))
            middle = int((extent[0] + extent[-1]) // 2)
            second = int((extent[0] + middle) // 2)
            targets = [
                (Target(case.case_id, "slice", middle), False),
                (Target(case.case_id, "slice", second), True),
            ]
        model_total = 0
        for target, labelset_applies in targets:
            plane, depth = session.views.plane(target), session.views.depth(target)
            if kind == "vessels":
                truth = simulate_mip_annotation(volume, truth3d, target.index)
                name = f"MIP axis {target.index}"
            else:
                truth = truth3d[target.index].astype(np.uint8)
                name = "middle slice (the drawn one)" if not labelset_applies else "second slice"
            changes = {
                **threshold_rules(plane, truth),
                "empty": prefill.pixels_to_change(np.zeros_like(truth), truth),
                "threshold (default)": prefill.pixels_to_change(
                    prefill.threshold_drawing(plane, prefill.default_level(plane)), truth
                ),
                "threshold (best level)": best_threshold_changes(plane, truth),
                "model": prefill.pixels_to_change(
                    prefill.labels_on_target(model_labels, target.kind, target.index, depth, ignore), truth
                ),
            }
            if kind == "vessels":
                changes["model (any)"] = prefill.pixels_to_change(
                    prefill.labels_on_target(model_labels, "mip", target.index, depth, ignore, "any"), truth
                )
            if labelset_applies:
                changes["label set"] = prefill.pixels_to_change(
                    prefill.labels_on_target(labels, target.kind, target.index, depth, ignore), truth
                )
                if kind == "vessels":
                    changes["label set (any)"] = prefill.pixels_to_change(
                        prefill.labels_on_target(labels, "mip", target.index, depth, ignore, "any"), truth
                    )
            rows.append({"kind": kind, "drawing": name, "case": case.case_id, **changes})
            model_total += changes["model"]
        expected.append(session.model.case_expected_changes(case.case_id))
        actual.append(model_total)
    return rows, float(spearmanr(expected, actual).statistic) if len(actual) > 2 else float("nan")


def print_table(rows: list[dict], correlations: dict[str, float], seconds: float, args) -> None:
    columns = [*STARTS[:5], "model", "model (any)"]
    table = Table(title=f"pixels to change per drawing (mean over {args.cases} cases; % of empty)")
    table.add_column("data")
    table.add_column("drawing")
    for column in columns:
        table.add_column(column, justify="right")
    markdown = ["| data | drawing | " + " | ".join(columns) + " |", "|---|---|" + "---:|" * len(columns)]
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["kind"], row["drawing"]), []).append(row)
    for (kind, drawing), members in groups.items():
        empty = np.mean([m["empty"] for m in members])
        cells = []
        for column in columns:
            values = [m[column] for m in members if column in m]
            if not values:
                cells.append("n/a")
            elif column == "empty":
                cells.append(f"{empty:.0f}")
            else:
                cells.append(f"{np.mean(values):.0f} ({100 * np.mean(values) / empty:.0f}%)")
        table.add_row(kind, drawing, *cells)
        markdown.append(f"| {kind} | {drawing} | " + " | ".join(cells) + " |")
    console = Console()
    console.print(table)
    for kind, rho in correlations.items():
        console.print(
            f"{kind}: Spearman rank correlation, model's expected changes vs pixels changed: {rho:.2f}"
        )
    rules = Table(title="threshold slider's starting level: pixels to change (mean per drawing)")
    rules.add_column("data")
    for name in ["empty", *THRESHOLD_RULES, "best level"]:
        rules.add_column(name, justify="right")
    for kind in dict.fromkeys(row["kind"] for row in rows):
        members = [row for row in rows if row["kind"] == kind]
        keys = ["empty", *(f"rule: {name}" for name in THRESHOLD_RULES), "threshold (best level)"]
        rules.add_row(kind, *(f"{np.mean([m[key] for m in members]):.0f}" for key in keys))
    console.print(rules)
    trained = (
        "models of an earlier run (--reuse)"
        if args.reuse
        else (f"model: {args.epochs} epochs x {args.iters} iterations on {args.train_cases} cases")
    )
    console.print(f"total {seconds / 60:.1f} min; {trained}")
    print("\n".join(markdown))


if __name__ == "__main__":
    main()
