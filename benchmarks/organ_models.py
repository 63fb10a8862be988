"""From a few drawn slices to a trained organ model: Dice on unseen volumes against the dense-label model.

For every source (synthetic organs; ``../shared/data/abdomen_ct_small`` and ``abdomen_mr_small``
with liver, spleen and both kidneys from their TotalSegmentator organ maps), the real pipeline
runs with its commands in a work folder:

1. a raw dataset with training and test volumes (``annotation: slice``);
2. ``mipseg_plan``; ``mipseg_propagate --suggest K`` for K = 1, 2, 3 drawn slices per volume
   (the flow model is trained once, self-supervised, on the images); with ``--suggest-mode next``,
   K > 1 is one suggested slice, drawn, then ``--suggest-next K-1`` over its propagated extent;
3. the simulated annotator draws the suggested slices (the dense truth on those slices, every
   organ on them); ``mipseg_propagate`` with ``--method flow`` and ``registration`` writes label
   sets ``flow_K`` / ``registration_K``, whose Dice against the training truth is the *labels* line
   (a second table gives it also with the unsure voxels left out, and their share);
4. ``mipseg_train -f all`` on each label set and on the dense labels, with the same epochs and
   iterations; ``mipseg_predict`` on the test volumes, Dice per organ against their truth.

Real scans: one scan per modality is too few for training folds, so every volume of a source is
a *sub-volume crop with augmentation* of the one scan: a random run of ``--real-depth`` slices
(of 30 CT / 20 MR), an in-plane random affine (rotation +-10 deg, scale 0.9-1.1, shift +-5 px),
a smooth elastic displacement (2 px, sigma 8 px), intensity scale/shift and noise, resampled
in-plane by ``--real-zoom`` (0.5: 6 mm pixels) to fit the CPU budget. Training and test volumes
use different random draws, so "unseen" means unseen crops and deformations of the same
patient, not unseen patients; the truth is TotalSegmentator's prediction, not manual.

``--jobs N`` trains N of the models at once, each with ``OMP_NUM_THREADS`` (or the core count)
divided by N threads. Everything is cached under ``--work`` (default ``/tmp/i22/organ_models``): a
rerun skips the finished steps (``state.json`` per source) and resumes where it stopped. Prints the
table and writes ``results.json`` and the plot (``--plot``).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/organ_models.py \\
        --epochs 8 --iters 15 --plot documentation/images/organ_models.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from _pipeline import run_command
from scipy import ndimage

from mipseg.metrics import dice

ORGANS = {"liver": 5, "spleen": 1, "kidney_right": 2, "kidney_left": 3}
METHODS = ("flow", "registration")
SOURCES = ("synthetic", "abdomen_ct_small", "abdomen_mr_small")


# --- datasets ------------------------------------------------------------------------------------


def augmented_crop(
    image: np.ndarray, organs: np.ndarray, depth: int, zoom: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One sub-volume crop of a scan ``(D, H, W)`` with random in-plane affine + elastic + intensity.

    Returns the image ``(depth, round(H * zoom), round(W * zoom))`` float32 and the label map
    resampled the same way (nearest neighbour).
    """
    start = int(rng.integers(0, image.shape[0] - depth + 1))
    image, organs = image[start : start + depth], organs[start : start + depth]
    height, width = image.shape[1:]
    out_h, out_w = round(height * zoom), round(width * zoom)
    angle = np.deg2rad(rng.uniform(-10, 10))
    scale = rng.uniform(0.9, 1.1)
    shift = rng.uniform(-5, 5, size=2)
    rows, cols = np.mgrid[:out_h, :out_w].astype(np.float64)
    y, x = rows / zoom - height / 2, cols / zoom - width / 2  # output pixel -> centred input position
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    source_y = cos * y - sin * x + height / 2 + shift[0]
    source_x = sin * y + cos * x + width / 2 + shift[1]
    elastic = [ndimage.gaussian_filter(rng.normal(size=(out_h, out_w)), 8 * zoom) for _ in range(2)]
    elastic = [2.0 * e / max(np.abs(e).max(), 1e-6) for e in elastic]
    coordinates = np.stack([source_y + elastic[0], source_x + elastic[1]])
    smooth = ndimage.gaussian_filter(image.astype(np.float32), (0, 0.5 / zoom, 0.5 / zoom))  # anti-alias
    low, high = np.percentile(image, (0.5, 99.5))
    out_image = np.stack([ndimage.map_coordinates(s, coordinates, order=1, mode="nearest") for s in smooth])
    out_labels = np.stack([ndimage.map_coordinates(o, coordinates, order=0, mode="constant") for o in organs])
    out_image = out_image * rng.uniform(0.9, 1.1) + rng.uniform(-0.05, 0.05) * (high - low)
    out_image += rng.normal(scale=0.01 * (high - low), size=out_image.shape)
    return out_image.astype(np.float32), out_labels.astype(np.uint8)


