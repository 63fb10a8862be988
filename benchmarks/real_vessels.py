"""Real vessel scans: MIP-only training against dense labels, thresholds and vesselness, held-out voxels.

For each real volume with a dense label in ``../shared/data`` (``octa_vessels``,
``lightsheet_vessels``), and for ``synthetic_vessels`` (one ``make_vessel_volume`` of 64x128x128
voxels, seed 0, octa's size) and ``synthetic_crowded`` (the same with ``vessel_density=4,
noise_scale=16``; both opt-in with ``--volumes``), the volume is split along x (numpy axis 2)
into a training sub-volume (the first ``--train-fraction`` of the columns) and a test sub-volume
(the rest). The training sub-volume becomes the one training case of a mipseg dataset whose MIP
annotations (axes ``--axes``) are simulated by the brightest-voxel rule (a MIP pixel is vessel where
the brightest voxel on its ray is labelled; ``--annotator-noise`` adds the synthesizer's annotator
imperfections: faint branches missed, strokes one pixel wider); the test sub-volume is its
``imagesTs``. The real commands run in a scratch folder (``--workdir``, default
``/tmp/i17/real_vessels``)::

    mipseg_plan -> mipseg_pseudolabel (calibrated; and --rule published) ->
    mipseg_train (dense / pseudo plain / pseudo mip, same epochs and seed) -> mipseg_predict

and the script prints, on the held-out test sub-volume, Dice, clDice and recall of

* Otsu threshold of the intensity, and the best global threshold chosen on the test truth (oracle);
* Sato vesselness (scikit-image, sigmas 1-3, bright ridges) thresholded by Otsu (no truth), and its
  oracle threshold;
* the pseudo-labels (vessel = 1) of both rules, scored on the TRAINING sub-volume (they exist only there);
* the models trained on pseudo-labels (plain and mip trainers; mip also on the published rule's
  labels) and on the dense label;

with the ratio weak / dense. ``--models "noedge mip"`` adds the mip trainer on the calibrated labels
without edge growth (``--edge-radius 0``); ``"skel mip"`` the mip trainer with the skeleton recall
term (``--skeleton-weight 1``), ``"dense skel"`` the dense model with it, ``"max mip"`` the mip
trainer with ``--mip-projection max``. Models that share a label set and trainer train into the same
results folder one after the other; each is predicted before the next one replaces it. Models are
predicted without mirroring; ``--tta`` adds a row per model predicted with it, as ``mipseg_predict``
does by default. No refined model: ``mipseg_refine`` needs out-of-fold predictions of five fold
models, and each volume gives one training case. Trainings are cached: a model whose
``trained_{id}_{model}`` marker exists is not trained again (delete the workdir to start over).
Run one heavy process at a time on a shared machine::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/real_vessels.py --epochs 20 --iters-per-epoch 25
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from _pipeline import run_command

from mipseg.metrics import cldice, dice, recall

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VOLUMES = ("octa_vessels", "lightsheet_vessels")
SYNTHETIC = "synthetic_vessels"
SYNTHETIC_SHAPE = (64, 128, 128)  # octa's size
# The same generator with 4x the trees (1.0 % vessel instead of 0.15 %) and the demo's 16x noise.
SYNTHETIC_CROWDED = "synthetic_crowded"
SYNTHETIC_OPTIONS = {SYNTHETIC: {}, SYNTHETIC_CROWDED: {"vessel_density": 4.0, "noise_scale": 16.0}}
ALL_VOLUMES = (*VOLUMES, SYNTHETIC, SYNTHETIC_CROWDED)  # the position gives the dataset id: FIRST_ID + index
FIRST_ID = 970


def scores(truth: np.ndarray, prediction: np.ndarray) -> dict[str, float]:
    """Dice, clDice and recall of a binary prediction against the truth."""
    return {
        "dice": dice(truth, prediction),
        "cldice": cldice(truth, prediction),
        "recall": recall(truth, prediction),
    }


def read_volume(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Image (float32) and dense vessel label (uint8) of a shared real volume or a synthetic one."""
    from mipseg import io

    if name in SYNTHETIC_OPTIONS:
        from mipseg.synthetic import make_vessel_volume

        image, truth = make_vessel_volume(
            SYNTHETIC_SHAPE, (1.0, 1.0, 1.0), np.random.default_rng(0), **SYNTHETIC_OPTIONS[name]
        )
        return image.astype(np.float32), (truth > 0).astype(np.uint8)
    image, _ = io.read_image(DATA / f"{name}.nii.gz", dtype=np.float32)
    return image, (io.read_image(DATA / f"{name}_label.nii.gz")[0] > 0).astype(np.uint8)


