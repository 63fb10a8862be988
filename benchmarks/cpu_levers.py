"""CPU speed levers of prediction and training, with their Dice cost on a trained synthetic model.

Three parts (``--parts``):

``tile``
    Seconds per tile of one network (``--plans``; default: the CPU plan mipseg makes for a
    300x512x512 CT at 1.0x0.7x0.7 mm, 16..128 features, patch 32x40x48; ``--gpu-plan`` for the
    GPU plan, 32..320 features, patch 96x160x160) for every inference lever: torch float32 at
    several tile batch sizes, channels-last 3D, bfloat16 autocast, ``torch.compile``
    (``--compile``), OpenVINO float32 and bfloat16. Runs are interleaved (A, B, A, B, ...) and the
    best of ``--repeats`` is kept, in wall and process CPU time (the CPU time varies less on a
    shared machine).
``train``
    Seconds per training step (forward, deep-supervised loss, backward, SGD; batch of the plans)
    of the same network: float32, channels-last, bfloat16 autocast.
``dice``
    A synthetic organ model trained on CPU (``--train-iters`` iterations, CPU plans, dense labels),
    then ``mipseg_predict`` on its test cases with each setting: engine, precision, mirroring,
    step size; Dice against the truth and wall/CPU seconds of the prediction.

Usage::

    .venv/bin/python benchmarks/cpu_levers.py --parts tile train [--gpu-plan] [--compile]
    .venv/bin/python benchmarks/cpu_levers.py --parts dice --work /tmp/levers
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

DICE_DATASET = "Dataset955_LeverOrgans"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", default=["tile", "train"], choices=["tile", "train", "dice"])
    parser.add_argument("--plans", default=None, help="plans.json of the network (default: the CPU plan)")
    parser.add_argument("--gpu-plan", action="store_true", help="the GPU plan of the same CT instead")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--compile", action="store_true", help="also torch.compile (slow to compile)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/mipseg_levers"))
    parser.add_argument("--train-cases", type=int, default=6)
    parser.add_argument("--train-iters", type=int, default=300)
    parser.add_argument("--json", type=Path, default=None, help="append the results here")
    return parser.parse_args()


def ct_plans(budget: str):
    """mipseg's plans for a 300x512x512 CT-like volume at 1.0x0.7x0.7 mm (body crop 300x450x468)."""
    from mipseg.planning.planner import CPU_BUDGET, gpu_budget, plan_experiment

    fingerprint = {
        "spacings": [[1.0, 0.7, 0.7]] * 3,
        "shapes_after_crop": [[300, 450, 468]] * 3,
        "foreground_intensity_properties_per_channel": {"0": {}},
        "median_relative_size_after_cropping": 0.8,
    }
    spec = SimpleNamespace(
        num_classes=2,
        mip_axes=[],
        annotation="slice",
        channel_names={"0": "MRI"},
        labels={"background": 0, "organ": 1},
        ignore_label=2,
    )
    return plan_experiment(
        fingerprint, spec, "Dataset999_CT", CPU_BUDGET if budget == "cpu" else gpu_budget()
    )


