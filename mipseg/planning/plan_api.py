"""The ``mipseg_plan`` stage: fingerprint -> plans -> splits -> MIPs to annotate -> preprocessing.

Everything lands in ``preprocessed/DatasetX/``::

    dataset.json fingerprint.json plans.json splits.json
    mips/{case}_mip{a}.png  mips/{case}_mip{a}_depth.npy  mips/{case}_mips.png
    data/{case}.npy  data/{case}.json  data/labelsets/{name}/...
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mipseg import io, paths
from mipseg.errors import InputError
from mipseg.labelset import LabelSet
from mipseg.planning.fingerprint import extract_fingerprint
from mipseg.planning.mip import case_mip_paths, write_case_mips
from mipseg.planning.parallel import DEFAULT_NUM_PROCESSES, map_with_progress, shared_workers
from mipseg.planning.planner import CPU_BUDGET, Budget, gpu_budget, plan_experiment
from mipseg.planning.plans import Plans, load_plans
from mipseg.planning.preprocessing import preprocess_dataset, preprocess_labelset
from mipseg.planning.splits import generate_splits

DEVICES = ("auto", "cpu", "cuda")


def resolve_budget(device: str = "auto", gpu_memory_gb: float = 8.0) -> Budget:
    """GPU budget for ``cuda`` (or ``auto`` with CUDA present), the CPU compute budget otherwise."""
    if device not in DEVICES:
        from mipseg.errors import InputError

        raise InputError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return gpu_budget(gpu_memory_gb) if device == "cuda" else CPU_BUDGET


def plan_and_preprocess(
    dataset: str | int,
    *,
    num_processes: int = DEFAULT_NUM_PROCESSES,
    resume: bool = False,
    device: str = "auto",
    gpu_memory_gb: float = 8.0,
    preprocess: bool = True,
    foreground: str = "auto",
) -> Plans:
    """Plan and preprocess one raw dataset; works without annotations and without labelsTr.

    Parameters
    ----------
    dataset
        Id (``900``) or name (``"Dataset900_Name"``).
    num_processes
        Worker processes for fingerprint, MIPs and preprocessing.
    resume
        ``--continue``: keep an existing fingerprint/plans and skip cases already written.
    device, gpu_memory_gb
        Pick the budget (see :mod:`mipseg.planning.planner`).
    preprocess
        ``False`` (``--no-preprocess``) stops after plans, splits and MIPs.
    foreground
        Where intensity statistics come from: ``auto``, ``labels``, ``annotations``, ``nonzero``.

    Returns
    -------
    Plans
        Also written to ``plans.json``.
    """
    from mipseg.dataset import load_dataset

    if num_processes < 1:
        raise InputError(f"-np must be at least 1, got {num_processes}")
    budget = resolve_budget(device, gpu_memory_gb)  # bad flags fail before any work
    # headers only: the fingerprint reads every voxel anyway, and reports unreadable files by name
    loaded = load_dataset(dataset, read_voxels=False)
    with shared_workers(num_processes):
        return _plan_and_preprocess(loaded, budget, num_processes, resume, preprocess, foreground)


def _plan_and_preprocess(
    loaded, budget: Budget, num_processes: int, resume: bool, preprocess: bool, foreground: str
) -> Plans:
    out = paths.preprocessed_root() / loaded.name
    out.mkdir(parents=True, exist_ok=True)
    top_level = [out / f"{name}.json" for name in ("dataset", "fingerprint", "plans", "splits")]
    dataset_path, fingerprint_path, plans_path, splits_path = top_level
    io.remove_stale_partials(out, [io.file_stem(path) for path in top_level])  # left by a killed run
    io.write_json(io.read_json(loaded.folder / "dataset.json"), dataset_path)

    if resume and fingerprint_path.is_file():
        fingerprint = io.read_json(fingerprint_path)
    else:
        fingerprint = extract_fingerprint(loaded, num_processes=num_processes, foreground=foreground)
        io.write_json(fingerprint, fingerprint_path)

    if resume and plans_path.is_file():
        plans = load_plans(plans_path)  # the data already written was made with these plans
    else:
        plans = plan_experiment(fingerprint, loaded.spec, loaded.name, budget)
        plans.save(plans_path)

    write_splits(loaded.case_ids, splits_path)
    write_mips(loaded, plans, out / "mips", num_processes=num_processes, resume=resume)
    if preprocess:
        preprocess_dataset(loaded, plans, num_processes=num_processes, resume=resume)
        for name in existing_labelsets(loaded):
            preprocess_labelset(loaded.name, name, num_processes=num_processes)
    return plans


def write_splits(case_ids: list[str], path: Path) -> list[dict]:
    """Write ``splits.json`` unless one for exactly these cases exists (it is kept, as nnU-Net does)."""
    if path.is_file():
        existing = io.read_json(path)
        if (
            isinstance(existing, list)
            and existing
            and sorted(existing[0]["train"] + existing[0]["val"]) == sorted(case_ids)
        ):
            return existing
    splits = generate_splits(case_ids)
    io.write_json(splits, path)
    return splits


def write_mips(loaded, plans: Plans, out_dir: Path, *, num_processes: int, resume: bool) -> None:
    """MIP PNGs, depth maps and a side-by-side review PNG per training case (raw grid, channel 0).

    Axes: ``plans.mip_axes`` in mip mode; dense datasets get all three axes for review only;
    slice-annotated datasets (organs drawn on a slice, where a projection shows nothing) get none.
    """
    if loaded.spec.annotation == "slice":
        return
    axes = plans.mip_axes or [0, 1, 2]
    # left by a killed run: a case without its side-by-side PNG is written again, whole
    io.remove_stale_partials(
        out_dir,
        [
            io.file_stem(path)
            for case in loaded.cases
            for path in case_mip_paths(out_dir, case.case_id, axes).values()
        ],
    )
    tasks = [
        (str(case.images[0]), axes, str(out_dir), case.case_id)
        for case in loaded.cases
        if not (resume and (out_dir / f"{case.case_id}_mips.png").is_file())
    ]
    map_with_progress(_write_mips_of_file, tasks, num_processes, "MIPs")


def _write_mips_of_file(image_path: str, axes: list[int], out_dir: str, case_id: str) -> None:
    volume, geometry = io.read_image(image_path, np.float32)
    write_case_mips(volume, axes, out_dir, case_id, spacing_zyx=geometry.spacing_zyx)


def existing_labelsets(loaded) -> list[str]:
    """Label sets to put on the preprocessed grid: ``dense`` (if labelsTr) and each folder of labelsets/."""
    names = ["dense"] if any(case.label is not None for case in loaded.cases) else []
    folder = paths.preprocessed_root() / loaded.name / "labelsets"
    if folder.is_dir():
        visible = [p for p in folder.iterdir() if not p.name.startswith(".")]  # not a run's .{name}.next
        candidates = [LabelSet(loaded.name, p.name) for p in visible if p.is_dir()]
        names += sorted(
            labelset.name
            for labelset in candidates
            if any(labelset.label_path(case_id).is_file() for case_id in loaded.case_ids)
        )
    return names
