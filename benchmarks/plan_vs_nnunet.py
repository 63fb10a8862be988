"""mipseg_plan versus nnUNetv2_plan_and_preprocess on the same synthetic dataset; CPU budget calibration.

Usage::

    python benchmarks/plan_vs_nnunet.py [--cases 8] [--shape 64 96 96] [--spacing 1 1 1] [-np 2]
    python benchmarks/plan_vs_nnunet.py --calibrate [--threads 2]

The comparison writes a synthetic vessel dataset (mipseg's raw format is nnU-Net's plus
annotationsTr and two dataset.json keys, which nnU-Net ignores), runs mipseg's plan+preprocess
with the GPU budget (the situation nnU-Net plans for) and with the CPU budget, and, if
``nnunetv2`` is importable, nnU-Net's fingerprint/plan/preprocess for 3d_fullres. nnunetv2 is an
optional install for this script only; without it only mipseg's columns are printed.

``--calibrate`` times one training step (forward + backward + SGD, batch 2, deep supervision) of
the plain U-Net for nnU-Net's default plan of 64x96x96 volumes and for CPU candidates, and fits
the feature-map estimate that takes one second. Timings on a shared machine are noisy: the
nnU-Net default step is timed alongside and reported as a yardstick.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

console = Console()


def make_dataset(root: Path, dataset_id: int, cases: int, shape, spacing) -> str:
    os.environ["MIPSEG_RAW"] = str(root / "raw")
    os.environ["MIPSEG_PREPROCESSED"] = str(root / "preprocessed")
    os.environ["MIPSEG_RESULTS"] = str(root / "results")
    from mipseg.synthetic import synthesize_dataset

    folder = synthesize_dataset(
        dataset_id,
        "vessels",
        num_cases=cases,
        shape=shape,
        spacing=spacing,
        num_test_cases=0,
        show_progress=False,
    )
    return Path(folder).name


def run_mipseg(name: str, device: str, num_processes: int) -> tuple[dict, float]:
    from mipseg.planning.plan_api import plan_and_preprocess

    shutil.rmtree(Path(os.environ["MIPSEG_PREPROCESSED"]) / name, ignore_errors=True)
    start = time.perf_counter()
    plans = plan_and_preprocess(name, num_processes=num_processes, device=device)
    elapsed = time.perf_counter() - start
    return {
        "spacing": plans.spacing,
        "patch_size": plans.patch_size,
        "batch_size": plans.batch_size,
        "strides": plans.network.strides[1:],
        "features": plans.network.features_per_stage,
        "normalization": [
            f"{n}{' (mask)' if m else ''}" for n, m in zip(plans.normalization, plans.use_mask_for_norm)
        ],
    }, elapsed


def run_nnunet(root: Path, name: str, num_processes: int) -> tuple[dict, float] | None:
    """nnU-Net's fingerprint, plans and 3d_fullres preprocessing; ``None`` if nnunetv2 is missing."""
    import importlib.util

    if importlib.util.find_spec("nnunetv2") is None:
        return None
    nn_raw, nn_pre, nn_results = root / "nnUNet_raw", root / "nnUNet_preprocessed", root / "nnUNet_results"
    for folder in (nn_raw, nn_pre, nn_results):
        folder.mkdir(exist_ok=True)
    shutil.copytree(Path(os.environ["MIPSEG_RAW"]) / name, nn_raw / name, dirs_exist_ok=True)
    # nnU-Net reads its roots from the environment (before its modules are imported)
    os.environ.update(nnUNet_raw=str(nn_raw), nnUNet_preprocessed=str(nn_pre), nnUNet_results=str(nn_results))
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    dataset_id = int(name[7:10])
    start = time.perf_counter()
    extract_fingerprints(
        [dataset_id], num_processes=num_processes, check_dataset_integrity=False, verbose=False
    )
    plan_experiments([dataset_id])
    preprocess([dataset_id], configurations=("3d_fullres",), num_processes=(num_processes,), verbose=False)
    elapsed = time.perf_counter() - start
    import json

    plans = json.loads((nn_pre / name / "nnUNetPlans.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    back = plans["transpose_backward"]
    arch = config["architecture"]["arch_kwargs"]
    return {
        "spacing": [config["spacing"][i] for i in back],
        "patch_size": [config["patch_size"][i] for i in back],
        "batch_size": config["batch_size"],
        "strides": [[s[i] for i in back] for s in arch["strides"][1:]],
        "features": arch["features_per_stage"],
        "normalization": [
            f"{n.replace('Normalization', '')}{' (mask)' if m else ''}"
            for n, m in zip(config["normalization_schemes"], config["use_mask_for_norm"])
        ],
    }, elapsed


def compare(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="mipseg_plan_bench_"))
    try:
        name = make_dataset(root, 990, args.cases, tuple(args.shape), tuple(args.spacing))
        columns = {
            "mipseg (gpu budget)": run_mipseg(name, "cuda", args.num_processes),
            "mipseg (cpu budget)": run_mipseg(name, "cpu", args.num_processes),
        }
        nnunet = run_nnunet(root, name, args.num_processes)
        if nnunet is not None:
            columns["nnU-Net 3d_fullres"] = nnunet
        table = Table(
            title=f"{args.cases} cases {tuple(args.shape)} at {tuple(args.spacing)} mm, "
            f"-np {args.num_processes}"
        )
        table.add_column("")
        for column in columns:
            table.add_column(column)
        for key in ("spacing", "patch_size", "batch_size", "strides", "features", "normalization"):
            table.add_row(key, *[_fmt(values[key]) for values, _ in columns.values()])
        table.add_row("plan+preprocess wall time (s)", *[f"{t:.1f}" for _, t in columns.values()])
        console.print(table)
        if nnunet is None:
            console.print(
                "nnU-Net was not installed (nnunetv2 not importable): only mipseg's columns are shown."
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


PLANNER_SITUATIONS = [
    ("1 mm, 64x96x96", [1.0, 1.0, 1.0], [64, 96, 96], 8),
    ("1 mm, 128x256x256", [1.0, 1.0, 1.0], [128, 256, 256], 20),
    ("1 mm, 138x169x138", [1.0, 1.0, 1.0], [138, 169, 138], 100),
    ("0.7 mm, 300x512x512", [0.7, 0.7, 0.7], [300, 512, 512], 30),
    ("4x1x1 mm, 24x96x96", [4.0, 1.0, 1.0], [24, 96, 96], 8),
    ("5x0.8x0.8 mm, 30x256x256", [5.0, 0.8, 0.8], [30, 256, 256], 20),
    ("1x1x3 mm, 160x160x48", [1.0, 1.0, 3.0], [160, 160, 48], 20),
]


def compare_planners(args: argparse.Namespace) -> None:
    """Planner only: the same fingerprint given to mipseg's and nnU-Net's planner (GPU budget, 8 GB)."""
    from mipseg.dataset import load_dataset
    from mipseg.planning.planner import gpu_budget, plan_experiment

    root = Path(tempfile.mkdtemp(prefix="mipseg_planner_bench_"))
    try:
        name = make_dataset(root, 991, 2, (16, 24, 24), (1.0, 1.0, 1.0))
        mip_spec = load_dataset(name, read_voxels=False).spec
        spec = dataclasses.replace(mip_spec, annotation=None)  # dense situation: what nnU-Net plans for
        have_nnunet = _prepare_nnunet(root, name)
        table = Table(title="planner only, same fingerprint, GPU budget 8 GB, no MIP mode (mipseg | nnU-Net)")
        for column in ("situation", "spacing", "patch", "batch", "strides", "mipseg MIP-mode patch"):
            table.add_column(column)
        for label, spacing, shape, cases in PLANNER_SITUATIONS:
            fingerprint = {
                "spacings": [spacing] * cases,
                "shapes_after_crop": [shape] * cases,
                "median_relative_size_after_cropping": 1.0,
                "foreground_intensity_properties_per_channel": {
                    "0": {
                        "mean": 0.0,
                        "median": 0.0,
                        "std": 1.0,
                        "min": -1.0,
                        "max": 1.0,
                        "percentile_99_5": 1.0,
                        "percentile_00_5": -1.0,
                    }
                },
            }
            plans = plan_experiment(fingerprint, spec, name, gpu_budget(8))
            ours = [plans.spacing, plans.patch_size, plans.batch_size, plans.network.strides[1:]]
            theirs = _nnunet_plan(root, name, fingerprint) if have_nnunet else None
            cells = [
                _fmt(o) + ("" if theirs is None else (" | same" if _fmt(o) == _fmt(t) else " | " + _fmt(t)))
                for o, t in zip(ours, theirs or [None] * 4)
            ]
            mip_patch = plan_experiment(fingerprint, mip_spec, name, gpu_budget(8)).patch_size
            table.add_row(label, *cells, _fmt(mip_patch))
        console.print(table)
        if not have_nnunet:
            console.print(
                "nnU-Net was not installed (nnunetv2 not importable): only mipseg's plans are shown."
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _prepare_nnunet(root: Path, name: str) -> bool:
    import importlib.util

    if importlib.util.find_spec("nnunetv2") is None:
        return False
    for folder in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / folder).mkdir(exist_ok=True)
        os.environ[folder] = str(root / folder)
    shutil.copytree(Path(os.environ["MIPSEG_RAW"]) / name, root / "nnUNet_raw" / name, dirs_exist_ok=True)
    (root / "nnUNet_preprocessed" / name).mkdir(exist_ok=True)
    return True


def _nnunet_plan(root: Path, name: str, fingerprint: dict) -> list:
    import contextlib
    import io as stdio
    import json

    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    (root / "nnUNet_preprocessed" / name / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))
    with contextlib.redirect_stdout(stdio.StringIO()):
        plans = ExperimentPlanner(name).plan_experiment()
    config = plans["configurations"]["3d_fullres"]
    back = plans["transpose_backward"]
    strides = config["architecture"]["arch_kwargs"]["strides"][1:]
    return [
        [float(config["spacing"][i]) for i in back],
        [int(config["patch_size"][i]) for i in back],
        int(config["batch_size"]),
        [[int(s[i]) for i in back] for s in strides],
    ]


def _fmt(value) -> str:
    if isinstance(value, list) and value and isinstance(value[0], list):
        return " ".join("x".join(str(v) for v in item) for item in value)
    if isinstance(value, list) and value and isinstance(value[0], str):
        return ", ".join(value)
    if isinstance(value, list):
        return "x".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def seconds_per_step(topology, patch, batch: int = 2, repeats: int = 2) -> tuple[float, float]:
    """Median wall and CPU time (all threads) of forward + backward + SGD step, deep supervision.

    On a shared machine the wall time depends on the other jobs; the CPU time divided by the
    number of threads estimates the wall time the step takes when the cores are free.
    """
    import torch

    from mipseg.planning.plans import Plans
    from mipseg.training.network import build_network

    plans = Plans.__new__(Plans)
    plans.network = topology
    network = build_network(plans, num_input_channels=1, num_classes=2, deep_supervision=True)
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    x = torch.randn(batch, 1, *patch)
    wall, cpu = [], []
    for _ in range(repeats + 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        optimizer.zero_grad()
        outputs = network(x)
        loss = sum(o.float().mean() for o in outputs)
        loss.backward()
        optimizer.step()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return float(np.median(wall[1:])), float(np.median(cpu[1:]))


def calibrate(args: argparse.Namespace) -> None:
    import torch

    from mipseg.planning.planner import CPU_BUDGET, gpu_budget
    from mipseg.planning.topology import estimate_feature_map_size, get_pool_and_conv_props, make_topology

    torch.set_num_threads(args.threads)
    spacing = [1.0, 1.0, 1.0]
    candidates = [("nnU-Net default", gpu_budget(8), [64, 96, 96])] + [
        (f"cpu {p[0]}x{p[1]}x{p[2]}", CPU_BUDGET, p) for p in np.reshape(args.patches, (-1, 3)).tolist()
    ]
    table = Table(
        title=f"seconds per training step, batch 2, torch threads {args.threads}, "
        f"load {os.getloadavg()[0]:.1f}"
    )
    for column in ("configuration", "features", "estimate", "wall s/step", "cpu s/step / threads"):
        table.add_column(column)
    estimates, seconds = [], []
    for label, budget, patch in candidates:
        pooling = get_pool_and_conv_props(spacing, patch)
        topology = make_topology(pooling, budget.base_features, budget.max_features)
        estimate = estimate_feature_map_size(pooling.patch_size, topology, 2)
        wall, cpu = seconds_per_step(topology, pooling.patch_size, repeats=1 if budget.kind == "gpu" else 2)
        step = cpu / args.threads
        table.add_row(
            label, str(topology.features_per_stage), f"{estimate:.3g}", f"{wall:.2f}", f"{step:.2f}"
        )
        if budget.kind == "cpu":
            estimates.append(estimate)
            seconds.append(step)
        console.print(f"{label}: wall {wall:.2f} s, cpu/threads {step:.2f} s", highlight=False)
    console.print(table)
    slope = float(np.dot(estimates, seconds) / np.dot(estimates, estimates))
    console.print(
        f"fit of cpu s/step through 0: {slope:.3g} s per element -> 1 s at estimate {1 / slope:.3g}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 96, 96])
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.0])
    parser.add_argument("-np", "--num-processes", type=int, default=2)
    parser.add_argument("--calibrate", action="store_true", help="time training steps for the CPU budget")
    parser.add_argument(
        "--planner-only", action="store_true", help="compare the planners on fixed fingerprints"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--patches",
        type=int,
        nargs="+",
        default=[32, 32, 32, 32, 48, 48, 64, 32, 32, 48, 64, 64],
        help="CPU candidate patches to time, flattened (z y x z y x ...)",
    )
    args = parser.parse_args(argv)
    if args.calibrate:
        calibrate(args)
    elif args.planner_only:
        compare_planners(args)
    else:
        compare(args)


if __name__ == "__main__":
    main(sys.argv[1:])
