"""Full-size scans on CPU: every per-case stage on a 512x512x300 volume, time and peak memory, vs nnU-Net.

Each stage runs in its own process; the benchmark polls the memory of that process and all its
children every 0.1 s (PSS from ``/proc/PID/smaps_rollup`` summed over the process tree, so pages a
forked child shares with its parent count once) and takes the wall time, the CPU time of the tree
(``os.wait4``) and the peak RSS of the largest single process (``ru_maxrss``). Results
are written to ``WORK/full_size.json`` after every stage, and a stage already there is skipped, so
an interrupted run resumes where it stopped (``--redo NAME`` runs a stage again).

Stages (``--stages``, all by default; ``setup`` stages make inputs and are timed but are not
per-case stages of a user's pipeline):

==================  =====================================================================
``data``            setup: one synthetic organ volume and one vessel volume of ``--shape``
                    (default 300x512x512 voxels at 1.0x0.7x0.7 mm), dense truth, simulated
                    annotations; the organ volume is also copied to ``imagesTs`` for predict
``plan_organs``     ``mipseg_plan --device cpu`` (fingerprint, CPU plans, MIPs, preprocessing)
``plan_vessels``    the same for the vessel dataset (needed by pseudolabel)
``pseudolabel``     ``mipseg_pseudolabel`` on the vessel volume's MIP annotation
``flow_model``      setup: train the flow model (``--flow-iters`` iterations)
``propagate``       ``mipseg_propagate`` with that flow model (no training)
``seg_model``       setup: ``mipseg_train -f all`` for ``--train-iters`` iterations (a model to
                    predict with; only speed and memory are judged here)
``predict*``        ``mipseg_predict`` NIfTI in -> NIfTI out, without and with mirroring, default
                    engine (``predict``, ``predict_tta``) and plain torch (``predict_torch``,
                    ``predict_torch_tta``)
``nnunet_model``    setup: an nnU-Net model folder with mipseg's topology and patch
``nnunet*``         nnU-Net's ``predict_from_files`` on the same file, without / with mirroring
``evaluate``        ``mipseg_evaluate`` of the default-engine prediction against the truth
==================  =====================================================================

Usage::

    .venv/bin/python benchmarks/full_size.py --work /tmp/full_size            # everything
    .venv/bin/python benchmarks/full_size.py --work /tmp/fs_small --shape 60 128 128   # quick run
    .venv/bin/python benchmarks/full_size.py --work /tmp/full_size --table   # print what is there

nnU-Net's columns need nnunetv2 importable (``pip install nnunetv2==2.8.1`` into the venv; it is not
a project dependency); without it those stages are reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ORGANS_ID, ORGANS = 953, "Dataset953_FullSizeOrgans"
VESSELS_ID, VESSELS = 954, "Dataset954_FullSizeVessels"
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
GB = 2**30

STAGES = [
    "data",
    "plan_organs",
    "plan_vessels",
    "pseudolabel",
    "flow_model",
    "propagate",
    "seg_model",
    "predict",
    "predict_tta",
    "nnunet_model",
    "nnunet",
    "nnunet_tta",
    "predict_torch",
    "predict_torch_tta",
    "evaluate",
]
SETUP_STAGES = {"data", "flow_model", "seg_model", "nnunet_model"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder; results in full_size.json")
    parser.add_argument("--stages", nargs="+", default=STAGES, help=f"subset of {STAGES}")
    parser.add_argument("--redo", nargs="*", default=[], help="stages to run again although recorded")
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), help="(z, y, x) voxels")
    parser.add_argument("--spacing", type=float, nargs=3, default=(1.0, 0.7, 0.7), help="(z, y, x) mm")
    parser.add_argument("--flow-iters", type=int, default=20, help="flow model training iterations")
    parser.add_argument("--train-iters", type=int, default=4, help="segmentation model training iterations")
    parser.add_argument(
        "--predict-args", default="", help="extra mipseg_predict flags, one string: '--step-size 1'"
    )
    parser.add_argument("--table", action="store_true", help="only print the table of recorded stages")
    parser.add_argument("--inner", default=None, help=argparse.SUPPRESS)  # a stage's own process
    return parser.parse_args(argv)


def set_roots(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        MIPSEG_RAW=str(work / "raw"),
        MIPSEG_PREPROCESSED=str(work / "preprocessed"),
        MIPSEG_RESULTS=str(work / "results"),
        nnUNet_raw=str(work / "nnUNet_raw"),
        nnUNet_preprocessed=str(work / "nnUNet_preprocessed"),
        nnUNet_results=str(work / "nnUNet_results"),
    )
    os.environ.update(env)
    return env


# ---------------------------------------------------------------- measuring a process tree


def _proportional_bytes(pid: int) -> int:
    """PSS of one process: shared pages divided among their sharers, so forked children count once."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as stream:
            for line in stream:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (PermissionError, OSError):
        pass
    with open(f"/proc/{pid}/statm") as stream:  # no smaps_rollup (old kernel): resident size
        return int(stream.read().split()[1]) * PAGE_SIZE


