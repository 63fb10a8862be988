"""GPU check for full-size scans: a few hundred AMP iterations, a 512x512x300 prediction, vs nnU-Net.

One prepared script for a GPU machine (issue 19, point 4). Every step is timed and its peak GPU memory
recorded; the results are printed as a table and written to ``--json`` after every step, so a run cut
short still leaves what it measured.

Steps (``--steps``, all by default):

``data``
    A synthetic organ training set (``--train-cases`` volumes of ``--train-shape``) with dense labels,
    and one full-size test volume (``--shape``, default 300x512x512 voxels at 1.0x0.7x0.7 mm, a
    realistic CT grid), written as NIfTI like any raw dataset.
``plan``
    ``mipseg_plan`` (fingerprint, GPU-budget plans, preprocessing).
``train``
    ``mipseg_train`` fold 0 on the dense labels, plain trainer, AMP, ``--epochs`` x ``--iters``
    iterations, with ``--workers`` augmentation processes (and once more with mipseg's default number
    as the last step ``train_default``). Seconds per iteration are taken from the epoch times of
    the training log, the first epoch left out (cuDNN autotuning, worker start-up).
``step``
    The network alone: one SGD step (forward, deep-supervised Dice + CE, backward, AMP) of mipseg's
    U-Net and of nnU-Net's ``PlainConvUNet`` with ``DC_and_CE_loss`` in its deep-supervision wrapper,
    same topology, patch and batch, on random data already on the GPU.
``window``
    mipseg's sliding window alone on the preprocessed full-size volume, no mirroring, for a few tile
    batch sizes (what the default should be on a GPU).
``predict``
    End to end, NIfTI in to NIfTI out: ``mipseg_predict`` with the trained fold, and nnU-Net's
    ``predict_from_files`` with a model folder of the same topology and patch (nnU-Net's own planner
    writes the plans; its 3d_fullres patch and architecture are then set to mipseg's; random weights:
    only speed is compared), each with and without mirroring.

Usage (GPU machine; nnunetv2 importable for the nnU-Net columns)::

    python benchmarks/full_size_gpu.py --work /tmp/fsgpu --json results.json

A small CPU rehearsal of the same code path::

    python benchmarks/full_size_gpu.py --device cpu --shape 48 96 96 --train-shape 32 64 64 \\
        --train-cases 4 --epochs 2 --iters 2 --step-iters 2 --work /tmp/fsgpu_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _nnunet import nnunet_network, set_nnunet_roots

DATASET_ID = 951
DATASET_NAME = "Dataset951_FullSizeGPU"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (raw/preprocessed/results)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here after every step")
    parser.add_argument(
        "--steps", nargs="+", default=["data", "plan", "train", "predict", "step", "window", "train_default"]
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), help="full-size (z, y, x)")
    parser.add_argument("--spacing", type=float, nargs=3, default=(1.0, 0.7, 0.7), help="(z, y, x) mm")
    parser.add_argument("--train-shape", type=int, nargs=3, default=(128, 192, 192))
    parser.add_argument("--train-cases", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--iters", type=int, default=100, help="iterations per epoch")
    parser.add_argument("--workers", type=int, default=12, help="augmentation processes (nnU-Net: 12)")
    parser.add_argument(
        "--default-workers-iters", type=int, default=50, help="iterations of a 2-epoch run with the default"
    )
    parser.add_argument("--step-iters", type=int, default=40, help="timed steps of the network-only test")
    parser.add_argument("--window-batches", type=int, nargs="+", default=[1, 2, 4])
    return parser.parse_args()


class Results:
    """Rows of (step, what, value, unit), written to JSON after every addition."""

    def __init__(self, path: Path | None, meta: dict[str, Any]) -> None:
        self.path, self.meta, self.rows = path, meta, []

    def add(self, step: str, what: str, value: float | str, unit: str = "") -> None:
        self.rows.append({"step": step, "what": what, "value": value, "unit": unit})
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"  {step:8} {what:58} {shown} {unit}", flush=True)
        if self.path is not None:
            self.path.write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=1))


def set_roots(work: Path) -> None:
    for name, folder in (("MIPSEG_RAW", "raw"), ("MIPSEG_PREPROCESSED", "preprocessed")):
        os.environ[name] = str(work / folder)
    os.environ["MIPSEG_RESULTS"] = str(work / "results")
    set_nnunet_roots(work)


def gpu_peak_reset(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def gpu_peak_gb(device: str) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")


def rss_peak_gb() -> float:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 2**20


def step_data(args: argparse.Namespace, results: Results) -> None:
    from concurrent.futures import ProcessPoolExecutor

    from mipseg import io
    from mipseg.synthetic import synthesize_dataset, synthetic_geometry

    start = time.time()
    raw = Path(os.environ["MIPSEG_RAW"])
    with ProcessPoolExecutor(1) as pool:
        # the full-size volume takes as long as the whole training set: make both at once
        full = pool.submit(_full_size_volume, tuple(args.shape), tuple(args.spacing))
        folder = synthesize_dataset(
            DATASET_ID,
            "organs",
            num_cases=args.train_cases,
            shape=args.train_shape,
            spacing=args.spacing,
            num_test_cases=0,
            name="FullSizeGPU",
            overwrite=True,
            show_progress=False,
        )
        image, label = full.result()
    geometry = synthetic_geometry(args.shape, args.spacing)
    io.write_image(image, geometry, folder / "imagesTs" / "fullsize_000_0000.nii.gz")
    io.write_image(label, geometry, folder / "labelsTs" / "fullsize_000.nii.gz")
    assert folder == raw / DATASET_NAME, folder
    results.add(
        "data", f"{args.train_cases} training cases + 1 volume {tuple(args.shape)}", time.time() - start, "s"
    )


def _full_size_volume(shape: tuple[int, ...], spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    from mipseg.synthetic import make_organ_volume

    return make_organ_volume(shape, spacing, np.random.default_rng(12345))


def step_plan(args: argparse.Namespace, results: Results) -> None:
    from mipseg.planning.plan_api import plan_and_preprocess

    start = time.time()
    plans = plan_and_preprocess(DATASET_NAME, num_processes=min(8, os.cpu_count() or 1), device=args.device)
    results.add("plan", "mipseg_plan (GPU budget) + preprocessing", time.time() - start, "s")
    results.add("plan", "patch / batch", f"{plans.patch_size} / {plans.batch_size}")
    results.add("plan", "features per stage", f"{plans.network.features_per_stage}")
    results.add("plan", "spacing", f"{[round(s, 3) for s in plans.spacing]}")


def _seconds_per_iteration(fold_dir: Path, iters: int) -> tuple[float, float]:
    """(s/iteration over epochs 1.., first epoch s/iteration) from the checkpoint's epoch times."""
    import torch

    checkpoint = torch.load(fold_dir / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    times = checkpoint["logging"]["epoch_time"]
    later = times[1:] or times
    return float(np.mean(later)) / iters, times[0] / iters


def _train(args: argparse.Namespace, results: Results, workers: int | None, epochs: int, iters: int) -> Path:
    from mipseg.training.loop import TrainingConfig
    from mipseg.training.train_api import train_fold

    config = TrainingConfig(
        epochs=epochs, iters_per_epoch=iters, val_iters=5, num_workers=workers, device=args.device
    )
    gpu_peak_reset(args.device)
    start = time.time()
    fold_dir = train_fold(
        DATASET_NAME, 0, labels="dense", trainer="plain", config=config, show_progress=False
    )
    wall = time.time() - start
    per_iter, first = _seconds_per_iteration(fold_dir, iters)
    label = f"workers {workers if workers is not None else 'default'}"
    results.add("train", f"{label}: {epochs} x {iters} it, wall incl. validation", wall, "s")
    results.add("train", f"{label}: s/iteration (epochs 2..)", per_iter, "s")
    results.add("train", f"{label}: s/iteration (first epoch)", first, "s")
    results.add("train", f"{label}: peak GPU memory", gpu_peak_gb(args.device), "GB")
    return fold_dir


def step_train(args: argparse.Namespace, results: Results) -> None:
    _train(args, results, args.workers, args.epochs, args.iters)


def step_train_default_workers(args: argparse.Namespace, results: Results) -> None:
    """The same fold with the default number of augmentation processes (the trained fold is kept)."""
    model_dir = Path(os.environ["MIPSEG_RESULTS"]) / DATASET_NAME / "plain__dense__3d_fullres"
    kept = model_dir / "fold_0_kept"
    if (model_dir / "fold_0").is_dir():
        shutil.rmtree(kept, ignore_errors=True)
        (model_dir / "fold_0").rename(kept)
    try:
        _train(args, results, None, 2, args.default_workers_iters)
    finally:
        if kept.is_dir():
            shutil.rmtree(model_dir / "fold_0", ignore_errors=True)
            kept.rename(model_dir / "fold_0")


def _mipseg_plans():
    from mipseg import paths
    from mipseg.planning.plans import load_plans

    return load_plans(paths.preprocessed_dataset_dir(DATASET_NAME) / "plans.json")


def _time_steps(network, loss_of, batch, target, device: str, steps: int) -> float:
    """Mean seconds of one SGD step with AMP (nnU-Net's optimizer settings) after 5 warm-up steps."""
    import torch

    network = network.to(device).train()
    optimizer = torch.optim.SGD(
        network.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5
    )
    cuda = device.startswith("cuda")
    scaler = torch.amp.GradScaler("cuda") if cuda else None
    elapsed = 0.0
    for index in range(steps + 5):
        if index == 5:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.split(":")[0], enabled=cuda):
            loss = loss_of(network(batch), target)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
            optimizer.step()
        float(loss.detach())  # both trainers read the loss every step
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return elapsed / steps


