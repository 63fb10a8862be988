"""Write a complete synthetic raw dataset: images, dense truth, simulated annotations, dataset.json.

The dataset is assembled in a hidden staging folder next to its final place and renamed
into place at the end, so an interrupted run never leaves a half-written dataset that
``load_dataset`` would pick up.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from mipseg import io, paths
from mipseg.errors import InputError
from mipseg.progress import track
from mipseg.synthetic.annotation import (
    SLICE_CHOICES,
    simulate_mip_annotation,
    simulate_slice_annotation,
)
from mipseg.synthetic.organs import MAX_ORGAN_CLASSES, make_organ_volume
from mipseg.synthetic.vessels import make_vessel_volume

KINDS = ("vessels", "organs")
# Upper limit of each vessels-only generator option (make_vessel_volume's keyword); 1.0 is its default.
VESSEL_OPTION_LIMITS = {"vessel_density": 10.0, "noise_scale": 50.0}
DEFAULT_SHAPE = {"vessels": (64, 96, 96), "organs": (48, 96, 96)}
DEFAULT_SPACING = {"vessels": (1.0, 1.0, 1.0), "organs": (3.0, 1.0, 1.0)}
_DEFAULT_NAME = {"vessels": "SyntheticVessels", "organs": "SyntheticOrgans"}
_GENERATORS: dict[str, Callable] = {"vessels": make_vessel_volume, "organs": make_organ_volume}


def synthesize_dataset(
    dataset: int,
    kind: str,
    *,
    num_cases: int = 12,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    seed: int = 0,
    name: str | None = None,
    mip_axes: Sequence[int] = (0,),
    num_test_cases: int = 2,
    annotator_noise: bool = False,
    slice_choice: str | int = "middle",
    organ_classes: int = 1,
    vessel_density: float = 1.0,
    noise_scale: float = 1.0,
    overwrite: bool = False,
    show_progress: bool = True,
) -> Path:
    """Generate a raw dataset ``raw_root()/Dataset{id:03d}_{name}`` with dense truth and 2D annotations.

    Parameters
    ----------
    dataset
        Id of the new dataset, 0..999 (named ``Dataset{id:03d}_{name}``).
    kind
        ``"vessels"`` (MIP annotations along ``mip_axes``) or ``"organs"`` (one annotated
        slice per case, chosen by ``slice_choice``).
    num_cases, num_test_cases
        Training cases (imagesTr, labelsTr, annotationsTr) and test cases (imagesTs, labelsTs).
    shape, spacing
        ``(z, y, x)`` voxels and mm; ``None`` picks the kind's default (vessels 64x96x96 at
        1 mm, organs 48x96x96 at 3x1x1 mm).
    seed
        Case ``i`` is drawn from ``np.random.default_rng((seed, i))``: the same seed gives
        identical files, and a case does not depend on how many cases are made.
    annotator_noise
        Vessels only: simulate annotator imperfection (missed faint branches, 1-pixel dilation).
    organ_classes
        Organs only: labelled classes, 1..4. 1 (default) labels the organ only; ``N`` > 1 labels
        ``N - 1`` of its touching neighbours too (``neighbour_1`` = 2, ...; see
        :func:`mipseg.synthetic.organs.make_organ_volume`), and each drawn slice holds every class
        present on it.
    vessel_density, noise_scale
        Vessels only: multiply the number of vessel trees and the image noise level (see
        :func:`mipseg.synthetic.make_vessel_volume_with_centrelines`); 1.0 (default) gives the
        same files as before these options existed.
    overwrite
        Replace an existing dataset of the same folder name.

    Returns
    -------
    Path of the dataset folder.

    Raises
    ------
    InputError
        Bad arguments, or the dataset (or another one with the same id) already exists.
    """
    dataset_id = dataset
    vessel_options = {"vessel_density": vessel_density, "noise_scale": noise_scale}
    shape, spacing, name = _checked_arguments(
        dataset_id,
        kind,
        num_cases,
        shape,
        spacing,
        seed,
        name,
        mip_axes,
        num_test_cases,
        slice_choice,
        organ_classes,
        vessel_options,
    )
    folder = paths.raw_root() / paths.dataset_folder_name(dataset_id, name)
    _check_existing(folder, dataset_id, overwrite)

    staging = folder.with_name(f".{folder.name}.partial-{uuid.uuid4().hex[:8]}")
    geometry = synthetic_geometry(shape, spacing)
    options = {"organ_classes": organ_classes} if kind == "organs" else vessel_options
    try:
        total = num_cases + num_test_cases
        for index in track(range(total), f"synthesizing {kind}", show=show_progress):
            rng = np.random.default_rng((seed, index))
            try:
                image, label = _GENERATORS[kind](shape, spacing, rng, **options)
            except InputError as error:
                raise InputError([f"case {kind}_{index:03d}: {p}" for p in error.problems]) from None
            case_id = f"{kind}_{index:03d}"
            training = index < num_cases
            images_dir, labels_dir = ("imagesTr", "labelsTr") if training else ("imagesTs", "labelsTs")
            io.write_image(image, geometry, staging / images_dir / f"{case_id}_0000.nii.gz")
            io.write_image(label, geometry, staging / labels_dir / f"{case_id}.nii.gz")
            if training:
                _write_annotations(
                    staging / "annotationsTr",
                    case_id,
                    kind,
                    image,
                    label,
                    mip_axes,
                    annotator_noise,
                    slice_choice,
                    rng,
                    organ_classes,
                )
        io.write_json(
            _dataset_json(
                kind,
                num_cases,
                mip_axes,
                seed,
                shape,
                spacing,
                annotator_noise,
                slice_choice,
                organ_classes,
                vessel_options,
            ),
            staging / "dataset.json",
        )
        # Swap by renames so the old dataset stays complete until the new one is.
        replaced = folder.with_name(f".{folder.name}.replaced-{uuid.uuid4().hex[:8]}")
        if folder.exists():
            folder.rename(replaced)
        staging.rename(folder)
        if replaced.exists():
            shutil.rmtree(replaced)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return folder


def synthetic_geometry(shape: Sequence[int], spacing: Sequence[float]) -> io.Geometry:
    """Identity direction, the given spacing and a nonzero origin that centres the volume.

    A nonzero origin makes sure later stages copy geometry instead of assuming the default.
    """
    spacing_xyz = tuple(float(s) for s in reversed(spacing))
    origin_xyz = tuple(
        -0.5 * (n - 1) * s + offset for n, s, offset in zip(reversed(shape), spacing_xyz, (3.5, -7.25, 12.0))
    )
    return io.Geometry(spacing_xyz, origin_xyz, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def _write_annotations(
    folder: Path,
    case_id: str,
    kind: str,
    image: np.ndarray,
    label: np.ndarray,
    mip_axes: Sequence[int],
    annotator_noise: bool,
    slice_choice: str | int,
    rng: np.random.Generator,
    organ_classes: int = 1,
) -> None:
    """One PNG per MIP axis (vessels) or one slice PNG (organs) holding every class on that slice."""
    if kind == "vessels":
        for axis in mip_axes:
            mask = simulate_mip_annotation(image, label, axis, annotator_noise=annotator_noise, rng=rng)
            if not mask.any():
                raise InputError(
                    f"case {case_id}: no vessel is visible in the MIP along axis {axis} at shape "
                    f"{list(image.shape)}; use a larger --shape"
                )
            io.write_png(_viewable(mask), folder / f"{case_id}_mip{axis}.png")
        return
    try:
        index, mask = simulate_slice_annotation(label, slice_choice)
    except InputError as error:
        raise InputError([f"case {case_id}: {problem}" for problem in error.problems]) from None
    io.write_png(_viewable(mask, organ_classes), folder / f"{case_id}_slice{index}.png")


def _viewable(mask: np.ndarray, foreground_classes: int = 1) -> np.ndarray:
    """The PNG pixels of a drawing of a dataset with ``foreground_classes`` labels.

    One class: saved as 255 (white in any viewer; the annotation reader maps it to class 1). Several
    classes: the class values themselves, as the reader requires (255 would be an unknown label).
    """
    if foreground_classes > 1:
        return mask.astype(np.uint8)
    return (mask > 0).astype(np.uint8) * 255 if mask.max(initial=0) <= 1 else mask


def _dataset_json(
    kind: str,
    num_cases: int,
    mip_axes: Sequence[int],
    seed: int,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    annotator_noise: bool,
    slice_choice: str | int,
    organ_classes: int = 1,
    vessel_options: dict[str, float] | None = None,
) -> dict:
    data = {
        "channel_names": {"0": "MRA" if kind == "vessels" else "MRI"},
        "labels": {"background": 0, "vessel" if kind == "vessels" else "organ": 1}
        | {organ_class_name(value): value for value in range(2, organ_classes + 1)},
        "numTraining": num_cases,
        "file_ending": ".nii.gz",
        "annotation": "mip" if kind == "vessels" else "slice",
    }
    if kind == "vessels":
        data["mip_axes"] = [int(a) for a in mip_axes]
    data["synthetic"] = {
        "kind": kind,
        "seed": seed,
        "shape": list(shape),
        "spacing": list(spacing),
        "annotator_noise": annotator_noise if kind == "vessels" else None,
        "slice_choice": str(slice_choice) if kind == "organs" else None,
    }
    if organ_classes != 1:  # only then, so that one-class datasets stay byte-identical to earlier ones
        data["synthetic"]["organ_classes"] = organ_classes
    # the same for the vessel options: default datasets keep their dataset.json
    data["synthetic"].update({key: v for key, v in (vessel_options or {}).items() if v != 1.0})
    return data


def organ_class_name(value: int) -> str:
    """Name in dataset.json of synthetic organ class ``value``: ``organ`` (1), ``neighbour_{value - 1}``."""
    return "organ" if value == 1 else f"neighbour_{value - 1}"


def _checked_arguments(
    dataset_id: int,
    kind: str,
    num_cases: int,
    shape: Sequence[int] | None,
    spacing: Sequence[float] | None,
    seed: int,
    name: str | None,
    mip_axes: Sequence[int],
    num_test_cases: int,
    slice_choice: str | int,
    organ_classes: int = 1,
    vessel_options: dict[str, float] | None = None,
) -> tuple[tuple[int, int, int], tuple[float, float, float], str]:
    """Validate everything at once; one InputError line per problem."""
    problems = []
    if kind not in KINDS:
        raise InputError(f"kind {kind!r} must be one of {', '.join(KINDS)}")
    shape = tuple(DEFAULT_SHAPE[kind] if shape is None else shape)
    spacing = tuple(DEFAULT_SPACING[kind] if spacing is None else spacing)
    if len(shape) != 3 or any(int(s) != s or s < 8 for s in shape):
        problems.append(f"shape {list(shape)} must be 3 integers z y x, each at least 8")
    if len(spacing) != 3 or any(not s > 0 for s in spacing):
        problems.append(f"spacing {list(spacing)} must be 3 positive numbers z y x (mm)")
    if seed < 0:
        problems.append(f"seed {seed} must not be negative")
    if num_cases < 1:
        problems.append(f"number of cases {num_cases} must be at least 1")
    if num_test_cases < 0:
        problems.append(f"number of test cases {num_test_cases} must not be negative")
    if not mip_axes or len(set(mip_axes)) != len(mip_axes) or any(a not in (0, 1, 2) for a in mip_axes):
        problems.append(f"MIP axes {list(mip_axes)} must be distinct values from 0, 1, 2")
    choice = str(slice_choice)
    if choice not in SLICE_CHOICES and not choice.isdigit():
        problems.append(f"slice choice {choice!r} must be 'middle', 'largest' or a slice index")
    elif choice.isdigit() and len(shape) == 3 and int(choice) >= shape[0]:
        problems.append(f"slice index {choice} is outside the {shape[0]} slices of shape {list(shape)}")
    if not 1 <= organ_classes <= MAX_ORGAN_CLASSES:
        problems.append(f"organ classes {organ_classes} must be 1..{MAX_ORGAN_CLASSES}")
    elif kind != "organs" and organ_classes != 1:
        problems.append(f"organ classes {organ_classes}: only --kind organs has several classes")
    for key, value in (vessel_options or {}).items():
        option, most = key.replace("_", " "), VESSEL_OPTION_LIMITS[key]
        if not 0 < value <= most:  # also rejects NaN
            problems.append(f"{option} {value} must be above 0 and at most {most:g}")
        elif kind != "vessels" and value != 1.0:
            problems.append(f"{option} {value}: only --kind vessels has this option")
    name = _DEFAULT_NAME[kind] if name is None else name
    try:
        paths.dataset_folder_name(dataset_id, name)
    except InputError as error:
        problems += error.problems
    if problems:
        raise InputError(problems)
    return tuple(int(s) for s in shape), tuple(float(s) for s in spacing), name


def _check_existing(folder: Path, dataset_id: int, overwrite: bool) -> None:
    """Refuse to replace a dataset unless asked, and never take an id another dataset already uses."""
    prefix = f"Dataset{dataset_id:03d}_"
    root = folder.parent
    others = (
        sorted(p.name for p in root.iterdir() if p.name.startswith(prefix) and p != folder)
        if root.is_dir()
        else []
    )
    if others:
        raise InputError(
            f"dataset id {dataset_id} is already used by {', '.join(others)} in {root}; pick another id"
        )
    if folder.exists() and not overwrite:
        raise InputError(f"{folder}: dataset already exists; pass --overwrite to replace it")


def annotate_suggested_slices(dataset: str | int, suggestions_file: Path) -> dict[str, int | None]:
    """Simulate an annotator who draws the slices ``mipseg_propagate --suggest`` proposed.

    For every case in ``suggestions_file`` (``suggested_slices.json``), the case's slice
    annotations ``annotationsTr/{case}_slice*.png`` are replaced by the dense truth
    ``labelsTr/{case}`` on every suggested slice (``slices``, or the one ``slice``), every class
    present on the slice included (multi-organ datasets: pixel value = class). A suggested
    slice without foreground gets no drawing (a case with none has no annotation, as when an
    annotator finds nothing to draw).
    ``dataset.json``'s ``synthetic.slice_choice`` becomes ``"suggested"``.

    Returns
    -------
    dict
        Case -> the first slice drawn, or None where no suggested slice held foreground.
    """
    folder = paths.raw_dataset_dir(dataset)
    if not Path(suggestions_file).is_file():
        raise InputError(f"{suggestions_file}: not found; run mipseg_propagate -d {dataset} --suggest first")
    suggestions = io.read_json(suggestions_file)["cases"]
    spec = io.read_json(folder / "dataset.json")
    foreground_classes = sum(1 for name, value in spec["labels"].items() if value != 0 and name != "ignore")
    drawn: dict[str, int | None] = {}
    for case_id, suggestion in sorted(suggestions.items()):
        label_path = folder / "labelsTr" / f"{case_id}.nii.gz"
        if not label_path.is_file():
            raise InputError(f"{label_path}: no dense truth to draw the suggested slice from")
        label, _ = io.read_image(label_path)
        for old in (folder / "annotationsTr").glob(f"{case_id}_slice*.png"):
            old.unlink()
        drawn[case_id] = None
        suggested = suggestion["slices"] if "slices" in suggestion else [suggestion["slice"]]
        for index in (int(i) for i in suggested):
            if label[index].any():
                io.write_png(
                    _viewable(label[index].astype(np.uint8), foreground_classes),
                    folder / "annotationsTr" / f"{case_id}_slice{index}.png",
                )
                drawn[case_id] = index if drawn[case_id] is None else drawn[case_id]
    if isinstance(spec.get("synthetic"), dict):  # keep the record of how the drawings were made true
        spec["synthetic"]["slice_choice"] = "suggested"
        io.write_json(spec, folder / "dataset.json")
    return drawn