def tree_memory_bytes(pid: int) -> int:
    """Memory of ``pid`` and all its descendants (PSS summed; 0 for processes that are gone)."""
    total, stack, seen = 0, [pid], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            total += _proportional_bytes(current)
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as stream:
                    stack.extend(int(child) for child in stream.read().split())
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


def measure(command: list[str], env: dict[str, str], log_path: Path) -> dict:
    """Run ``command``; wall and CPU seconds, peak RSS of the process tree (sum) and of one process."""
    print("$", " ".join(command), flush=True)
    peak = [0]
    with open(log_path, "w") as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], tree_memory_bytes(process.pid))
                done.wait(0.1)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        done.set()
        poller.join()
    code = os.waitstatus_to_exitcode(status)
    result = {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_tree_pss_gb": peak[0] / GB,
        "peak_process_rss_gb": usage.ru_maxrss * 1024 / GB,
        "exit_code": code,
        "command": " ".join(command),
    }
    if code != 0:
        tail = log_path.read_text()[-2000:]
        print(f"  FAILED ({code}); end of {log_path}:\n{tail}", flush=True)
    else:
        print(
            f"  {wall:.1f} s wall, {result['cpu_s']:.1f} s CPU, peak PSS {result['peak_tree_pss_gb']:.2f} GB "
            f"(largest process {result['peak_process_rss_gb']:.2f} GB)",
            flush=True,
        )
    return result


# ---------------------------------------------------------------- what each stage runs


def script(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def inner(args: argparse.Namespace, name: str) -> list[str]:
    command = [sys.executable, __file__, "--work", str(args.work), "--inner", name]
    command += ["--shape", *map(str, args.shape), "--spacing", *map(str, args.spacing)]
    return command + ["--flow-iters", str(args.flow_iters)]


def stage_command(args: argparse.Namespace, stage: str) -> list[str] | None:
    raw = args.work / "raw" / ORGANS
    predict = [script("mipseg_predict"), "-i", str(raw / "imagesTs"), "-d", ORGANS, "-f", "all"]
    predict += ["--device", "cpu", "--disable-progress-bar", *shlex.split(args.predict_args)]
    commands = {
        "data": inner(args, "data"),
        "plan_organs": [script("mipseg_plan"), "-d", ORGANS, "--device", "cpu", "-np", "1"],
        "plan_vessels": [script("mipseg_plan"), "-d", VESSELS, "--device", "cpu", "-np", "1"],
        "pseudolabel": [script("mipseg_pseudolabel"), "-d", VESSELS],
        "flow_model": inner(args, "flow_model"),
        "propagate": [script("mipseg_propagate"), "-d", ORGANS, "--device", "cpu"],
        "seg_model": [
            script("mipseg_train"),
            "-d",
            ORGANS,
            "-f",
            "all",
            "--labels",
            "dense",
            "--epochs",
            "1",
            "--iters-per-epoch",
            str(args.train_iters),
            "--val-iters",
            "1",
            "--device",
            "cpu",
        ],
        "predict": [*predict, "-o", str(args.work / "pred"), "--disable-tta"],
        "predict_tta": [*predict, "-o", str(args.work / "pred_tta")],
        "predict_torch": [
            *predict,
            "-o",
            str(args.work / "pred_torch"),
            "--disable-tta",
            "--engine",
            "torch",
        ],
        "predict_torch_tta": [*predict, "-o", str(args.work / "pred_torch_tta"), "--engine", "torch"],
        "nnunet_model": inner(args, "nnunet_model"),
        "nnunet": inner(args, "nnunet"),
        "nnunet_tta": inner(args, "nnunet_tta"),
        "evaluate": [
            script("mipseg_evaluate"),
            str(raw / "labelsTs"),
            str(args.work / "pred"),
            "--dataset-json",
            str(raw / "dataset.json"),
        ],
    }
    return commands.get(stage)


def inner_data(args: argparse.Namespace) -> None:
    from mipseg.synthetic import synthesize_dataset

    for dataset_id, kind in ((ORGANS_ID, "organs"), (VESSELS_ID, "vessels")):
        folder = synthesize_dataset(
            dataset_id,
            kind,
            num_cases=1,
            shape=args.shape,
            spacing=args.spacing,
            num_test_cases=0,
            name="FullSizeOrgans" if kind == "organs" else "FullSizeVessels",
            overwrite=True,
            show_progress=False,
        )
        print(folder, flush=True)
    raw = args.work / "raw" / ORGANS
    for source, target in (("imagesTr", "imagesTs"), ("labelsTr", "labelsTs")):
        (raw / target).mkdir(exist_ok=True)
        for path in (raw / source).glob("*.nii.gz"):
            shutil.copy(path, raw / target / path.name)


def inner_flow_model(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from mipseg.dataset import load_dataset
    from mipseg.propagation.propagate_api import ensure_flow_model
    from mipseg.propagation.train_flow import FlowTrainingSettings

    settings = FlowTrainingSettings()
    settings = replace(settings, iterations=args.flow_iters)
    print(ensure_flow_model(load_dataset(ORGANS, read_voxels=False), settings, device="cpu"), flush=True)


def _organ_plans():
    from mipseg import paths
    from mipseg.planning.plans import load_plans

    return load_plans(paths.preprocessed_dataset_dir(ORGANS) / "plans.json")


def inner_nnunet_model(args: argparse.Namespace) -> None:
    from _nnunet import nnunet_model_folder

    folder = nnunet_model_folder(ORGANS, args.work / "raw" / ORGANS, _organ_plans(), num_processes=1)
    print(folder, flush=True)


def inner_nnunet_predict(args: argparse.Namespace, tta: bool) -> None:
    import torch
    from _nnunet import NNUNET_MODEL
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    out = args.work / f"pred_nnunet{'_tta' if tta else ''}"
    shutil.rmtree(out, ignore_errors=True)
    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=tta,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    model_dir = Path(os.environ["nnUNet_results"]) / ORGANS / NNUNET_MODEL
    predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=(0,))
    # nnUNetv2_predict's defaults: 3 preprocessing and 3 export processes
    predictor.predict_from_files(
        str(args.work / "raw" / ORGANS / "imagesTs"),
        str(out),
        save_probabilities=False,
        overwrite=True,
        num_processes_preprocessing=3,
        num_processes_segmentation_export=3,
    )


INNER = {
    "data": inner_data,
    "flow_model": inner_flow_model,
    "nnunet_model": inner_nnunet_model,
    "nnunet": lambda args: inner_nnunet_predict(args, False),
    "nnunet_tta": lambda args: inner_nnunet_predict(args, True),
}


# ---------------------------------------------------------------- results


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"meta": {}, "stages": {}}


