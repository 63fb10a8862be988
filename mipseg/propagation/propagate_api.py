"""Stage ``mipseg_propagate``: train the flow model, suggest slices, propagate into a label set.

Files written::

    results/DatasetX/flow__selfsup/          checkpoint_{latest,final}.pt, training_log.txt, progress.png
    preprocessed/DatasetX/suggested_slices.json           --suggest N: case -> slices, errors
    preprocessed/DatasetX/suggested_slices/{case}_slice{k}.png   what the annotator draws on
    preprocessed/DatasetX/labelsets/{name}/{case}.nii.gz  raw geometry; labels + ignore on unsure voxels
    preprocessed/DatasetX/labelsets/{name}/labelset.json  what the values mean, settings
    preprocessed/DatasetX/labelsets/{name}/report.json    extents, stop reasons, Dice vs labelsTr

The image is used on its raw grid: slices along numpy axis 0 as stored (no resampling along z);
only the network sees slices resized in-plane to its working grid.
"""

from __future__ import annotations

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
from mipseg.propagation.slice_selection import (
    CENTRAL_FRACTION,
    ct_slice_picture,
    slice_picture,
    spread_over_extent,
    suggest_spread_slices,
)
from mipseg.propagation.train_flow import (
    FlowTrainingSettings,
    flow_model_dir,
    load_flow_model,
    load_normalized_image,
    train_flow_model,
)


@dataclass(frozen=True)
class PropagationSettings:
    """How masks are propagated (the flow model's own settings are :class:`FlowTrainingSettings`)."""

    method: str = "flow"
    verify: bool = True
    ignore_band: int = 1
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


def suggest_slices(
    dataset: str | int,
    settings: FlowTrainingSettings = FlowTrainingSettings(),
    *,
    count: int = 1,
    resume: bool = False,
    device: str = "auto",
    show_progress: bool = True,
) -> Path:
    """Suggest ``count`` slices per training case; returns the path of ``suggested_slices.json``.

    One slice: the representative central slice; several: slices that together reach the whole
    volume best (:func:`~mipseg.propagation.slice_selection.suggest_spread_slices`). Each case's
    entry keeps ``slice`` (the first suggested) next to ``slices`` (all, sorted).
    """
    if count < 1:
        raise InputError(f"--suggest {count}: need at least 1 slice per case")
    loaded = load_dataset(dataset)
    checkpoint = ensure_flow_model(
        loaded, settings, resume=resume, device=device, show_progress=show_progress
    )
    torch_device = resolve_device(device)
    model = load_flow_model(checkpoint, torch_device)
    folder = paths.preprocessed_dataset_dir(loaded.name)
    suggestions: dict[str, Any] = {}
    with progress_bar(show_progress, elapsed=True) as bar:
        for case in bar.track(loaded.cases, description="suggesting slices"):
            volume = load_normalized_image(case.images[0])
            indices, errors = suggest_spread_slices(model, volume, count, torch_device)
            suggestions[case.case_id] = {
                **suggestion_entry(loaded, case, volume, indices, folder),
                "reconstruction_error": errors,
            }
    return io.write_json(
        {
            "flow_model": str(checkpoint),
            "criterion": (
                "lowest chain-length-weighted reconstruction error among slices in the central "
                f"{CENTRAL_FRACTION:.0%} of the body's extent"
                if count == 1
                else f"{count} slices with the lowest summed chain-length-weighted reconstruction error, "
                "each slice reached from its best suggested slice (greedy)"
            ),
            "cases": suggestions,
        },
        folder / "suggested_slices.json",
    )


def suggestion_entry(
    dataset: Dataset, case: Case, volume: np.ndarray, indices: list[int], folder: Path
) -> dict[str, Any]:
    """Write the pictures of the suggested slices ``indices`` of one case; return its JSON entry.

    ``volume`` is the normalised image ``(D, H, W)``; CT slices are shown in the soft-tissue window.
    """
    pictures = [folder / "suggested_slices" / f"{case.case_id}_slice{index}.png" for index in indices]
    is_ct = dataset.spec.channel_names.get("0", "").upper() == "CT"
    raw_volume = io.read_image(case.images[0])[0] if is_ct else None
    for index, picture in zip(indices, pictures):
        if raw_volume is not None:  # Hounsfield units: a fixed window
            io.write_png(ct_slice_picture(raw_volume[index]), picture)
            continue
        io.write_png(slice_picture(volume, index), picture)
    return {
        "slice": indices[0] if indices else None,
        "slices": indices,
        "axis": 0,
        "annotation_file": f"annotationsTr/{case.case_id}_slice{indices[0]}.png" if indices else None,
        "annotation_files": [f"annotationsTr/{case.case_id}_slice{index}.png" for index in indices],
        "picture": str(pictures[0].relative_to(folder)) if pictures else None,
        "pictures": [str(picture.relative_to(folder)) for picture in pictures],
    }


