"""What does each part of the MIP trainer buy? Equal-iteration ablation on synthetic vessels.

Runs ``mipseg_synthesize -> mipseg_plan -> mipseg_pseudolabel`` once, then trains (fold ``all``,
label set ``pseudo``, same epochs, iterations, seed) and predicts the test cases with:

* ``plain``        -- the plain trainer (partial Dice/CE on the pseudo-labels + seed term);
* ``3d_mip``       -- mip trainer, ``L_3D-MIP`` only (``--no-mip-branch``);
* ``branch``       -- mip trainer, 2D branch + ``L_MIP`` only (``--mip-3d-weight 0``);
* ``all``          -- mip trainer, both (published);
* ``all_max``      -- as ``all`` with the max-projection variant of ``L_3D-MIP``;

and reports Dice, clDice and recall of the vessel label against the synthetic dense truth
(mean over test cases), plus the measured seconds per training iteration of each. Every
configuration has its own results root (the mip variants share a trainer name). Training
processes are limited to ``--threads`` torch threads. Results go to ``WORKDIR/mip_ablation.json``.

``--source aorta_cemra`` replaces the synthetic data with the real MRA in ``../shared/data``: the
image is the single training case, its z-MIP annotation is simulated from the bifurcation label
(a MIP pixel is vessel where the brightest voxel of its ray is labelled, as in
``pseudolabel_quality.py``), the training image itself is predicted (weak supervision: the dense
label is never used in training) and scored inside the label's bounding box grown by ``--margin``
voxels, because only the bifurcation segment is labelled.

Usage::

    python benchmarks/mip_ablation.py --workdir /tmp/mip_ablation --epochs 6 --iters-per-epoch 25
    python benchmarks/mip_ablation.py --workdir /tmp/mip_aorta --source aorta_cemra \\
        --configs plain 3d_mip branch all --epochs 6 --iters-per-epoch 25 --skip-step-timing
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from _pipeline import run_command

DATASET_ID = 961
AORTA_DATASET_ID = 962
AORTA_CASE = "aorta"
DEFAULT_AORTA = Path(__file__).resolve().parents[2] / "shared" / "data" / "aorta_cemra.nii.gz"
CONFIGS: dict[str, list[str]] = {
    "plain": ["--trainer", "plain"],
    "3d_mip": ["--trainer", "mip", "--no-mip-branch", "--mip-2d-weight", "0"],
    "branch": ["--trainer", "mip", "--mip-3d-weight", "0"],
    "all": ["--trainer", "mip"],
    "all_max": ["--trainer", "mip", "--mip-projection", "max"],
}


def run(command: list[str], env: dict[str, str]) -> float:
    """Run one pipeline command of this virtualenv; exit on failure; returns seconds."""
    return run_command(command, env, "mip_ablation")


def case_metrics(prediction: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice, clDice and recall of two boolean masks."""
    from mipseg.metrics import cldice, dice, recall

    return {
        "dice": float(dice(truth, prediction)),
        "cldice": float(cldice(truth, prediction)),
        "recall": float(recall(truth, prediction)),
    }


def evaluate_folder(predictions: Path, truths: list[Path]) -> dict[str, float]:
    """Mean of :func:`case_metrics` over the test cases (vessel = label 1)."""
    from mipseg import io

    values = [
        case_metrics(io.read_image(predictions / t.name)[0] == 1, io.read_image(t)[0] == 1) for t in truths
    ]
    return {k: float(np.nanmean([v[k] for v in values])) for k in values[0]}


def write_aorta_dataset(raw_root: Path, image_path: Path, label_path: Path) -> Path:
    """Raw MIP dataset of one case: the MRA and its simulated z-MIP annotation (no labelsTr).

    The annotation lies on the MIP grid of the raw image along axis 0, shape ``(y, x)``: a pixel
    is vessel where the brightest voxel of its ray belongs to the bifurcation label. Returns the
    dataset folder.
    """
    from mipseg import io, paths
    from mipseg.planning.mip import maximum_intensity_projection

    image, geometry = io.read_image(image_path, dtype=np.float32)
    truth = io.read_image(label_path)[0] > 0
    _, depth = maximum_intensity_projection(image, 0)
    annotation = np.take_along_axis(truth, depth[None].astype(np.intp), 0)[0]
    folder = raw_root / paths.dataset_folder_name(AORTA_DATASET_ID, "AortaCemra")
    shutil.rmtree(folder, ignore_errors=True)
    io.write_image(image, geometry, folder / "imagesTr" / f"{AORTA_CASE}_0000.nii.gz")
    io.write_png(annotation.astype(np.uint8), folder / "annotationsTr" / f"{AORTA_CASE}_mip0.png")
    io.write_json(
        {
            "channel_names": {"0": "MRA"},
            "labels": {"background": 0, "vessel": 1},
            "numTraining": 1,
            "file_ending": ".nii.gz",
            "annotation": "mip",
            "mip_axes": [0],
            "source": {"image": image_path.name, "annotation": f"simulated from {label_path.name}"},
        },
        folder / "dataset.json",
    )
    return folder