def write_real_dataset(raw_root: Path, dataset_id: int, source: str, args) -> Path:
    """Training and test crops of one real scan as a slice-annotated raw dataset (organ values 1..4)."""
    from mipseg import io
    from mipseg.io import Geometry

    image, geometry = io.read_image(args.shared / f"{source}.nii.gz", dtype=np.float32)
    organ_map, _ = io.read_image(args.shared / f"{source}_organs.nii.gz")
    organs = np.zeros(organ_map.shape, np.uint8)
    for value, (_, total_value) in enumerate(ORGANS.items(), start=1):
        organs[organ_map == total_value] = value
    folder = raw_root / f"Dataset{dataset_id:03d}_{source}"
    depth = min(args.real_depth, image.shape[0])
    z_spacing, y_spacing, x_spacing = geometry.spacing_zyx
    spacing = (z_spacing, y_spacing / args.real_zoom, x_spacing / args.real_zoom)
    rng = np.random.default_rng(args.seed)
    for split, count in (("Tr", args.cases), ("Ts", args.test_cases)):
        for number in range(count):
            crop, labels = augmented_crop(image, organs, depth, args.real_zoom, rng)
            out_geometry = Geometry.identity(spacing)
            case = f"{source}_{split.lower()}{number:02d}"
            io.write_image(crop, out_geometry, folder / f"images{split}" / f"{case}_0000.nii.gz")
            io.write_image(labels, out_geometry, folder / f"labels{split}" / f"{case}.nii.gz")
    io.write_json(
        {
            "channel_names": {"0": "CT" if "ct" in source else "MRI"},
            "labels": {"background": 0, **{name: value for value, name in enumerate(ORGANS, start=1)}},
            "numTraining": args.cases,
            "file_ending": ".nii.gz",
            "annotation": "slice",
        },
        folder / "dataset.json",
    )
    return folder


def write_source_dataset(source: str, dataset_id: int, args) -> Path:
    """The raw dataset of one source (synthetic organs or crops of a real scan)."""
    from mipseg import paths
    from mipseg.synthetic import synthesize_dataset

    if source == "synthetic":
        return synthesize_dataset(
            dataset_id,
            "organs",
            num_cases=args.cases,
            num_test_cases=args.test_cases,
            shape=tuple(args.synthetic_shape),
            seed=args.seed,
            overwrite=True,
            show_progress=False,
        )
    return write_real_dataset(paths.raw_root(), dataset_id, source, args)


def draw_suggested(raw: Path, *suggestions: Path, empty: bool = False) -> dict[str, list[int]]:
    """Simulated annotator: the dense truth on every slice of the suggestion files that shows an organ.

    Earlier drawings of each case are removed first; several files (``--suggest 1`` and then
    ``--suggest-next``) are drawn together. ``empty``: a suggested slice that shows no organ is
    drawn too, empty ("no organ here"), where another slice of the case shows one.
    """
    from mipseg import io

    slices: dict[str, set[int]] = {}
    for path in suggestions:
        for case_id, entry in io.read_json(path)["cases"].items():
            slices.setdefault(case_id, set()).update(int(i) for i in entry["slices"])
    drawn = {}
    for case_id, indices in slices.items():
        for old in (raw / "annotationsTr").glob(f"{case_id}_slice*.png"):
            old.unlink()
        truth, _ = io.read_image(raw / "labelsTr" / f"{case_id}.nii.gz")
        showing = [i for i in sorted(indices) if truth[i].any()]
        drawn[case_id] = sorted(indices) if empty and showing else showing
        for index in drawn[case_id]:
            io.write_png(truth[index].astype(np.uint8), raw / "annotationsTr" / f"{case_id}_slice{index}.png")
    return drawn