def write_dataset(
    raw: Path, dataset_id: int, name: str, fraction: float, axes: tuple[int, ...], annotator_noise: bool
) -> Path:
    """The raw dataset of one volume: train sub-volume with annotations, test sub-volume in imagesTs."""
    from mipseg import io
    from mipseg.synthetic.annotation import simulate_mip_annotation
    from mipseg.synthetic.writer import synthetic_geometry

    image, truth = read_volume(name)
    cut = int(round(image.shape[2] * fraction))
    folder = raw / f"Dataset{dataset_id:03d}_{name}"
    io.write_json(
        {
            "channel_names": {"0": "vessels"},
            "labels": {"background": 0, "vessel": 1},
            "numTraining": 1,
            "file_ending": ".nii.gz",
            "annotation": "mip",
            "mip_axes": list(axes),
        },
        folder / "dataset.json",
    )
    parts = {"Tr": (image[..., :cut], truth[..., :cut]), "Ts": (image[..., cut:], truth[..., cut:])}
    for part, (sub_image, sub_truth) in parts.items():
        geometry = synthetic_geometry(sub_image.shape[::-1], (1.0, 1.0, 1.0))
        io.write_image(
            np.ascontiguousarray(sub_image), geometry, folder / f"images{part}" / f"{name}_0000.nii.gz"
        )
        io.write_image(np.ascontiguousarray(sub_truth), geometry, folder / f"labels{part}" / f"{name}.nii.gz")
    rng = np.random.default_rng(dataset_id)
    for axis in axes:
        drawn = simulate_mip_annotation(
            parts["Tr"][0], parts["Tr"][1], axis, annotator_noise=annotator_noise, rng=rng
        )
        io.write_png(drawn.astype(np.uint8) * 255, folder / "annotationsTr" / f"{name}_mip{axis}.png")
    return folder


def baselines(image: np.ndarray, truth: np.ndarray) -> dict[str, dict[str, float]]:
    """Otsu / oracle thresholds of the intensity and of Sato vesselness on the test sub-volume."""
    from skimage.filters import sato, threshold_otsu

    from mipseg.synthetic.annotation import best_threshold_dice

    out = {}
    vesselness = sato(image, sigmas=(1, 2, 3), black_ridges=False).astype(np.float32)
    for label, values in (("threshold", image), ("sato", vesselness)):
        out[f"{label} otsu"] = scores(truth, values > threshold_otsu(values))
        _, best = best_threshold_dice([values - values.min() + 1e-6], [truth])
        out[f"{label} oracle"] = scores(truth, values - values.min() + 1e-6 > best)
    return out


