"""Training iterations per second on CPU (or CUDA) for the planned patch and batch.

Times full training steps (forward, partial Dice+CE loss with deep supervision, backward, SGD
with gradient clipping) of the plans' network on random patches, after warm-up steps. The data
pipeline is not included (it runs in background workers during training); ``--with-data`` adds a
separate measurement of the augmentation pipeline's batches per second in one process.

Usage::

    python benchmarks/train_speed.py -d 950              # plans of a planned dataset
    python benchmarks/train_speed.py --patch 32 56 56 --batch 2 --features 16 32 64 128

Prints one JSON object (iterations/s, seconds/iteration, patch, batch, threads, device).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from mipseg.planning.plans import NetworkTopology, Plans


def plans_from_arguments(args: argparse.Namespace) -> Plans:
    """The dataset's plans (``-d``) or plans made from ``--patch/--batch/--features``."""
    if args.dataset is not None:
        from mipseg import paths
        from mipseg.planning.plans import load_plans

        return load_plans(paths.preprocessed_dataset_dir(args.dataset) / "plans.json")
    stages = len(args.features)
    return Plans(
        dataset_name="benchmark",
        spacing=[1.0, 1.0, 1.0],
        original_median_spacing=[1.0, 1.0, 1.0],
        median_shape=list(args.patch),
        patch_size=list(args.patch),
        batch_size=args.batch,
        network=NetworkTopology(
            features_per_stage=list(args.features),
            kernel_sizes=[[3, 3, 3]] * stages,
            strides=[[1, 1, 1]] + [[2, 2, 2]] * (stages - 1),
        ),
        normalization=["ZScore"],
        use_mask_for_norm=[False],
        intensity_properties={},
        resampling={},
        labels={"background": 0, "vessel": 1, "ignore": 2},
        ignore_label=2,
    )


def time_training_steps(plans: Plans, device: torch.device, steps: int, warmup: int) -> float:
    """Seconds per training step (median of ``steps`` after ``warmup``)."""
    from mipseg.training.loop import TrainingConfig, make_state, train_step
    from mipseg.training.losses import PartialDiceCELoss
    from mipseg.training.network import build_network

    num_classes = plans.num_classes
    network = build_network(plans, num_input_channels=plans.num_channels, num_classes=num_classes)
    state = make_state(network, TrainingConfig(), device)
    loss_fn = PartialDiceCELoss(ignore_label=plans.ignore_label)
    generator = torch.Generator().manual_seed(0)
    shape = (plans.batch_size, plans.num_channels, *plans.patch_size)
    batch = {
        "data": torch.randn(shape, generator=generator).to(device),
        "target": torch.randint(
            0, num_classes + 1, (plans.batch_size, 1, *plans.patch_size), generator=generator
        ).to(device),
    }
    durations = []
    for step in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(state, batch, loss_fn)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            durations.append(time.perf_counter() - start)
    return float(np.median(durations))


def time_augmentation(plans: Plans, batches: int) -> float:
    """Seconds per augmented batch (one process) on a random volume twice the patch size."""
    import tempfile
    from pathlib import Path

    from mipseg.training import data as D

    settings = D.augmentation_settings(plans.patch_size, plans.mip_axes)
    crop = D.initial_patch_size(plans.patch_size, settings)
    with tempfile.TemporaryDirectory() as folder:
        shape = [2 * p for p in plans.patch_size]
        rng = np.random.default_rng(0)
        np.save(Path(folder) / "c.npy", rng.normal(size=(plans.num_channels, *shape)).astype(np.float32))
        np.save(Path(folder) / "l.npy", rng.integers(0, 3, size=(1, *shape)).astype(np.int16))
        case = D.TrainingCase("c", Path(folder) / "c.npy", Path(folder) / "l.npy")
        loader = D.PatchLoader(
            [case], patch_size=crop, batch_size=plans.batch_size, foreground_labels=[1], ignore_label=2
        )
        transform = D.training_transforms(plans.patch_size, settings, 2)
        np.random.seed(0)
        start = time.perf_counter()
        for _ in range(batches):
            transform(**next(loader))
        return (time.perf_counter() - start) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-d", "--dataset", help="Use this dataset's plans.json.")
    parser.add_argument("--patch", type=int, nargs=3, default=[32, 56, 56])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--with-data", action="store_true", help="Also time the augmentation pipeline.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plans = plans_from_arguments(args)
    device = torch.device(args.device)
    seconds = time_training_steps(plans, device, args.steps, args.warmup)
    result = {
        "device": args.device,
        "threads": args.threads,
        "patch_size": plans.patch_size,
        "batch_size": plans.batch_size,
        "features_per_stage": plans.network.features_per_stage,
        "seconds_per_iteration": round(seconds, 4),
        "iterations_per_second": round(1 / seconds, 4),
    }
    if args.with_data:
        result["augmentation_seconds_per_batch_one_process"] = round(time_augmentation(plans, args.steps), 4)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