def step_network(args: argparse.Namespace, results: Results) -> None:
    import torch

    from mipseg.training.losses import PartialDiceCELoss
    from mipseg.training.network import build_network

    plans = _mipseg_plans()
    torch.backends.cudnn.benchmark = True
    generator = torch.Generator().manual_seed(0)
    shape = (plans.batch_size, plans.num_channels, *plans.patch_size)
    batch = torch.randn(shape, generator=generator).to(args.device)
    target = (torch.rand((plans.batch_size, 1, *plans.patch_size), generator=generator) > 0.8).long()
    target = target.to(args.device)
    mipseg_loss = PartialDiceCELoss(ignore_label=plans.ignore_label)
    network = build_network(plans, num_input_channels=plans.num_channels, num_classes=plans.num_classes)
    gpu_peak_reset(args.device)
    seconds = _time_steps(
        network,
        lambda out, t: mipseg_loss(out, {"target": t})[0],
        batch,
        target,
        args.device,
        args.step_iters,
    )
    results.add("step", f"mipseg U-Net + loss, batch {plans.batch_size}: s/step", seconds, "s")
    results.add("step", "mipseg peak GPU memory", gpu_peak_gb(args.device), "GB")
    del network
    try:
        from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
        from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    except ImportError as error:
        results.add("step", "nnU-Net", f"skipped ({error})")
        return
    network = nnunet_network(plans, deep_supervision=True)
    outputs = network.to(args.device)(batch[:1])
    weights = np.array([1 / (2**i) for i in range(len(outputs))])
    weights[-1] = 0
    weights = weights / weights.sum()
    loss = DeepSupervisionWrapper(
        DC_and_CE_loss(
            {"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False},
            {},
            weight_ce=1,
            weight_dice=1,
            ignore_label=None,
            dice_class=MemoryEfficientSoftDiceLoss,
        ),
        weights,
    )
    targets = [
        torch.nn.functional.interpolate(target.float(), size=o.shape[2:], mode="nearest").long()
        for o in outputs
    ]
    del outputs
    gpu_peak_reset(args.device)
    seconds = _time_steps(
        network, lambda out, _t: loss(out, targets), batch, target, args.device, args.step_iters
    )
    results.add(
        "step", f"nnU-Net PlainConvUNet + DC_and_CE (DS), batch {plans.batch_size}: s/step", seconds, "s"
    )
    results.add("step", "nnU-Net peak GPU memory", gpu_peak_gb(args.device), "GB")


def _full_size_preprocessed(plans):
    from mipseg.inference.predict_api import read_case
    from mipseg.planning.preprocessing import preprocess_case

    folder = Path(os.environ["MIPSEG_RAW"]) / DATASET_NAME / "imagesTs"
    images, geometry = read_case([folder / "fullsize_000_0000.nii.gz"])
    data, _, properties = preprocess_case(images, geometry, plans)
    return data


def step_window(args: argparse.Namespace, results: Results) -> None:
    import torch

    from mipseg.sliding_window import number_of_tiles, sliding_window_logits
    from mipseg.training.network import build_network

    plans = _mipseg_plans()
    data = torch.from_numpy(_full_size_preprocessed(plans))
    network = (
        build_network(
            plans,
            num_input_channels=plans.num_channels,
            num_classes=plans.num_classes,
            deep_supervision=False,
        )
        .to(args.device)
        .eval()
    )
    tiles = number_of_tiles(data.shape[1:], plans.patch_size, 0.5)
    results.add("window", f"preprocessed volume {tuple(data.shape[1:])}, tiles (step 0.5)", str(tiles))
    for batch_size in args.window_batches:
        gpu_peak_reset(args.device)
        sliding_window_logits(
            network,
            data,
            plans.patch_size,
            plans.num_classes,
            mirror_axes=None,
            batch_size=batch_size,
            device=args.device,
        )  # warm-up (cuDNN autotuning)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        logits = sliding_window_logits(
            network,
            data,
            plans.patch_size,
            plans.num_classes,
            mirror_axes=None,
            batch_size=batch_size,
            device=args.device,
        )
        float(logits[0, 0, 0, 0])
        seconds = time.perf_counter() - start
        results.add("window", f"no mirroring, tile batch {batch_size}", seconds, "s")
        results.add(
            "window", f"  voxels/s, tile batch {batch_size}", float(np.prod(data.shape[1:]) / seconds)
        )
        results.add("window", f"  peak GPU memory, tile batch {batch_size}", gpu_peak_gb(args.device), "GB")
        del logits