# --- scoring -------------------------------------------------------------------------------------


def class_dice(prediction: np.ndarray, truth: np.ndarray, classes: dict[str, int]) -> dict[str, float]:
    """Dice per class (NaN when the class is absent from both)."""
    return {name: dice(truth == value, prediction == value) for name, value in classes.items()}


def folder_scores(predictions: Path, truths: list[Path], classes: dict[str, int]) -> dict[str, float]:
    """Mean over test volumes of the Dice per class, and ``mean`` over classes."""
    from mipseg import io

    per_case = []
    for truth_path in truths:
        truth, _ = io.read_image(truth_path)
        prediction, _ = io.read_image(predictions / truth_path.name)
        per_case.append(class_dice(prediction, truth, classes))
    scores = {name: float(np.nanmean([case[name] for case in per_case])) for name in classes}
    scores["mean"] = float(np.nanmean(list(scores.values())))
    return scores


def agreement_dice(means: dict, classes: dict[str, int]) -> dict[str, float]:
    """Per-class Dice of a :func:`~mipseg.labelset.mean_agreement` and their ``mean``."""
    scores = {name: means[name]["dice"] for name in classes if means.get(name, {}).get("dice") is not None}
    scores["mean"] = float(np.mean(list(scores.values()))) if scores else float("nan")
    return scores


def labelset_scores(report: dict, classes: dict[str, int]) -> dict[str, float]:
    """Mean agreement Dice of a propagated label set with the training truth, per class and ``mean``."""
    return agreement_dice(report["summary"]["agreement_mean"], classes)


def labelset_scores_without_unsure(labelset: Path, raw: Path, classes: dict[str, int]) -> dict[str, float]:
    """The second reading of a label set: Dice only on the voxels it commits to (unsure left out).

    ``labelset_scores`` judges the propagated masks themselves (the voxels that two-sided fusion
    marks unsure count as labelled, as the union of both sides); here the label map as training
    sees it is scored with its unsure (ignore) voxels left out of both the labels and the truth.
    Returns the per-class and ``mean`` Dice (mean over cases, as the report), ``unsure_volume`` (share
    of the volume marked unsure) and ``unsure_organ`` (unsure voxels over the organ voxels of truth
    or labels), each a mean over cases.
    """
    from mipseg import io
    from mipseg.labelset import agreement, mean_agreement

    ignore = io.read_json(labelset / "labelset.json")["ignore"]
    scored, unsure_volume, unsure_organ = [], [], []
    for path in sorted(labelset.glob("*.nii.gz")):
        labels, _ = io.read_image(path)
        truth, _ = io.read_image(raw / "labelsTr" / path.name)
        unsure = labels == ignore
        organ = (truth != 0) | ((labels != 0) & ~unsure)
        scored.append(agreement(labels, truth, classes, region=~unsure))
        unsure_volume.append(float(unsure.mean()))
        unsure_organ.append(float(unsure.sum() / max(int(organ.sum()), 1)))
    return {
        **agreement_dice(mean_agreement(scored), classes),
        "unsure_volume": float(np.mean(unsure_volume)),
        "unsure_organ": float(np.mean(unsure_organ)),
    }


# --- the pipeline of one source ------------------------------------------------------------------


