"""Evaluate a folder of predictions against a folder of references; write an nnU-Net-style summary.json.

The summary has nnU-Net's shape: ``metric_per_case`` (one entry per prediction file with
``reference_file``, ``prediction_file`` and ``metrics`` keyed by the label as a string),
``mean`` (per label, ``np.nanmean`` over cases) and ``foreground_mean`` (plain mean of the
per-label means, background 0 left out). Cases are read and scored one at a time, in worker
processes when ``num_processes > 1``, so memory stays at a few volumes whatever the folder size.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from mipseg import io
from mipseg.errors import InputError
from mipseg.metrics import absent_label_metrics, compute_metrics
from mipseg.progress import progress_bar

SUMMARY_NAME = "summary.json"
_console = Console(stderr=True)


@dataclass(frozen=True)
class LabelSettings:
    """Which labels to score, which reference value to ignore, and which files to read."""

    labels: list[int] | None
    ignore_label: int | None
    file_ending: str


def default_num_processes() -> int:
    """Worker processes used when none are asked for: up to 4, never more than the CPUs."""
    return max(1, min(4, os.cpu_count() or 1))


def dataset_json_of(dataset: str | int) -> Path:
    """Path of the raw ``dataset.json`` of a dataset id (900) or name (Dataset900_Name)."""
    from mipseg import paths

    return paths.raw_dataset_dir(dataset) / "dataset.json"


def label_names(dataset_json: str | Path | None) -> dict[str, str]:
    """Label value (as the summary's string key) -> class name from a dataset.json; empty without one."""
    if dataset_json is None or not Path(dataset_json).is_file():
        return {}
    labels = io.read_json(dataset_json).get("labels", {})
    return {str(value): name for name, value in labels.items() if isinstance(value, int)}


def label_settings(
    *,
    labels: Sequence[int] | None = None,
    ignore_label: int | None = None,
    file_ending: str | None = None,
    dataset_json: str | Path | None = None,
) -> LabelSettings:
    """Combine explicit options with a dataset.json; explicit options win.

    From dataset.json: the foreground labels, its ignore value (``labels["ignore"]``, else
    max label + 1 as for label sets) and its file ending.
    """
    if dataset_json is not None:
        from mipseg.dataset import parse_dataset_json

        spec, problems = parse_dataset_json(io.read_json(dataset_json), str(dataset_json))
        if spec is None:
            raise InputError(problems)
        labels = spec.foreground_labels if labels is None else labels
        ignore_label = spec.ignore_label if ignore_label is None else ignore_label
        file_ending = spec.file_ending if file_ending is None else file_ending
    if labels is not None:
        labels = sorted({int(label) for label in labels})
        if ignore_label is not None and ignore_label in labels:
            raise InputError(f"label {ignore_label} is the ignore value and cannot be evaluated")
    return LabelSettings(labels, ignore_label, file_ending or ".nii.gz")


def match_files(
    gt_folder: str | Path, pred_folder: str | Path, file_ending: str = ".nii.gz", *, strict: bool = False
) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """Pair every prediction with the reference of the same file name.

    Returns
    -------
    pairs : list of (reference, prediction)
        Sorted by file name.
    unmatched_references : list of Path
        References without a prediction (skipped).

    Raises
    ------
    InputError
        A folder is missing, the prediction folder holds no ``file_ending`` files, a
        prediction has no reference, or (``strict``) a reference has no prediction.
    """
    gt_folder, pred_folder = Path(gt_folder), Path(pred_folder)
    problems = [f"{folder}: folder not found" for folder in (gt_folder, pred_folder) if not folder.is_dir()]
    if problems:
        raise InputError(problems)
    predictions = _files_with_ending(pred_folder, file_ending)
    references = _files_with_ending(gt_folder, file_ending)
    if not predictions:
        raise InputError(f"{pred_folder}: no prediction files ending in {file_ending}")
    problems = [
        f"{pred_folder / name}: no reference {gt_folder / name}"
        for name in predictions
        if name not in references
    ]
    unmatched = [gt_folder / name for name in references if name not in predictions]
    if strict:
        problems += [f"{path}: no prediction {pred_folder / path.name} (--strict)" for path in unmatched]
    if problems:
        raise InputError(problems)
    return [(gt_folder / name, pred_folder / name) for name in predictions], unmatched


def evaluate_case(
    reference_file: str | Path,
    prediction_file: str | Path,
    labels: Sequence[int] | None,
    ignore_label: int | None = None,
) -> dict[str, Any]:
    """Read one reference/prediction pair and score it.

    With ``labels=None`` every non-zero value of reference or prediction (except the ignore
    value) is scored, and the entry reports which labels the reference holds in
    ``"_reference_labels"`` so that :func:`evaluate_folders` can pick the labels of the folder.

    Raises
    ------
    InputError
        A file is unreadable, the shapes or geometries differ, or a label map is not integer.
    """
    reference, reference_geometry = io.read_image(reference_file)
    prediction, prediction_geometry = io.read_image(prediction_file)
    if reference.shape != prediction.shape:
        raise InputError(
            f"{prediction_file}: shape {prediction.shape} (z, y, x) differs from reference "
            f"{reference_file} {reference.shape}"
        )
    if not reference_geometry.matches(prediction_geometry):
        raise InputError(
            f"{prediction_file}: geometry {prediction_geometry.to_dict()} differs from reference "
            f"{reference_file} {reference_geometry.to_dict()}"
        )
    reference = _as_label_map(reference, reference_file)
    prediction = _as_label_map(prediction, prediction_file)
    reference_labels = _present_labels(reference, ignore_label)
    scored = (
        labels if labels is not None else sorted(set(reference_labels) | set(_present_labels(prediction)))
    )
    if ignore_label is not None:
        scored = [label for label in scored if label != ignore_label]
    metrics = compute_metrics(
        reference, prediction, scored, spacing=reference_geometry.spacing_zyx, ignore_label=ignore_label
    )
    num_valid = reference.size if ignore_label is None else int(np.count_nonzero(reference != ignore_label))
    return {
        "reference_file": str(reference_file),
        "prediction_file": str(prediction_file),
        "metrics": metrics,
        "_reference_labels": reference_labels,
        "_num_valid_voxels": num_valid,
    }


def evaluate_folders(
    gt_folder: str | Path,
    pred_folder: str | Path,
    *,
    labels: Sequence[int] | None = None,
    ignore_label: int | None = None,
    output: str | Path | None = None,
    num_processes: int | None = None,
    file_ending: str | None = None,
    dataset_json: str | Path | None = None,
    strict: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Score every prediction in ``pred_folder`` against ``gt_folder`` and write summary.json.

    Parameters
    ----------
    gt_folder, pred_folder
        Folders of label maps with the same file names.
    labels
        Labels to score. Default: those of ``dataset_json`` if given, else every non-zero
        value found in any reference (the ignore value excluded).
    ignore_label
        Reference value whose voxels are excluded. Default: from ``dataset_json``, else none.
    output
        Where to write the summary (atomically). Default ``pred_folder/summary.json``.
    num_processes
        Worker processes; 1 scores in this process. Default :func:`default_num_processes`.
    file_ending
        Ending of the files to pair. Default: from ``dataset_json``, else ``.nii.gz``.
    dataset_json
        A dataset.json giving labels, ignore value and file ending.
    strict
        Fail when a reference has no prediction instead of skipping it with a note.

    Returns
    -------
    dict
        ``{"metric_per_case": [...], "mean": {label: {...}}, "foreground_mean": {...},
        "summary_file": str}``; label keys are strings as in the written JSON.
    """
    if num_processes is not None and num_processes < 1:  # 0 or -1 would fall back silently
        raise InputError(f"-np must be at least 1, got {num_processes}")
    settings = label_settings(
        labels=labels, ignore_label=ignore_label, file_ending=file_ending, dataset_json=dataset_json
    )
    pairs, unmatched = match_files(gt_folder, pred_folder, settings.file_ending, strict=strict)
    if unmatched:
        _console.print(
            f"[yellow]note:[/] {len(unmatched)} reference file(s) in {gt_folder} have no prediction and "
            f"are skipped (first: {unmatched[0].name}); pass --strict to make this an error",
            highlight=False,
        )
    jobs = [
        (reference, prediction, settings.labels, settings.ignore_label) for reference, prediction in pairs
    ]
    workers = min(num_processes or default_num_processes(), len(jobs))
    cases = list(_with_progress(_run_jobs(jobs, workers), len(jobs), show_progress))
    summary = summarize(cases, settings.labels)
    if not summary["mean"]:
        raise InputError(
            f"{gt_folder}: the references hold no label except background; choose labels with -l"
        )
    output = Path(output) if output is not None else Path(pred_folder) / SUMMARY_NAME
    io.write_json(summary, output)
    return {**summary, "summary_file": str(output)}


def summarize(cases: list[dict[str, Any]], labels: Sequence[int] | None) -> dict[str, Any]:
    """Build nnU-Net's summary from :func:`evaluate_case` results.

    With ``labels=None`` the labels are those present in any reference; a case missing a
    label gets that label's "absent from both" metrics (all NaN, every voxel TN).
    """
    if labels is None:
        labels = sorted({label for case in cases for label in case["_reference_labels"]})
    per_case = []
    for case in cases:
        metrics = {
            str(label): case["metrics"].get(label) or absent_label_metrics(case["_num_valid_voxels"])
            for label in labels
        }
        per_case.append(
            {
                "reference_file": case["reference_file"],
                "prediction_file": case["prediction_file"],
                "metrics": metrics,
            }
        )
    means = {str(label): _mean_over_cases([c["metrics"][str(label)] for c in per_case]) for label in labels}
    foreground = [values for key, values in means.items() if key != "0"]
    metric_names = list(next(iter(means.values())).keys()) if means else []
    foreground_mean = {name: _plain_mean([values[name] for values in foreground]) for name in metric_names}
    return {"metric_per_case": per_case, "mean": means, "foreground_mean": foreground_mean}


def _mean_over_cases(values: list[dict[str, float]]) -> dict[str, float]:
    """``np.nanmean`` of every metric over cases (NaN stays NaN when every case is NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "Mean of empty slice" for all-NaN metrics
        return {name: float(np.nanmean([v[name] for v in values])) for name in values[0]}


def _plain_mean(values: list[float]) -> float:
    # nnU-Net's foreground_mean is np.mean: a label whose mean is NaN makes the foreground mean NaN.
    return float(np.mean(values)) if values else math.nan


def _run_jobs(jobs: list[tuple], workers: int) -> Iterator[dict[str, Any]]:
    if workers <= 1:
        for job in jobs:
            yield evaluate_case(*job)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_evaluate_job, jobs)


def _evaluate_job(job: tuple) -> dict[str, Any]:
    return evaluate_case(*job)


def _with_progress(results: Iterable[dict[str, Any]], total: int, show: bool) -> Iterator[dict[str, Any]]:
    with progress_bar(show, transient=True) as progress:
        task = progress.add_task("evaluating", total=total)
        for result in results:
            progress.advance(task)
            yield result


def _files_with_ending(folder: Path, file_ending: str) -> list[str]:
    ending = file_ending.lower()
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.is_file() and p.name.lower().endswith(ending) and not p.name.startswith(".")
    )


def _as_label_map(array: np.ndarray, path: str | Path) -> np.ndarray:
    """Integer view of a label map; float files are accepted when every value is a whole number."""
    if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
        return array
    rounded = np.rint(array)
    if not np.array_equal(rounded, array):
        raise InputError(f"{path}: label map holds non-integer values (dtype {array.dtype})")
    return rounded.astype(np.int32)


def _present_labels(label_map: np.ndarray, ignore_label: int | None = None) -> list[int]:
    """Non-zero values of a label map, without the ignore value."""
    return [int(v) for v in np.unique(label_map) if v != 0 and v != ignore_label]