def evaluate_in_segment(prediction_path: Path, label_path: Path, margin: int) -> dict[str, float]:
    """:func:`case_metrics` inside the label's bounding box grown by ``margin`` voxels per side."""
    from mipseg import io

    truth = io.read_image(label_path)[0] > 0
    box = label_box(truth, margin)
    return case_metrics(io.read_image(prediction_path)[0][box] == 1, truth[box])


def label_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Bounding box of ``mask`` (z, y, x) grown by ``margin`` voxels and clipped to the array."""
    from scipy import ndimage

    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, mask.shape))


def seconds_per_iteration(fold_dir: Path, iters_per_epoch: int, val_iters: int) -> float:
    """Mean epoch time of the run (training + validation batches) per training iteration."""
    import torch

    log = torch.load(fold_dir / "checkpoint_final.pt", weights_only=False, map_location="cpu")["logging"]
    # epoch 0 includes start-up; the rest is steady state
    times = log["epoch_time"][1:] or log["epoch_time"]
    return float(np.mean(times)) / (iters_per_epoch + val_iters)


def time_steps(plans_path: Path, steps: int = 5, warmup: int = 2) -> dict[str, float]:
    """Median seconds of one training step (forward, loss, backward, SGD) per configuration.

    Random batches of the plans' patch and batch size, with MIP ray channels for the mip
    variants; measures the network and loss cost only (no data loading).
    """
    import torch

    from mipseg.planning.plans import load_plans
    from mipseg.training.loop import TrainingConfig, make_state, train_step
    from mipseg.training.losses import PartialDiceCELoss
    from mipseg.training.mip_branch import build_mip_network
    from mipseg.training.mip_losses import MipProjectionLoss, MipSettings

    plans = load_plans(plans_path)
    axes = tuple(plans.mip_axes) or (0,)
    k, b, patch = plans.num_classes, plans.batch_size, list(plans.patch_size)
    generator = torch.Generator().manual_seed(0)
    mip = torch.zeros(b, 2 * len(axes), *patch, dtype=torch.long)
    for j, axis in enumerate(axes):
        mip[:, 2 * j] = torch.randint(0, 2, (b, *patch), generator=generator)
        shape = [1, 1, 1]
        shape[axis] = patch[axis]
        mip[:, 2 * j + 1] = (torch.arange(patch[axis]).reshape(shape) >= patch[axis] // 2).long()
    batch = {
        "data": torch.randn(b, plans.num_channels, *patch, generator=generator),
        "target": torch.randint(0, k, (b, 1, *patch), generator=generator),
        "mip": mip,
    }
    variants = {
        "plain": None,
        "3d_mip": MipSettings(branch=False, weight_mip=0.0),
        "branch": MipSettings(weight_3d_mip=0.0),
        "all": MipSettings(),
    }
    results = {}
    for name, settings in variants.items():
        torch.manual_seed(0)
        base = PartialDiceCELoss(ignore_label=plans.ignore_label)
        network = build_mip_network(
            plans, num_input_channels=plans.num_channels, num_classes=k, axes=axes,
            branch=settings is not None and settings.branch,
        )  # fmt: skip
        loss = base if settings is None else MipProjectionLoss(base, axes, settings, plans.ignore_label)
        state = make_state(network, TrainingConfig(), torch.device("cpu"))
        durations = []
        for step in range(warmup + steps):
            start = time.perf_counter()
            train_step(state, batch, loss)
            if step >= warmup:
                durations.append(time.perf_counter() - start)
        results[name] = float(np.median(durations))
    return results


def aorta_shape(raw: Path) -> tuple[int, ...]:
    """Shape (z, y, x) of the single aorta training image."""
    from mipseg import io

    return io.read_image_header(raw / "imagesTr" / f"{AORTA_CASE}_0000.nii.gz")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("mip_ablation"))
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--test-cases", type=int, default=3)
    parser.add_argument("--shape", type=int, nargs=3, default=[48, 64, 64])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--iters-per-epoch", type=int, default=25)
    parser.add_argument("--val-iters", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads of each training.")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", default="synthetic", choices=["synthetic", "aorta_cemra"])
    parser.add_argument("--aorta", type=Path, default=DEFAULT_AORTA, help="aorta_cemra image.")
    parser.add_argument("--margin", type=int, default=3, help="aorta_cemra: scoring box margin (voxels).")
    parser.add_argument(
        "--skip-step-timing", action="store_true", help="Do not time training steps at the end."
    )
    parser.add_argument(
        "--timing-only", action="store_true", help="Only time training steps on an existing WORKDIR."
    )
    args = parser.parse_args()
    if args.timing_only:
        import torch

        torch.set_num_threads(args.threads)
        plans_path = next((args.workdir.resolve() / "preprocessed").glob("Dataset*/plans.json"))
        print(json.dumps(time_steps(plans_path), indent=2))
        return

    work = args.workdir.resolve()
    for stale in ["preprocessed", *(f"results_{c}" for c in CONFIGS), *(f"predictions_{c}" for c in CONFIGS)]:
        shutil.rmtree(work / stale, ignore_errors=True)
    threads = str(args.threads)
    env = {
        **os.environ,
        "MIPSEG_RAW": str(work / "raw"),
        "MIPSEG_PREPROCESSED": str(work / "preprocessed"),
        "MIPSEG_RESULTS": str(work / "results_plain"),
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
    }
    os.environ.update({k: env[k] for k in ("MIPSEG_RAW", "MIPSEG_PREPROCESSED")})
    aorta = args.source == "aorta_cemra"
    aorta_label = args.aorta.with_name(args.aorta.name.replace(".nii.gz", "_bifurcation_label.nii.gz"))
    d = str(AORTA_DATASET_ID if aorta else DATASET_ID)
    if aorta:
        if not (args.aorta.is_file() and aorta_label.is_file()):
            sys.exit(f"mip_ablation: {args.aorta} or {aorta_label} not found")
        write_aorta_dataset(work / "raw", args.aorta, aorta_label)
    else:
        shape = [str(s) for s in args.shape]
        run(["mipseg_synthesize", "-d", d, "--kind", "vessels", "--cases", str(args.cases), "--shape", *shape,
             "--test-cases", str(args.test_cases), "--seed", str(args.seed), "--overwrite"], env)  # fmt: skip
    run(["mipseg_plan", "-d", d, "--device", "cpu"], env)
    run(["mipseg_pseudolabel", "-d", d], env)

    from mipseg import paths

    dataset = paths.resolve_dataset(int(d))
    raw = work / "raw" / dataset
    # aorta_cemra: predict the training image itself (its label was never used in training)
    predict_input = raw / ("imagesTr" if aorta else "imagesTs")
    truths = sorted((raw / "labelsTs").glob("*.nii.gz"))
    results: dict[str, object] = {
        "source": args.source,
        **({"scored_in": f"label bounding box + {args.margin} voxels"} if aorta else {}),
        "cases": 1 if aorta else args.cases,
        "test_cases": 1 if aorta else args.test_cases,
        "shape": list(aorta_shape(raw)) if aorta else args.shape,
        "epochs": args.epochs,
        "iters_per_epoch": args.iters_per_epoch,
        "threads": args.threads,
        "device": args.device,
        "seed": args.seed,
        "configs": {},
    }
    if aorta:  # the training target itself: S_1 of the pseudo-labels, scored the same way
        pseudo = paths.labelset_dir(int(d), "pseudo") / f"{AORTA_CASE}.nii.gz"
        results["pseudo_labels"] = evaluate_in_segment(pseudo, aorta_label, args.margin)
        print("pseudo_labels", json.dumps(results["pseudo_labels"]), flush=True)
    for name in args.configs:
        config_env = {**env, "MIPSEG_RESULTS": str(work / f"results_{name}")}
        train_seconds = run(
            ["mipseg_train", "-d", d, "-f", "all", "--labels", "pseudo", *CONFIGS[name],
             "--epochs", str(args.epochs), "--iters-per-epoch", str(args.iters_per_epoch),
             "--val-iters", str(args.val_iters), "--num-workers", "0", "--device", args.device,
             "--seed", str(args.seed)],
            config_env,
        )  # fmt: skip
        trainer = CONFIGS[name][1]
        output = work / f"predictions_{name}"
        run(["mipseg_predict", "-i", str(predict_input), "-o", str(output), "-d", d, "-f", "all",
             "--labels", "pseudo", "--trainer", trainer, "--device", args.device, "--disable-tta"],
            config_env)  # fmt: skip
        fold_dir = work / f"results_{name}" / dataset / f"{trainer}__pseudo__3d_fullres" / "fold_all"
        scores = (
            evaluate_in_segment(output / f"{AORTA_CASE}.nii.gz", aorta_label, args.margin)
            if aorta
            else evaluate_folder(output, truths)
        )
        entry = {
            **scores,
            "train_minutes": round(train_seconds / 60, 2),
            "seconds_per_iteration": seconds_per_iteration(fold_dir, args.iters_per_epoch, args.val_iters),
        }
        results["configs"][name] = entry
        print(name, json.dumps(entry), flush=True)
        (work / "mip_ablation.json").write_text(json.dumps(results, indent=2))
    if args.skip_step_timing:
        print(json.dumps(results, indent=2))
        return
    import torch

    torch.set_num_threads(args.threads)
    results["seconds_per_step_no_data"] = time_steps(work / "preprocessed" / dataset / "plans.json")
    (work / "mip_ablation.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
