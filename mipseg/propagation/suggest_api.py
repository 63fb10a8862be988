"""Which slices to draw: ``mipseg_propagate --suggest N`` and ``--suggest-next N``.

Files written::

    preprocessed/DatasetX/suggested_slices.json                case -> slices (and drawn, extents)
    preprocessed/DatasetX/suggested_slices/{case}_slice{k}.png  what the annotator draws on

``--suggest N`` uses the images only (:mod:`mipseg.propagation.slice_selection`);
``--suggest-next N`` also propagates the slices already drawn, to learn where the organs are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mipseg import io, paths
from mipseg.dataset import Case, Dataset, load_dataset
from mipseg.devices import resolve_device
from mipseg.errors import InputError
from mipseg.progress import progress_bar
from mipseg.propagation.propagate_api import (
    PropagationSettings,
    ensure_flow_model,
    load_slice_dataset,
    propagate_case_drawings,
)
from mipseg.propagation.slice_selection import (
    CENTRAL_FRACTION,
    ct_slice_picture,
    slice_picture,
    spread_over_extent,
    suggest_spread_slices,
)
from mipseg.propagation.train_flow import FlowTrainingSettings, load_flow_model, load_normalized_image


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
    loaded = load_slice_dataset(dataset, "suggesting slices")
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
