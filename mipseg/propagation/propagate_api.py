"""Stage ``mipseg_propagate``: train the flow model, suggest slices, propagate into a label set.

Files written::

    results/DatasetX/flow__selfsup/          checkpoint_{latest,final}.pt, training_log.txt, progress.png
    preprocessed/DatasetX/suggested_slices.json           --suggest: case -> slice, errors
    preprocessed/DatasetX/suggested_slices/{case}_slice{k}.png   what the annotator draws on
    preprocessed/DatasetX/labelsets/{name}/{case}.nii.gz  raw geometry; labels + ignore on unsure voxels
    preprocessed/DatasetX/labelsets/{name}/labelset.json  what the values mean, settings
    preprocessed/DatasetX/labelsets/{name}/report.json    extents, stop reasons, Dice vs labelsTr

The image is used on its raw grid: slices along numpy axis 0 as stored (no resampling along z);
only the network sees slices resized in-plane to its working grid.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mipseg import io, paths
from mipseg.annotation_png import read_annotation
from mipseg.dataset import Case, Dataset, load_dataset
from mipseg.devices import resolve_device
from mipseg.errors import InputError
from mipseg.propagation.baselines import TRANSPORT_METHODS, copy_transport, registration_transport
from mipseg.propagation.flow_net import normalize_volume
from mipseg.propagation.instance_optimization import InstanceOptimization, for_slice_spacing, optimize_flows
from mipseg.propagation.propagate import (
    StopRule,
    Transport,
    flow_transport,
    predict_flows,
    propagate_slices,
)
from mipseg.propagation.slice_selection import CENTRAL_FRACTION, slice_picture, suggest_slice
from mipseg.propagation.train_flow import (
    FlowTrainingSettings,
    flow_model_dir,
    load_flow_model,
    load_normalized_image,
    progress_bar,
    train_flow_model,
)


@dataclass(frozen=True)
class PropagationSettings:
    """How masks are propagated (the flow model's own settings are :class:`FlowTrainingSettings`)."""

    method: str = "flow"
    verify: bool = True
    ignore_band: int = 1
    ignore_slices: int = 1
    stop_rule: StopRule = StopRule()
    refinement: InstanceOptimization = InstanceOptimization()
    symmetric_flows: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "refinement": self.refinement.to_json() if self.method == "flow" else None,
            "symmetric_flows": self.symmetric_flows if self.method == "flow" else None,
            "verify": self.verify,
            "ignore_band": self.ignore_band,
            "ignore_slices": self.ignore_slices,
            "stop_rule": dict(self.stop_rule.__dict__),
        }


def ensure_flow_model(
    dataset: Dataset,
    settings: FlowTrainingSettings,
    *,
    continue_training: bool = False,
    device: str = "auto",
    show_progress: bool = True,
) -> Path:
    """Path of the dataset's trained flow model, training (or resuming) it first when needed.

    A finished model (``checkpoint_final.pt``) is reused as it is. An unfinished one is resumed
    with ``continue_training``; without it the run stops rather than overwrite it.
    """
    settings = fit_working_size(settings, dataset)
    folder = flow_model_dir(dataset.name)
    final, latest = folder / "checkpoint_final.pt", folder / "checkpoint_latest.pt"
    if final.is_file():
        return final
    if latest.is_file() and not continue_training:
        raise InputError(
            f"{latest}: an unfinished flow model exists; add --continue to resume it, or delete {folder}"
        )
    return train_flow_model(
        dataset, settings, continue_training=continue_training, device=device, show_progress=show_progress
    )