def step_predict(args: argparse.Namespace, results: Results) -> None:
    from mipseg.inference.predict_api import PredictionSettings, predict_folder

    raw = Path(os.environ["MIPSEG_RAW"]) / DATASET_NAME
    voxels = float(np.prod(args.shape))
    for tta in (False, True):
        out = args.work / f"pred_mipseg_tta{int(tta)}"
        shutil.rmtree(out, ignore_errors=True)
        gpu_peak_reset(args.device)
        start = time.time()
        predict_folder(
            raw / "imagesTs",
            out,
            DATASET_NAME,
            labels="dense",
            settings=PredictionSettings(trainer="plain", tta=tta),
            device=args.device,
            show_progress=False,
        )
        seconds = time.time() - start
        results.add("predict", f"mipseg_predict, mirroring {tta}: NIfTI in -> NIfTI out", seconds, "s")
        results.add("predict", f"  mipseg voxels/s, mirroring {tta}", voxels / seconds)
        results.add("predict", f"  mipseg peak GPU memory, mirroring {tta}", gpu_peak_gb(args.device), "GB")
    results.add("predict", "process peak RSS so far (max of self, children)", rss_peak_gb(), "GB")
    try:
        model_dir = _nnunet_model_folder(args)
    except ImportError as error:
        results.add("predict", "nnU-Net", f"skipped ({error})")
        return
    for tta in (False, True):
        seconds, peak = _nnunet_predict(args, model_dir, raw / "imagesTs", tta)
        results.add("predict", f"nnU-Net predict_from_files, mirroring {tta}", seconds, "s")
        results.add("predict", f"  nnU-Net voxels/s, mirroring {tta}", voxels / seconds)
        results.add("predict", f"  nnU-Net peak GPU memory, mirroring {tta}", peak, "GB")