def save_results(results: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


def print_table(results: dict) -> None:
    stages = results["stages"]
    print(f"\nvolume {results['meta'].get('shape')} at {results['meta'].get('spacing')} mm")
    print(f"{'stage':20} {'wall s':>9} {'CPU s':>9} {'peak PSS GB':>12} {'1 process GB':>13}")
    for name in STAGES:
        if name in stages:
            row = stages[name]
            if "skipped" in row:
                print(f"{name:20} skipped: {row['skipped']}")
                continue
            mark = "" if row["exit_code"] == 0 else f"  FAILED ({row['exit_code']})"
            setup = "  (setup)" if name in SETUP_STAGES else ""
            memory = row.get("peak_tree_pss_gb", row.get("peak_tree_rss_gb", float("nan")))
            print(
                f"{name:20} {row['wall_s']:9.1f} {row['cpu_s']:9.1f} {memory:12.2f} "
                f"{row['peak_process_rss_gb']:13.2f}{mark}{setup}"
            )
    for fast, slow in (("predict", "nnunet"), ("predict_tta", "nnunet_tta"), ("predict", "predict_torch")):
        a, b = stages.get(fast, {}), stages.get(slow, {})
        if a.get("exit_code") == 0 and b.get("exit_code") == 0:
            print(
                f"{slow} / {fast}: wall {b['wall_s'] / a['wall_s']:.2f}x, CPU {b['cpu_s'] / a['cpu_s']:.2f}x"
            )


def main() -> None:
    args = parse_args()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    env = set_roots(args.work)
    sys.path.insert(0, str(Path(__file__).parent))
    if args.inner:
        INNER[args.inner](args)
        return
    path = args.work / "full_size.json"
    results = load_results(path)
    if args.table:
        print_table(results)
        return
    unknown = sorted(set(args.stages) - set(STAGES))
    if unknown:
        sys.exit(f"unknown stages {unknown}; known: {STAGES}")
    results["meta"] = {
        "shape": list(args.shape),
        "spacing": list(args.spacing),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
    }
    (args.work / "logs").mkdir(exist_ok=True)
    for stage in STAGES:
        if stage not in args.stages or (stage in results["stages"] and stage not in args.redo):
            continue
        if stage.startswith("nnunet") and _missing_nnunet():
            results["stages"][stage] = {"skipped": "nnunetv2 not importable"}
            save_results(results, path)
            continue
        load = os.getloadavg()[0]
        print(f"== {stage}  (load average {load:.1f})", flush=True)
        row = measure(stage_command(args, stage), env, args.work / "logs" / f"{stage}.log")
        row.update(date=time.strftime("%Y-%m-%d %H:%M"), load_average_before=load)
        results["stages"][stage] = row
        save_results(results, path)
    print_table(results)


def _missing_nnunet() -> bool:
    import importlib.util

    return importlib.util.find_spec("nnunetv2") is None


if __name__ == "__main__":
    main()
