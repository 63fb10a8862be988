"""Stage ``mipseg_propagate``: train the flow model, propagate into a label set.

Slice suggestions (``--suggest``, ``--suggest-next``) are in :mod:`mipseg.propagation.suggest_api`.

Files written::

    results/DatasetX/flow__selfsup/          checkpoint_{latest,final}.pt, training_log.txt, progress.png
    preprocessed/DatasetX/labelsets/{name}/{case}.nii.gz  raw geometry; labels + ignore on unsure voxels
    preprocessed/DatasetX/labelsets/{name}/labelset.json  what the values mean, settings
    preprocessed/DatasetX/labelsets/{name}/report.json    extents, stop reasons, Dice vs labelsTr

The image is used on its raw grid: slices along numpy axis 0 as stored (no resampling along z);
only the network sees slices resized in-plane to its working grid.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mipseg import io
from mipseg.annotation_png import read_annotation
from mipseg.dataset import Case, Dataset, load_dataset
from mipseg.devices import resolve_device
from mipseg.errors import InputError
from mipseg.labelset import LabelSet, LabelSetWriter, agreement
from mipseg.progress import progress_bar
from mipseg.propagation.baselines import TRANSPORT_METHODS, copy_transport, registration_transport
from mipseg.propagation.flow_net import normalize_volume
from mipseg.propagation.instance_optimization import InstanceOptimization, for_slice_spacing, optimize_flows
from mipseg.propagation.propagate import (
    FUSIONS,
    PropagationResult,
    StopRule,
    Transport,
    flow_transport,
    predict_flows,
    propagate_slices,
)
from mipseg.propagation.train_flow import (
    FlowTrainingSettings,
    flow_model_dir,
    load_flow_model,
    train_flow_model,
)

# Settings keys added after label sets were first made, with the value a run before the key had
# (LabelSetWriter's settings_added): slices between two drawings came from the nearer one until
# 2026-12-05 (fusion), the ignore band did not grow with the distance until later that day
# (band_growth), and verification between two drawings was always on until 2026-12-07.
SETTINGS_ADDED = {"fusion": "nearer", "band_growth": 0.0, "verify_between": True}


@dataclass(frozen=True)
class PropagationSettings:
    """How masks are propagated (the flow model's own settings are :class:`FlowTrainingSettings`)."""

    method: str = "flow"
    verify: bool = True
    verify_between: bool = True
    ignore_band: int = 0
    ignore_slices: int = 1
    band_growth: float = 0.0
    stop_rule: StopRule = StopRule()
    refinement: InstanceOptimization = InstanceOptimization()
    symmetric_flows: bool = True
    fusion: str = "two_sided"

    def problems(self) -> list[str]:
        """One line per bad value, naming its flag; empty when the settings are usable."""
        problems = []
        if self.method not in TRANSPORT_METHODS:
            problems.append(f"--method {self.method}: choose one of {', '.join(TRANSPORT_METHODS)}")
        if self.fusion not in FUSIONS:
            problems.append(f"--fusion {self.fusion}: choose one of {', '.join(FUSIONS)}")
        if self.ignore_band < 0 or self.band_growth < 0:
            problems.append(
                f"--ignore-band {self.ignore_band} / --ignore-band-growth {self.band_growth}: must be >= 0"
            )
        refinement = self.refinement
        if min(refinement.iterations, refinement.coarse_iterations) < 0 or refinement.max_size < 2:
            problems.append(
                f"--refine-iters {refinement.iterations} / --coarse-iters {refinement.coarse_iterations} / "
                f"--refine-size {refinement.max_size}: need at least 0 steps and 2 pixels"
            )
        if refinement.reference_spacing < 0:
            problems.append(
                f"--reference-spacing {refinement.reference_spacing}: must be >= 0 (0 = no scaling)"
            )
        return problems

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "refinement": self.refinement.to_json() if self.method == "flow" else None,
            "symmetric_flows": self.symmetric_flows if self.method == "flow" else None,
            "verify": self.verify,
            "verify_between": self.verify_between,
            "ignore_band": self.ignore_band,
            "ignore_slices": self.ignore_slices,
            "band_growth": self.band_growth,
            "fusion": self.fusion,
            "stop_rule": dict(self.stop_rule.__dict__),
        }


def ensure_flow_model(
    dataset: Dataset,
    settings: FlowTrainingSettings,
    *,
    resume: bool = False,
    device: str = "auto",
    show_progress: bool = True,
) -> Path:
    """Path of the dataset's trained flow model, training (or resuming) it first when needed.

    A finished model (``checkpoint_final.pt``) is reused as it is. An unfinished one is resumed
    with ``resume``; without it the run stops rather than overwrite it.
    """
    settings = fit_working_size(settings, dataset)
    folder = flow_model_dir(dataset.name)
    final, latest = folder / "checkpoint_final.pt", folder / "checkpoint_latest.pt"
    if final.is_file():
        return final
    if latest.is_file() and not resume:
        raise InputError(
            f"{latest}: an unfinished flow model exists; add --continue to resume it, or delete {folder}"
        )
    return train_flow_model(dataset, settings, resume=resume, device=device, show_progress=show_progress)


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


def load_slice_dataset(dataset: str | int, purpose: str) -> Dataset:
    """Load a dataset, refusing any whose ``dataset.json`` is not ``"annotation": "slice"``."""
    loaded = load_dataset(dataset)
    if loaded.spec.annotation != "slice":
        raise InputError(
            f"{loaded.folder / 'dataset.json'}: annotation is {loaded.spec.annotation!r}; "
            f'{purpose} needs "annotation": "slice"'
        )
    return loaded