MODELS = {  # name -> (label set, trainer, extra train flags)
    "dense": ("dense", "plain", []),
    "pseudo plain": ("pseudo", "plain", []),
    "pseudo mip": ("pseudo", "mip", []),
    "published mip": ("published", "mip", []),  # the same trainer on the published rule's labels
    "bg0 mip": ("pseudo_bg0", "mip", []),  # calibrated rule with S_0 only below the background median
    "noedge mip": ("pseudo_noedge", "mip", []),  # calibrated rule without S_1's edge growth
    "skel mip": ("pseudo", "mip", ["--skeleton-weight", "1"]),  # + skeleton recall term
    "max mip": ("pseudo", "mip", ["--mip-projection", "max"]),  # L_3D-MIP on the max along each ray
    "dense skel": ("dense", "plain", ["--skeleton-weight", "1"]),
}
LABEL_SETS = {  # label set -> mipseg_pseudolabel flags
    "pseudo": [],
    "published": ["--rule", "published"],
    "pseudo_bg0": ["--background-factor", "0"],
    "pseudo_noedge": ["--edge-radius", "0"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/i17/real_vessels"))
    parser.add_argument("--volumes", nargs="+", default=list(VOLUMES), choices=ALL_VOLUMES)
    parser.add_argument(
        "--annotator-noise",
        action="store_true",
        help="imperfect simulated drawings (faint branches missed, wider strokes); use another --workdir",
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--train-fraction", type=float, default=0.5)
    parser.add_argument("--axes", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--iters-per-epoch", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tta",
        action="store_true",
        help="also predict every model with mirroring (mipseg_predict's default) and print those rows",
    )
    args = parser.parse_args()

    work = args.workdir.resolve()
    env = {
        **os.environ,
        "MIPSEG_RAW": str(work / "raw"),
        "MIPSEG_PREPROCESSED": str(work / "preprocessed"),
        "MIPSEG_RESULTS": str(work / "results"),
    }
    os.environ.update({k: env[k] for k in ("MIPSEG_RAW", "MIPSEG_PREPROCESSED", "MIPSEG_RESULTS")})
    from mipseg import io

    results: dict[str, dict] = {}
    made_with = {
        "train_fraction": args.train_fraction,
        "axes": args.axes,
        "annotator_noise": args.annotator_noise,
    }
    for name in args.volumes:
        index = ALL_VOLUMES.index(name)  # a volume keeps its dataset id whatever --volumes lists
        d = str(FIRST_ID + index)
        folder = work / "raw" / f"Dataset{FIRST_ID + index:03d}_{name}"
        marker = folder / "benchmark_settings.json"
        if not (folder / "dataset.json").is_file():
            write_dataset(
                work / "raw",
                FIRST_ID + index,
                name,
                args.train_fraction,
                tuple(args.axes),
                args.annotator_noise,
            )
            io.write_json(made_with, marker)
            run_command(["mipseg_plan", "-d", d, "--device", "cpu"], env, "real_vessels")
        elif marker.is_file() and io.read_json(marker) != made_with:
            sys.exit(f"{work} holds {name} made with {io.read_json(marker)}; use another --workdir")
        labelsets = work / "preprocessed" / folder.name / "labelsets"
        needed = {"pseudo", "published"} | {MODELS[model][0] for model in args.models} - {"dense"}
        for labels in sorted(needed):
            if not (labelsets / labels / f"{name}.nii.gz").is_file():
                run_command(["mipseg_pseudolabel", "-d", d, "--name", labels, *LABEL_SETS[labels]], env,
                            "real_vessels")  # fmt: skip
        image = io.read_image(folder / "imagesTs" / f"{name}_0000.nii.gz", dtype=np.float32)[0]
        truth = io.read_image(folder / "labelsTs" / f"{name}.nii.gz")[0] > 0
        train_truth = io.read_image(folder / "labelsTr" / f"{name}.nii.gz")[0] > 0
        rows = baselines(image, truth)
        for labels in sorted(needed):
            pseudo = io.read_image(labelsets / labels / f"{name}.nii.gz")[0] == 1
            rows[f"pseudo-labels {labels} (train part)"] = scores(train_truth, pseudo)
        for model in args.models:
            labels, trainer, extra = MODELS[model]
            tag = model.replace(" ", "_")
            if not (work / f"trained_{d}_{tag}").is_file():  # marker written after a finished training
                start = time.time()
                run_command(["mipseg_train", "-d", d, "-f", "all", "--labels", labels, "--trainer", trainer,
                             "--epochs", str(args.epochs), "--iters-per-epoch", str(args.iters_per_epoch),
                             "--val-iters", "2", "--device", "cpu", "--seed", str(args.seed), *extra],
                            env, "real_vessels")  # fmt: skip
                (work / f"trained_{d}_{tag}").write_text(f"{time.time() - start:.0f}")
            train_seconds = float((work / f"trained_{d}_{tag}").read_text())
            # without mirroring (the tables before 2026-12-07), and with it when --tta asks: the reading a
            # user gets from mipseg_predict's defaults
            for mirrored in (False, True) if args.tta else (False,):
                output = work / f"predictions_{d}_{tag}{'_tta' if mirrored else ''}"
                if not (output / f"{name}.nii.gz").is_file():
                    run_command(["mipseg_predict", "-i", str(folder / "imagesTs"), "-o", str(output), "-d", d,
                                 "-f", "all", "--labels", labels, "--trainer", trainer, "--device", "cpu",
                                 *([] if mirrored else ["--disable-tta"])], env, "real_vessels")  # fmt: skip
                prediction = io.read_image(output / f"{name}.nii.gz")[0] > 0
                row = f"model {model}{' (mirroring TTA)' if mirrored else ''}"
                rows[row] = scores(truth, prediction)
                rows[row]["train_s"] = train_seconds
        results[name] = rows
        print_table(name, rows)
    (work / "real_vessels.json").write_text(json.dumps(results, indent=2))
    print(f"results in {work / 'real_vessels.json'}", file=sys.stderr)


def print_table(name: str, rows: dict[str, dict[str, float]]) -> None:
    """Markdown table of one volume, with the ratio weak / dense of every model row.

    A row predicted with mirroring is divided by the dense model predicted with mirroring, the others
    by the dense model without it.
    """
    print(f"\n{name}: test sub-volume (pseudo-labels: training sub-volume)\n")
    print("| method | Dice | clDice | recall | Dice / dense |")
    print("|---|---|---|---|---|")
    for method, row in rows.items():
        reference = "model dense (mirroring TTA)" if method.endswith("(mirroring TTA)") else "model dense"
        dense = rows.get(reference, {}).get("dice", float("nan"))
        print(
            f"| {method} | {row['dice']:.3f} | {row['cldice']:.3f} | {row['recall']:.3f} | "
            f"{row['dice'] / dense:.2f} |"
        )


if __name__ == "__main__":
    main()