def interleaved(runs: dict, repeats: int) -> dict:
    """Best wall and CPU seconds of each callable over ``repeats`` interleaved rounds (after a warm-up)."""
    for run in runs.values():
        run()
    best = {name: [float("inf"), float("inf")] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            best[name][0] = min(best[name][0], time.perf_counter() - wall)
            best[name][1] = min(best[name][1], time.process_time() - cpu)
    return best


def part_tile(plans, args: argparse.Namespace) -> list[dict]:
    import torch

    from mipseg.inference import engines
    from mipseg.training.network import build_network

    torch.manual_seed(0)
    network = build_network(
        plans, num_input_channels=1, num_classes=plans.num_classes, deep_supervision=False
    )
    network.eval()
    runs, tiles = {}, {}
    for batch in args.batches:
        x = torch.randn(batch, 1, *plans.patch_size)
        runs[f"torch float32, batch {batch}"], tiles[f"torch float32, batch {batch}"] = (
            lambda x=x: network(x),
            batch,
        )
    batch = args.batches[min(1, len(args.batches) - 1)]
    x = torch.randn(batch, 1, *plans.patch_size)
    last = build_network(plans, num_input_channels=1, num_classes=plans.num_classes, deep_supervision=False)
    last.load_state_dict(network.state_dict())
    last = last.eval().to(memory_format=torch.channels_last_3d)
    x_last = x.contiguous(memory_format=torch.channels_last_3d)
    runs[f"torch channels-last, batch {batch}"] = lambda: last(x_last)
    bf16 = engines.tile_runner(network, "torch", "bfloat16", x.shape, torch.device("cpu"))
    runs[f"torch bfloat16 autocast, batch {batch}"] = lambda: bf16(x)
    if args.compile:
        start = time.time()
        compiled = torch.compile(network)
        with torch.inference_mode():
            compiled(x)
        print(f"torch.compile: first call {time.time() - start:.0f} s", flush=True)
        runs[f"torch.compile, batch {batch}"] = lambda: compiled(x)
    if engines.openvino_available():
        for precision in ("float32", "bfloat16"):
            for b in args.batches:
                xb = torch.randn(b, 1, *plans.patch_size)
                start = time.time()
                runner = engines.tile_runner(network, "openvino", precision, xb.shape, torch.device("cpu"))
                print(
                    f"OpenVINO {precision} batch {b}: conversion/load {time.time() - start:.0f} s", flush=True
                )
                runs[f"OpenVINO {precision}, batch {b}"] = lambda r=runner, xb=xb: r(xb)
                tiles[f"OpenVINO {precision}, batch {b}"] = b
    with torch.inference_mode():
        best = interleaved(runs, args.repeats)
    rows = []
    reference = best[f"torch float32, batch {batch}"][1] / batch
    for name, (wall, cpu) in best.items():
        count = tiles.get(name, batch)
        rows.append({"lever": name, "wall_s_per_tile": wall / count, "cpu_s_per_tile": cpu / count})
        print(
            f"  {name:36} {wall / count * 1000:9.1f} ms/tile wall {cpu / count * 1000:9.1f} ms/tile CPU "
            f"({reference / (cpu / count):.2f}x)",
            flush=True,
        )
    return rows


def part_train(plans, args: argparse.Namespace) -> list[dict]:
    import torch

    from mipseg.training.losses import PartialDiceCELoss
    from mipseg.training.network import build_network

    torch.manual_seed(0)
    shape = (plans.batch_size, 1, *plans.patch_size)
    batch = torch.randn(shape)
    target = {"target": (torch.rand((plans.batch_size, 1, *plans.patch_size)) > 0.8).long()}
    loss_fn = PartialDiceCELoss(ignore_label=plans.ignore_label)

    def make(memory_format, dtype):
        network = build_network(plans, num_input_channels=1, num_classes=plans.num_classes).train()
        network = network.to(memory_format=memory_format)
        optimizer = torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
        x = batch.contiguous(memory_format=memory_format)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                outputs = network(x)
            loss = loss_fn([o.float() for o in outputs], target)[0]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
            optimizer.step()
            float(loss.detach())

        return step

    runs = {
        "float32": make(torch.contiguous_format, "float32"),
        "channels-last float32": make(torch.channels_last_3d, "float32"),
        "bfloat16 autocast": make(torch.contiguous_format, "bfloat16"),
    }
    best = interleaved(runs, args.repeats)
    rows = []
    for name, (wall, cpu) in best.items():
        rows.append({"lever": f"train step {name}", "wall_s": wall, "cpu_s": cpu})
        print(
            f"  train step, batch {plans.batch_size}, {name:24} {wall:7.2f} s wall {cpu:7.2f} s CPU",
            flush=True,
        )
    return rows


# ---------------------------------------------------------------- Dice of a trained model


def _console(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _run(command: list[str], env: dict) -> tuple[float, float]:
    """Wall and CPU seconds (the process and its children) of a command; exits on failure."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    output = process.stdout.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(command)} failed:\n{output[-3000:]}")
    return time.perf_counter() - start, usage.ru_utime + usage.ru_stime


def _mean_dice(reference_dir: Path, prediction_dir: Path) -> float:
    import numpy as np

    from mipseg import io
    from mipseg.metrics import dice

    scores = []
    for reference_path in sorted(reference_dir.glob("*.nii.gz")):
        reference = io.read_image(reference_path)[0] == 1
        prediction = io.read_image(prediction_dir / reference_path.name)[0] == 1
        scores.append(dice(reference, prediction))
    return float(np.mean(scores))


DICE_SETTINGS = {
    "torch float32, mirroring (before)": ["--engine", "torch"],
    "OpenVINO float32, mirroring (default now)": ["--engine", "openvino"],
    "OpenVINO bfloat16, mirroring": ["--engine", "openvino", "--precision", "bfloat16"],
    "OpenVINO float32, no mirroring": ["--engine", "openvino", "--disable-tta"],
    "OpenVINO float32, step 0.75, mirroring": ["--engine", "openvino", "--step-size", "0.75"],
    "OpenVINO bfloat16, no mirroring": ["--engine", "openvino", "--precision", "bfloat16", "--disable-tta"],
    "torch float32, no mirroring": ["--engine", "torch", "--disable-tta"],
}


def part_dice(args: argparse.Namespace) -> list[dict]:
    work = args.work.resolve()
    env = dict(os.environ)
    env.update(
        MIPSEG_RAW=str(work / "raw"), MIPSEG_PREPROCESSED=str(work / "pre"), MIPSEG_RESULTS=str(work / "res")
    )
    model = work / "res" / DICE_DATASET / "plain__dense__3d_fullres" / "fold_all" / "checkpoint_final.pt"
    if not model.is_file():
        id_ = DICE_DATASET[7:10]
        name = DICE_DATASET.split("_", 1)[1]
        synthesize = ["-d", id_, "--kind", "organs", "--name", name, "--cases", str(args.train_cases)]
        _run([_console("mipseg_synthesize"), *synthesize, "--test-cases", "3", "--overwrite"], env)
        _run([_console("mipseg_plan"), "-d", id_, "--device", "cpu"], env)
        epochs = max(1, args.train_iters // 50)
        train = ["-d", id_, "-f", "all", "--labels", "dense", "--device", "cpu", "--epochs", str(epochs)]
        wall, cpu = _run([_console("mipseg_train"), *train, "--iters-per-epoch", "50"], env)
        print(f"trained {epochs} x 50 iterations: {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
    raw = work / "raw" / DICE_DATASET
    rows = []
    for name, flags in DICE_SETTINGS.items():
        out = work / "pred" / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        command = [_console("mipseg_predict"), "-i", str(raw / "imagesTs"), "-o", str(out)]
        command += ["-d", DICE_DATASET, "--device", "cpu", "--disable-progress-bar", *flags]
        wall, cpu = _run(command, env)
        score = _mean_dice(raw / "labelsTs", out)
        rows.append({"setting": name, "dice": score, "wall_s": wall, "cpu_s": cpu})
        print(f"  {name:46} Dice {score:.4f}  {wall:7.1f} s wall {cpu:7.1f} s CPU", flush=True)
    return rows


def main() -> None:
    args = parse_args()
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[variable] = str(args.threads)
    import torch

    from mipseg.planning.plans import load_plans

    torch.set_num_threads(args.threads)
    plans = load_plans(args.plans) if args.plans else ct_plans("gpu" if args.gpu_plan else "cpu")
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.1f}, {args.threads} threads; "
        f"patch {plans.patch_size}, features {plans.network.features_per_stage}",
        flush=True,
    )
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "patch": plans.patch_size}
    if "tile" in args.parts:
        results["tile"] = part_tile(plans, args)
    if "train" in args.parts:
        results["train"] = part_train(plans, args)
    if "dice" in args.parts:
        results["dice"] = part_dice(args)
    if args.json is not None:
        with open(args.json, "a") as stream:
            stream.write(json.dumps(results) + "\n")


if __name__ == "__main__":
    main()