def class_extents(labels: np.ndarray, classes: dict[str, int]) -> dict[str, tuple[int, int]]:
    """First and last slice (axis 0) holding each class of ``labels`` ``(D, H, W)``; absent ones left out."""
    extents = {}
    for name, value in classes.items():
        reached = np.flatnonzero((labels == value).any(axis=(1, 2)))
        if reached.size:
            extents[name] = (int(reached[0]), int(reached[-1]))
    return extents


def suggest_next_slices(
    dataset: str | int,
    count: int,
    *,
    settings: PropagationSettings = PropagationSettings(),
    flow_settings: FlowTrainingSettings = FlowTrainingSettings(),
    resume: bool = False,
    device: str = "auto",
    show_progress: bool = True,
) -> Path:
    """Suggest ``count`` more slices per training case, given the slices already drawn.

    A case's drawings are propagated (``settings``, as ``mipseg_propagate`` would); the first and
    last slice each class arrives at are its extent, and the new slices are spread over the classes'
    extents by :func:`~mipseg.propagation.slice_selection.spread_over_extent`. A case without
    drawings gets the label-free suggestion of :func:`suggest_slices`. Writes
    ``suggested_slices.json`` (each entry also holds ``drawn``, ``extent`` (all classes) and
    ``class_extents``) and the slice pictures; returns the JSON's path.
    """
    if count < 1:
        raise InputError(f"--suggest-next {count}: need at least 1 slice per case")
    problems = settings.problems()
    if problems:
        raise InputError(problems)
    loaded = load_dataset(dataset)
    if loaded.spec.annotation != "slice":
        raise InputError(
            f"{loaded.folder / 'dataset.json'}: annotation is {loaded.spec.annotation!r}; "
            'suggesting slices needs "annotation": "slice"'
        )
    torch_device = resolve_device(device)
    model = None
    if settings.method == "flow" or not all(case.annotations for case in loaded.cases):
        checkpoint = ensure_flow_model(
            loaded, flow_settings, resume=resume, device=device, show_progress=show_progress
        )
        model = load_flow_model(checkpoint, torch_device)
    folder = paths.preprocessed_dataset_dir(loaded.name)
    suggestions: dict[str, Any] = {}
    with progress_bar(show_progress, elapsed=True) as bar:
        for case in bar.track(loaded.cases, description="suggesting next slices"):
            volume = load_normalized_image(case.images[0])
            if not case.annotations:
                indices, errors = suggest_spread_slices(model, volume, count, torch_device)
                suggestions[case.case_id] = {
                    **suggestion_entry(loaded, case, volume, indices, folder),
                    "drawn": [],
                    "extent": None,
                    "class_extents": {},
                    "reconstruction_error": errors,
                }
                continue
            result, _, _ = propagate_case_drawings(loaded, case, settings, model, torch_device)
            drawn = sorted(case.annotations)
            organs = {name: value for name, value in loaded.spec.class_labels.items() if value != 0}
            extents = class_extents(result.labels, organs) or {"drawn": (drawn[0], drawn[-1])}
            indices = spread_over_extent(drawn, list(extents.values()), count)
            suggestions[case.case_id] = {
                **suggestion_entry(loaded, case, volume, indices, folder),
                "drawn": drawn,
                "extent": [min(e[0] for e in extents.values()), max(e[1] for e in extents.values())],
                "class_extents": {name: list(extent) for name, extent in extents.items()},
            }
    return io.write_json(
        {
            "criterion": (
                f"{count} more slices per case over the extent its drawings propagate to ({settings.method}),"
                " each organ slice close to a drawing, twice as close beyond the outermost ones"
            ),
            "cases": suggestions,
        },
        folder / "suggested_slices.json",
    )


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
    loaded = load_dataset(dataset)
    if loaded.spec.annotation != "slice":
        raise InputError(
            f"{loaded.folder / 'dataset.json'}: annotation is {loaded.spec.annotation!r}; "
            'propagation needs "annotation": "slice"'
        )
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
        labelset, labelset_description(loaded, name, settings, checkpoint), resume=resume, header=header
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
        ignore_band=settings.ignore_band,
        ignore_slices=settings.ignore_slices,
        band_growth=settings.band_growth,
        fusion=settings.fusion,
    )
    return result, geometry, refinement


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
        "seconds": time.perf_counter() - began,
    }
    if settings.method == "flow":
        entry["smoothness_weights"] = {"iss": refinement.iss_weight, "in_plane": refinement.smooth_weight}
    if case.label is not None:
        truth, _ = io.read_image(case.label)
        # the propagated masks themselves (unsure band included), as the method would be judged
        entry["agreement"] = agreement(result.labels, truth, dataset.spec.class_labels)
    return entry