class State:
    """``state.json`` of one source: what finished, so a rerun resumes."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def __getitem__(self, key: str):
        return self.data[key]

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")


def run_source(source: str, dataset_id: int, args) -> dict:
    """Propagate, train and score everything of one source; returns its finished state."""
    from mipseg import io, paths

    work = args.work / source
    work.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "MIPSEG_RAW": str(work / "raw"),
        "MIPSEG_PREPROCESSED": str(work / "preprocessed"),
        "MIPSEG_RESULTS": str(work / "results"),
    }
    os.environ.update({k: env[k] for k in ("MIPSEG_RAW", "MIPSEG_PREPROCESSED", "MIPSEG_RESULTS")})
    state = State(work / "state.json")
    d = str(dataset_id)
    if "dataset" not in state:
        shutil.rmtree(work / "raw", ignore_errors=True)
        shutil.rmtree(work / "preprocessed", ignore_errors=True)
        raw = write_source_dataset(source, dataset_id, args)
        run_command(["mipseg_plan", "-d", d, "--device", "cpu"], env, "organ_models")
        state.set("dataset", str(raw))
    raw = Path(state["dataset"])
    spec = io.read_json(raw / "dataset.json")
    classes = {k: v for k, v in spec["labels"].items() if k not in ("background", "ignore")}
    flow = ["--iters", str(args.flow_iters), "--device", "cpu"]
    suggestions = paths.preprocessed_dataset_dir(d) / "suggested_slices.json"

    def drawing_files(count: int) -> list[Path]:
        if args.suggest_mode == "next" and count > 1:  # the first drawing, then the next ones
            return [work / "suggested_1.json", work / f"suggested_{count}.json"]
        return [work / f"suggested_{count}.json"]

    for count in sorted(set(args.slices) | ({1} if args.suggest_mode == "next" else set())):
        if f"drawn_{count}" not in state:
            if args.suggest_mode == "next" and count > 1:
                draw_suggested(raw, work / "suggested_1.json", empty=args.draw_empty)
                command = ["mipseg_propagate", "-d", d, "--suggest-next", str(count - 1), *flow]
            else:
                command = ["mipseg_propagate", "-d", d, "--suggest", str(count), *flow]
            run_command(command, env, "organ_models")
            shutil.copy(suggestions, work / f"suggested_{count}.json")
            state.set(f"drawn_{count}", draw_suggested(raw, *drawing_files(count), empty=args.draw_empty))
        if count not in args.slices:
            continue
        for method in METHODS:
            name = f"{method}_{count}"
            folder = paths.preprocessed_dataset_dir(d) / "labelsets" / name
            if f"labels_{name}" not in state:
                draw_suggested(raw, *drawing_files(count), empty=args.draw_empty)  # this count's drawings
                command = ["mipseg_propagate", "-d", d, "--method", method, "--name", name, *flow]
                seconds = run_command([*command, *args.propagate_flags], env, "organ_models")
                report = io.read_json(folder / "report.json")
                state.set(f"labels_{name}", {**labelset_scores(report, classes), "seconds": seconds})
            # also for label sets scored before this reading existed (their folder is still there)
            if f"labels_sure_{name}" not in state and (folder / "labelset.json").exists():
                state.set(f"labels_sure_{name}", labelset_scores_without_unsure(folder, raw, classes))
    truths = sorted((raw / "labelsTs").glob("*.nii.gz"))
    todo = [
        labels
        for labels in model_order(args.slices)
        if f"model_{labels}" not in state and (args.models is None or labels in args.models)
    ]
    # Each model trains into its own results folder and predicts into its own output, so --jobs
    # models can run side by side; only state.json is shared, and it is written under a lock.
    model_env = {**env, "OMP_NUM_THREADS": str(threads_per_job(args.jobs))} if args.jobs > 1 else env
    lock = threading.Lock()

    def train_one(labels: str) -> None:
        output = work / "predictions" / labels
        seconds = train_and_predict(d, labels, args.seed, raw, output, model_env, args)
        scores = folder_scores(output, truths, classes)
        with lock:
            state.set(
                f"model_{labels}",
                {**scores, "train_seconds": seconds, "iterations": args.epochs * args.iters},
            )

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for finished in [pool.submit(train_one, labels) for labels in todo]:
            finished.result()  # re-raises a failed command's SystemExit here
    return state.data


def threads_per_job(jobs: int) -> int:
    """Threads of each of ``jobs`` trainings running at once: the CPU cores shared out, at least one.

    ``OMP_NUM_THREADS``, when set, is taken as the whole budget instead of the core count.
    """
    budget = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    return max(1, budget // jobs)


def train_and_predict(d: str, labels: str, seed: int, raw: Path, output: Path, env: dict, args) -> float:
    """``mipseg_train -f all`` on a label set at the benchmark's schedule, then ``mipseg_predict`` of
    the test volumes into ``output``; returns the training seconds."""
    schedule = ["--epochs", str(args.epochs), "--iters-per-epoch", str(args.iters), "--val-iters", "1"]
    train = ["mipseg_train", "-d", d, "-f", "all", "--labels", labels, *schedule, "--device", "cpu",
             "--num-workers", "0", "--seed", str(seed),
             "--undrawn-classes", args.undrawn_classes]  # fmt: skip
    seconds = run_command(train, env, "organ_models")
    shutil.rmtree(output, ignore_errors=True)
    predict = ["mipseg_predict", "-i", str(raw / "imagesTs"), "-o", str(output), "-d", d, "-f", "all",
               "--labels", labels, "--device", "cpu", "--disable-tta"]  # fmt: skip
    run_command(predict, env, "organ_models")
    return seconds


def model_order(slices: list[int]) -> list[str]:
    """Label sets to train on, most telling first (a cut-off run still answers the main question)."""
    order = ["dense", *(f"flow_{k}" for k in sorted(slices, reverse=True))]
    order += [f"registration_{k}" for k in sorted(slices, reverse=True)]
    return order


# --- table and plot ------------------------------------------------------------------------------


def table(results: dict[str, dict], slices: list[int]) -> str:
    """Mean Dice over organs: propagated labels (training volumes) and models (test volumes)."""
    lines = [
        f"{'source':<18}{'labels':<14}{'slices':>7}{'labels Dice':>13}{'model Dice':>12}"
        f"{'model/dense':>13}{'model-labels':>14}"
    ]
    for source, state in results.items():
        dense = state.get("model_dense", {}).get("mean", float("nan"))
        lines.append(f"{source:<18}{'dense':<14}{'all':>7}{1.0:>13.3f}{dense:>12.3f}{1.0:>13.3f}{'':>14}")
        for method in METHODS:
            for count in slices:
                name = f"{method}_{count}"
                label = state.get(f"labels_{name}", {}).get("mean", float("nan"))
                model = state.get(f"model_{name}", {}).get("mean", float("nan"))
                lines.append(
                    f"{source:<18}{method:<14}{count:>7}{label:>13.3f}{model:>12.3f}"
                    f"{model / dense if dense > 0 else float('nan'):>13.3f}{model - label:>+14.3f}"
                )
    return "\n".join(lines)


def reading_table(results: dict[str, dict], slices: list[int]) -> str:
    """Labels Dice in two readings: unsure voxels counted as labelled (the main table) or left out."""
    lines = [
        f"{'source':<18}{'labels':<14}{'slices':>7}{'unsure in':>12}{'unsure out':>12}"
        f"{'unsure/volume':>15}{'unsure/organ':>14}"
    ]
    for source, state in results.items():
        for method in METHODS:
            for count in slices:
                name = f"{method}_{count}"
                if f"labels_sure_{name}" not in state:
                    continue
                sure = state[f"labels_sure_{name}"]
                lines.append(
                    f"{source:<18}{method:<14}{count:>7}"
                    f"{state.get(f'labels_{name}', {}).get('mean', float('nan')):>12.3f}{sure['mean']:>12.3f}"
                    f"{sure['unsure_volume']:>15.2%}{sure['unsure_organ']:>14.1%}"
                )
    return "\n".join(lines)


def organ_table(results: dict[str, dict], slices: list[int]) -> str:
    """Dice per organ of the flow label sets and models (the multi-organ sources)."""
    lines = []
    for source, state in results.items():
        organs = [k for k in state.get("labels_flow_1", {}) if k not in ("mean", "seconds")]
        if len(organs) < 2:
            continue
        lines.append(f"{source:<18}{'what':<22}" + "".join(f"{o:>14}" for o in organs))
        rows = [("dense model", state.get("model_dense", {}))]
        for count in slices:
            rows.append((f"flow_{count} labels", state.get(f"labels_flow_{count}", {})))
            rows.append((f"flow_{count} model", state.get(f"model_flow_{count}", {})))
        for what, scores in rows:
            lines.append(
                f"{source:<18}{what:<22}" + "".join(f"{scores.get(o, float('nan')):>14.3f}" for o in organs)
            )
    return "\n".join(lines)


def plot(results: dict[str, dict], slices: list[int], path: Path) -> None:
    """Mean Dice against drawn slices per volume, one panel per source, dense model as the line to reach."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for axis, (source, state) in zip(axes[0], results.items()):
        for method, colour in zip(METHODS, ("tab:blue", "tab:orange")):
            labels = [state.get(f"labels_{method}_{k}", {}).get("mean", np.nan) for k in slices]
            models = [state.get(f"model_{method}_{k}", {}).get("mean", np.nan) for k in slices]
            axis.plot(slices, labels, "--o", color=colour, alpha=0.6, label=f"{method} labels (train)")
            axis.plot(slices, models, "-s", color=colour, label=f"{method} model (test)")
        dense = state.get("model_dense", {}).get("mean", np.nan)
        axis.axhline(dense, color="black", lw=1.5, label="dense-label model (test)")
        axis.axhline(0.95 * dense, color="black", lw=0.8, ls=":", label="0.95 x dense")
        axis.set(
            title=source, xlabel="drawn slices per volume", ylabel="mean Dice over organs", xticks=slices
        )
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags; ``organ_label_training.py`` parses its run of :func:`run_source` with it."""
    from mipseg.training.losses import UNDRAWN_CLASS_RULES

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    parser.add_argument("--slices", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--cases", type=int, default=6, help="Training volumes per source.")
    parser.add_argument("--test-cases", type=int, default=3, help="Unseen test volumes per source.")
    parser.add_argument("--synthetic-shape", type=int, nargs=3, default=[24, 48, 48])
    parser.add_argument("--real-depth", type=int, default=16, help="Slices per crop of a real scan.")
    parser.add_argument("--real-zoom", type=float, default=0.5, help="In-plane resampling of the real crops.")
    parser.add_argument("--flow-iters", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--iters", type=int, default=15, help="Training iterations per epoch.")
    parser.add_argument(
        "--models",
        nargs="*",
        help="Train only these label sets (dense, flow_3, ...); none: only read the cache.",
    )
    parser.add_argument("--propagate-flags", nargs=argparse.REMAINDER, default=[],
                        help="Extra mipseg_propagate flags (last on the line).")  # fmt: skip
    parser.add_argument(
        "--suggest-mode",
        choices=("spread", "next"),
        default="spread",
        help="K > 1 drawn slices: --suggest K (spread) or --suggest 1, then --suggest-next K-1 "
        "(next); use another --work per mode.",
    )
    parser.add_argument(
        "--draw-empty",
        action="store_true",
        help='Draw a suggested slice that shows no organ as an empty slice ("no organ here"), as an '
        "annotator shown it would; without it such a slice is left undrawn. Use another --work.",
    )
    parser.add_argument(
        "--undrawn-classes",
        choices=UNDRAWN_CLASS_RULES,
        default=UNDRAWN_CLASS_RULES[0],
        help="mipseg_train --undrawn-classes: how a class a case's drawings left out is trained "
        "(background: the rule before 2026-12-07). Use another --work.",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="Models trained at once, each with an equal share of the cores (OMP_NUM_THREADS, or all "
        "of them when it is not set).",
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/i22/organ_models"))
    parser.add_argument(
        "--shared", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    )
    parser.add_argument("--plot", type=Path)
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: need at least 1")
    args.work = args.work.resolve()
    args.shared = args.shared.resolve()
    results = {}
    for source in args.sources:
        results[source] = run_source(source, 970 + SOURCES.index(source), args)
        print(table({source: results[source]}, args.slices), flush=True)
    (args.work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results, args.slices))
    print(reading_table(results, args.slices))
    print(organ_table(results, args.slices))
    if args.plot:
        plot(results, args.slices, args.plot)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    sys.exit(main())