def fit_working_size(settings: FlowTrainingSettings, dataset: Dataset) -> FlowTrainingSettings:
    """Shrink the network's working grid to the largest image's in-plane size (never upsample).

    Each axis becomes ``min(configured, largest size rounded down to the pooling factor)``.
    """
    factor = 2 ** (len(settings.network.features) - 1)
    largest = np.zeros(2, dtype=int)
    for case in (*dataset.cases, *dataset.test_cases):
        shape, _ = io.read_image_header(case.images[0])
        largest = np.maximum(largest, shape[1:])
    size = tuple(
        int(max(factor, min(configured, (extent // factor) * factor)))
        for configured, extent in zip(settings.network.working_size, largest)
    )
    return replace(settings, network=replace(settings.network, working_size=size))


def suggest_slices(
    dataset_id: str | int,
    settings: FlowTrainingSettings = FlowTrainingSettings(),
    *,
    continue_training: bool = False,
    device: str = "auto",
    show_progress: bool = True,
) -> Path:
    """Suggest one slice per training case; returns the path of ``suggested_slices.json``."""
    dataset = load_dataset(dataset_id)
    checkpoint = ensure_flow_model(
        dataset, settings, continue_training=continue_training, device=device, show_progress=show_progress
    )
    torch_device = resolve_device(device)
    model = load_flow_model(checkpoint, torch_device)
    folder = paths.preprocessed_dataset_dir(dataset.name)
    suggestions: dict[str, Any] = {}
    with progress_bar(show_progress) as bar:
        for case in bar.track(dataset.cases, description="suggesting slices"):
            volume = load_normalized_image(case.images[0])
            index, errors = suggest_slice(model, volume, torch_device)
            picture = folder / "suggested_slices" / f"{case.case_id}_slice{index}.png"
            io.write_png(slice_picture(volume, index), picture)
            suggestions[case.case_id] = {
                "slice": index,
                "axis": 0,
                "annotation_file": f"annotationsTr/{case.case_id}_slice{index}.png",
                "picture": str(picture.relative_to(folder)),
                "reconstruction_error": errors,
            }
    return io.write_json(
        {
            "flow_model": str(checkpoint),
            "criterion": (
                "lowest chain-length-weighted reconstruction error among slices in the central "
                f"{CENTRAL_FRACTION:.0%} of the body's extent"
            ),
            "cases": suggestions,
        },
        folder / "suggested_slices.json",
    )


def propagate_dataset(
    dataset_id: str | int,
    *,
    name: str = "propagated",
    settings: PropagationSettings = PropagationSettings(),
    flow_settings: FlowTrainingSettings = FlowTrainingSettings(),
    continue_training: bool = False,
    resume: bool = False,
    device: str = "auto",
    show_progress: bool = True,
) -> Path:
    """Propagate every annotated case of a slice-annotated dataset into label set ``name``.

    ``report.json`` is rewritten after every case, so an interrupted run keeps what it finished;
    with ``resume`` (``--continue``) cases already in the report, with their label map on disk and
    made with the same settings and flow model, are kept instead of propagated again.

    Returns
    -------
    Path of ``labelsets/{name}``.

    Raises
    ------
    InputError
        Not a slice-annotated dataset, no annotated case, unknown method, bad dataset, or
        ``resume`` on a label set made with other settings.
    """
    if settings.method not in TRANSPORT_METHODS:
        raise InputError(f"--method {settings.method}: choose one of {', '.join(TRANSPORT_METHODS)}")
    refinement = settings.refinement
    if min(refinement.iterations, refinement.coarse_iterations) < 0 or refinement.max_size < 2:
        raise InputError(
            f"--refine-iters {refinement.iterations} / --coarse-iters {refinement.coarse_iterations} / "
            f"--refine-size {refinement.max_size}: need at least 0 steps and 2 pixels"
        )
    if refinement.reference_spacing < 0:
        raise InputError(f"--reference-spacing {refinement.reference_spacing}: must be >= 0 (0 = no scaling)")
    dataset = load_dataset(dataset_id)
    if dataset.spec.annotation != "slice":
        raise InputError(
            f"{dataset.folder / 'dataset.json'}: annotation is {dataset.spec.annotation!r}; "
            'propagation needs "annotation": "slice"'
        )
    annotated = [case for case in dataset.cases if case.annotations]
    if not annotated:
        raise InputError(f"{dataset.folder / 'annotationsTr'}: no {{case}}_slice{{k}}.png annotation found")
    model, torch_device, checkpoint, training_seconds = None, resolve_device(device), None, 0.0
    if settings.method == "flow":
        began = time.perf_counter()
        checkpoint = ensure_flow_model(
            dataset,
            flow_settings,
            continue_training=continue_training,
            device=device,
            show_progress=show_progress,
        )
        training_seconds = time.perf_counter() - began
        model = load_flow_model(checkpoint, torch_device)

    folder = paths.labelset_dir(dataset.name, name)
    description = labelset_description(dataset, name, settings, checkpoint)
    finished = _finished_cases(folder, description) if resume else {}
    io.write_json(description, folder / "labelset.json")
    entries = {case.case_id: finished[case.case_id] for case in annotated if case.case_id in finished}

    def write_report() -> None:
        ordered = [entries[case.case_id] for case in annotated if case.case_id in entries]
        report = {
            "method": settings.method,
            "flow_model": str(checkpoint) if checkpoint else None,
            "flow_model_seconds": training_seconds,
            "unannotated_cases": [c.case_id for c in dataset.cases if not c.annotations],
            "mean_dice": _mean_dice(ordered),
            "cases": ordered,
        }
        io.write_json(report, folder / "report.json")

    with progress_bar(show_progress) as bar:
        task = bar.add_task(f"propagating ({settings.method})", total=len(annotated), completed=len(entries))
        for case in annotated:
            if case.case_id not in entries:
                entries[case.case_id] = propagate_case(dataset, case, settings, folder, model, torch_device)
                write_report()
                bar.advance(task)
    write_report()  # also when every case was kept: drops entries of cases no longer annotated
    return folder


def _finished_cases(folder: Path, description: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Report entries of an earlier run of the same label set whose label map exists, by case id.

    Raises :class:`InputError` when the earlier run used other settings or another flow model:
    mixing them in one label set would go unnoticed.
    """
    description_path, report_path = folder / "labelset.json", folder / "report.json"
    if not (description_path.is_file() and report_path.is_file()):
        return {}
    earlier = io.read_json(description_path)
    # JSON round trip, so tuples in the new description compare equal to the lists read back.
    current = json.loads(json.dumps(description))
    differences = {"settings": "other settings", "flow_model": "another flow model"}
    changed = [words for key, words in differences.items() if earlier.get(key) != current[key]]
    if changed:
        raise InputError(
            f"{description_path}: made with {' and '.join(changed)} than this run; run without "
            "--continue to remake the label set, or choose another --name"
        )
    entries = io.read_json(report_path).get("cases", [])
    return {entry["case"]: entry for entry in entries if (folder / f"{entry['case']}.nii.gz").is_file()}


def labelset_description(
    dataset: Dataset, name: str, settings: PropagationSettings, checkpoint: Path | None
) -> dict[str, Any]:
    """Content of ``labelset.json``: what every value means and how the set was made."""
    spec = dataset.spec
    return {
        "name": name,
        "dataset": dataset.name,
        "made_by": "mipseg_propagate (single-slice mask propagation, Flow2Mask-style)",
        "labels": {**spec.class_labels, "ignore": spec.ignore_label},
        "ignore": spec.ignore_label,
        "ignore_means": "propagation unsure: boundary band of propagated masks and slices past a stop",
        "geometry": "raw image grid",
        "settings": settings.to_json(),
        "flow_model": str(checkpoint) if checkpoint else None,
    }


def make_transport(
    method: str,
    volume: np.ndarray,
    model=None,
    device="cpu",
    refinement: InstanceOptimization = InstanceOptimization(),
    symmetric: bool = True,
) -> Transport:
    """The mask transport of ``method`` for one normalised volume ``(D, H, W)``.

    ``flow``: the network's flows, then optimised on this volume (``refinement``; label-free),
    moving masks by the mean of the flows' and their inverse-consistent version's warps
    (``symmetric``).
    """
    if method == "flow":
        forward, backward = predict_flows(model, volume, device)
        forward, backward = optimize_flows(volume, forward, backward, refinement, device)
        return flow_transport(forward, backward, volume.shape[1:], symmetric=symmetric)
    if method == "registration":
        return registration_transport(volume)
    return copy_transport


def propagate_case(
    dataset: Dataset, case: Case, settings: PropagationSettings, folder: Path, model=None, device="cpu"
) -> dict[str, Any]:
    """Propagate, write ``{case}.nii.gz`` and return the case's report entry."""
    began = time.perf_counter()
    raw, geometry = io.read_image(case.images[0], dtype=np.float32)
    volume = normalize_volume(raw)
    annotations = {
        index: read_annotation(path, dataset.spec).astype(np.int16)
        for index, path in case.annotations.items()
    }
    refinement = for_slice_spacing(settings.refinement, geometry.spacing_zyx[0])
    transport = make_transport(settings.method, volume, model, device, refinement, settings.symmetric_flows)
    result = propagate_slices(
        volume,
        annotations,
        transport,
        rule=settings.stop_rule,
        verify=settings.verify,
        ignore_band=settings.ignore_band,
        ignore_slices=settings.ignore_slices,
    )
    labels = result.with_ignore(dataset.spec.ignore_label)
    io.write_image(
        labels.astype(np.uint8 if labels.max() < 256 else np.int16),
        geometry,
        folder / f"{case.case_id}.nii.gz",
    )
    entry: dict[str, Any] = {
        "case": case.case_id,
        "annotated_slices": sorted(annotations),
        "extents": [extent.to_dict() for extent in result.extents],
        "unsure_fraction": float(result.unsure.mean()),
        "seconds": time.perf_counter() - began,
    }
    if settings.method == "flow":
        entry["smoothness_weights"] = {"iss": refinement.iss_weight, "in_plane": refinement.smooth_weight}
    if case.label is not None:
        truth, _ = io.read_image(case.label)
        entry["dice"] = dice_per_class(result.labels, truth, dataset.spec.foreground_labels)
    return entry


def dice_per_class(prediction: np.ndarray, truth: np.ndarray, labels: list[int]) -> dict[str, float | None]:
    """Dice of every label (``None`` where both are empty), on ``(z, y, x)`` maps."""
    scores: dict[str, float | None] = {}
    for label in labels:
        predicted, true = prediction == label, truth == label
        total = int(predicted.sum()) + int(true.sum())
        scores[str(label)] = None if total == 0 else 2.0 * float((predicted & true).sum()) / total
    return scores


def _mean_dice(entries: list[dict[str, Any]]) -> dict[str, float]:
    values: dict[str, list[float]] = {}
    for entry in entries:
        for label, score in entry.get("dice", {}).items():
            if score is not None:
                values.setdefault(label, []).append(score)
    return {label: float(np.mean(scores)) for label, scores in values.items()}