def propagate_dataset(
    dataset: str | int,
    *,
    name: str = "propagated",
    settings: PropagationSettings = PropagationSettings(),
    flow_settings: FlowTrainingSettings = FlowTrainingSettings(),
    resume: bool = False,
    device: str = "auto",
    show_progress: bool = True,
) -> Path:
    """Propagate every annotated case of a slice-annotated dataset into label set ``name``.

    ``report.json`` is rewritten after every case, so an interrupted run keeps what it finished;
    with ``resume`` (``--continue``) an unfinished flow model is trained on, and cases already in
    the report, with their label map on disk and made with the same settings and flow model, are
    kept instead of propagated again (:class:`~mipseg.labelset.LabelSetWriter`).

    Returns
    -------
    Path of ``labelsets/{name}``.

    Raises
    ------
    InputError
        Not a slice-annotated dataset, no annotated case, unknown method, bad dataset, or
        ``resume`` on a label set made with other settings.
    """
    problems = settings.problems()
    if problems:
        raise InputError(problems)
    loaded = load_slice_dataset(dataset, "propagation")
    annotated = [case for case in loaded.cases if case.annotations]
    if not annotated:
        raise InputError(f"{loaded.folder / 'annotationsTr'}: no {{case}}_slice{{k}}.png annotation found")
    model, torch_device, checkpoint, training_seconds = None, resolve_device(device), None, 0.0
    if settings.method == "flow":
        began = time.perf_counter()
        checkpoint = ensure_flow_model(
            loaded, flow_settings, resume=resume, device=device, show_progress=show_progress
        )
        training_seconds = time.perf_counter() - began
        model = load_flow_model(checkpoint, torch_device)

    labelset = LabelSet(loaded.name, name)
    header = {
        "method": settings.method,
        "flow_model_seconds": training_seconds,
        "unannotated_cases": [c.case_id for c in loaded.cases if not c.annotations],
    }
    writer = LabelSetWriter(
        labelset,
        labelset_description(loaded, name, settings, checkpoint),
        resume=resume,
        header=header,
        settings_added=SETTINGS_ADDED,
    )
    todo = [case for case in annotated if not writer.finished(case.case_id)]
    with progress_bar(show_progress, elapsed=True) as bar:
        task = bar.add_task(
            f"propagating ({settings.method})", total=len(annotated), completed=len(annotated) - len(todo)
        )
        for case in todo:
            writer.add_case(
                case.case_id,
                propagate_case(loaded, case, settings, writer.target.folder, model, torch_device),
            )
            bar.advance(task)
    writer.close(case.case_id for case in annotated)  # drops cases no longer annotated
    return labelset.folder


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
        "made_from": {"flow_model": str(checkpoint) if checkpoint else None},
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


def propagate_case_drawings(
    dataset: Dataset, case: Case, settings: PropagationSettings, model=None, device="cpu"
) -> tuple[PropagationResult, io.Geometry, InstanceOptimization]:
    """Propagate one case's drawn slices through its volume, in memory.

    Returns
    -------
    result : PropagationResult
        Labels and unsure voxels, shape (z, y, x) of the raw image, and the per-class extents.
    geometry : io.Geometry
        The raw image's geometry.
    refinement : InstanceOptimization
        The flow refinement settings used (scaled to the slice spacing).
    """
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
        verify_between=settings.verify_between,
        ignore_band=settings.ignore_band,
        ignore_slices=settings.ignore_slices,
        band_growth=settings.band_growth,
        fusion=settings.fusion,
    )
    return result, geometry, refinement


def undrawn_classes(result: PropagationResult, foreground_labels: Sequence[int]) -> list[int]:
    """Foreground class values drawn on none of a case's slices (every drawn class has an extent)."""
    drawn = {extent.label for extent in result.extents}
    return sorted(int(v) for v in foreground_labels if int(v) not in drawn)


def propagate_case(
    dataset: Dataset, case: Case, settings: PropagationSettings, folder: Path, model=None, device="cpu"
) -> dict[str, Any]:
    """Propagate, write ``{case}.nii.gz`` and return the case's report entry."""
    began = time.perf_counter()
    result, geometry, refinement = propagate_case_drawings(dataset, case, settings, model, device)
    labels = result.with_ignore(dataset.spec.ignore_label)
    io.write_image(
        labels.astype(np.uint8 if labels.max() < 256 else np.int16),
        geometry,
        folder / f"{case.case_id}.nii.gz",
    )
    values = {**dataset.spec.class_labels, "ignore": dataset.spec.ignore_label}
    entry: dict[str, Any] = {
        "counts": {label: int(np.count_nonzero(labels == value)) for label, value in values.items()},
        "annotated_slices": sorted(case.annotations),
        "extents": [extent.to_dict() for extent in result.extents],
        "unsure_fraction": float(result.unsure.mean()),
        # drawn on no slice of this case: its background may hold them (the trainer's marginal loss)
        "undrawn_classes": undrawn_classes(result, dataset.spec.foreground_labels),
        "seconds": time.perf_counter() - began,
    }
    if settings.method == "flow":
        entry["smoothness_weights"] = {"iss": refinement.iss_weight, "in_plane": refinement.smooth_weight}
    if case.label is not None:
        truth, _ = io.read_image(case.label)
        # the propagated masks themselves (unsure band included), as the method would be judged
        entry["agreement"] = agreement(result.labels, truth, dataset.spec.class_labels)
    return entry