def _nnunet_model_folder(args: argparse.Namespace) -> Path:
    from _nnunet import nnunet_model_folder

    return nnunet_model_folder(
        DATASET_NAME,
        Path(os.environ["MIPSEG_RAW"]) / DATASET_NAME,
        _mipseg_plans(),
        num_processes=min(8, os.cpu_count() or 1),
        log=lambda line: print(line, flush=True),
    )


def _nnunet_predict(
    args: argparse.Namespace, model_dir: Path, images: Path, tta: bool
) -> tuple[float, float]:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    out = args.work / f"pred_nnunet_tta{int(tta)}"
    shutil.rmtree(out, ignore_errors=True)
    device = torch.device(args.device)
    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=tta,
        perform_everything_on_device=device.type == "cuda",
        device=device,
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=(0,))
    gpu_peak_reset(args.device)
    start = time.time()
    predictor.predict_from_files(
        str(images),
        str(out),
        save_probabilities=False,
        overwrite=True,
        num_processes_preprocessing=2,
        num_processes_segmentation_export=2,
    )
    return time.time() - start, gpu_peak_gb(args.device)


# most important first: a run cut short by its time limit still has the prediction comparison
STEPS = {
    "data": step_data,
    "plan": step_plan,
    "train": step_train,
    "predict": step_predict,
    "step": step_network,
    "window": step_window,
    "train_default": step_train_default_workers,
}


def main() -> None:
    args = parse_args()
    unknown = sorted(set(args.steps) - set(STEPS))
    if unknown:
        sys.exit(f"unknown steps {unknown}; known: {list(STEPS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    set_roots(args.work)
    import torch

    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    try:
        import nnunetv2

        meta["nnunetv2"] = getattr(nnunetv2, "__version__", "installed")
    except ImportError:
        meta["nnunetv2"] = None
    print(json.dumps(meta), flush=True)
    results = Results(args.json, meta)
    for name in STEPS:
        if name in args.steps:
            print(f"== {name}", flush=True)
            start = time.time()
            try:
                STEPS[name](args, results)
            except Exception as error:  # one failed step must not lose the others' numbers
                import traceback

                traceback.print_exc()
                results.add(name, "FAILED", f"{type(error).__name__}: {error}"[:300])
            print(f"   ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
