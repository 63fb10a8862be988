"""The pseudo-label stage: a MIP-annotated raw dataset -> label set ``labelsets/{name}/``.

For every training case it reads channel 0 of the image, the annotation PNG of every MIP axis and
the depth map (``preprocessed/.../mips/{case}_mip{a}_depth.npy`` from ``mipseg_plan`` when present,
else computed), back-projects the annotation (:mod:`mipseg.pseudolabel.mip_backprojection`) and
writes, atomically and case by case::

    labelsets/{name}/{case}.nii.gz        uint8, raw geometry: 0 background, 1 vessel, ignore value
    labelsets/{name}/{case}_seeds.nii.gz  uint8, raw geometry: 1 at seed voxels (S_p), ignore value elsewhere
    labelsets/{name}/qc/{case}_mip{a}.png RGB: the MIP with S_1's projection overlaid
    labelsets/{name}/labelset.json        what the values mean and how the set was made
    labelsets/{name}/report.json          voxel counts per case; agreement with labelsTr if present

Dense truth (labelsTr) is read only to fill the agreement numbers of the report.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mipseg import io, paths
from mipseg.annotation_png import read_annotation
from mipseg.dataset import Case, Dataset, DatasetSpec, load_dataset, parse_dataset_json
from mipseg.errors import InputError
from mipseg.labelset import SEEDS_PATTERN, LabelSet, LabelSetWriter, agreement, name_problems
from mipseg.planning.mip import maximum_intensity_projection, ray_coordinates
from mipseg.progress import progress_bar
from mipseg.pseudolabel import calibrated
from mipseg.pseudolabel import mip_backprojection as bp

DEFAULT_NAME = "pseudo"
# QC colours (RGB): S_1 seen on annotated pixels, and S_1 leaking onto pixels nobody annotated.
# the colours of every agreement picture (demo_report.overlay too): green agrees, yellow extra, red missed
QC_ANNOTATED = np.array([0, 200, 0], dtype=np.float32)
QC_LEAK = np.array([240, 220, 0], dtype=np.float32)
QC_MISSED = np.array([230, 0, 0], dtype=np.float32)
QC_ALPHA = 0.6


@dataclass(frozen=True)
class PseudoLabelSettings:
    """Every threshold of both rules.

    ``rule``: ``"calibrated"`` (default; ``grow_factor``, ``background_factor``, ``reference``,
    ``edge_sigmas``, ``edge_radius``, ``min_size``: :mod:`mipseg.pseudolabel.calibrated`) or
    ``"published"`` (``fg_factor``, ``min_size``, ``bright_factor``, ``dark_factor``
    with the published defaults, seed-methods.md A.2).
    ``axes`` = MIP axes whose annotations are used (``None``: all of dataset.json ``mip_axes``).
    ``overlap`` = what an S_1 voxel the annotation contradicts (in S_0 or on an unannotated ray) becomes
    (``"vessel"``, ``"background"``, ``"ignore"``); ``seed_floor`` drops seeds darker than that fraction
    of the median seed intensity (0 = keep all, as published).
    """

    fg_factor: float = bp.FG_FACTOR
    min_size: int = bp.MIN_SIZE
    bright_factor: float = bp.BRIGHT_FACTOR
    dark_factor: float = bp.DARK_FACTOR
    clip_fraction: float = bp.CLIP_FRACTION
    overlap: str = bp.DEFAULT_OVERLAP
    seed_floor: float = bp.SEED_FLOOR
    axes: tuple[int, ...] | None = field(default=None)
    rule: str = bp.DEFAULT_RULE
    grow_factor: float = calibrated.GROW_FACTOR
    background_factor: float = calibrated.BACKGROUND_FACTOR
    reference: str = calibrated.REFERENCE
    edge_sigmas: float = calibrated.EDGE_SIGMAS
    edge_radius: float = calibrated.EDGE_RADIUS

    def problems(self) -> list[str]:
        """One line per invalid setting."""
        found = []
        if not self.fg_factor > 0:
            found.append(f"--fg-factor must be > 0, got {self.fg_factor}")
        if self.min_size < 1:
            found.append(f"--min-size must be >= 1, got {self.min_size}")
        if not 0 <= self.dark_factor < self.bright_factor:
            found.append(
                f"need 0 <= --dark-factor < --bright-factor, got {self.dark_factor} and {self.bright_factor}"
            )
        if not 0 <= self.clip_fraction < 0.5:
            found.append(f"--clip-fraction must be in [0, 0.5), got {self.clip_fraction}")
        if not 0 <= self.seed_floor <= 1:
            found.append(f"--seed-floor must be in [0, 1], got {self.seed_floor}")
        if self.overlap not in bp.OVERLAP_RULES:
            found.append(f"--overlap must be one of {', '.join(bp.OVERLAP_RULES)}, got {self.overlap!r}")
        if self.rule not in bp.RULES:
            found.append(f"--rule must be one of {', '.join(bp.RULES)}, got {self.rule!r}")
        if not 0 < self.grow_factor < 1:
            found.append(f"--grow-factor must be in (0, 1), got {self.grow_factor}")
        if not -1 <= self.background_factor < self.grow_factor:
            found.append(
                f"need -1 <= --background-factor < --grow-factor, got {self.background_factor} "
                f"and {self.grow_factor}"
            )
        if not self.edge_sigmas >= 0:
            found.append(f"--edge-sigmas must be >= 0, got {self.edge_sigmas}")
        if not 0 <= self.edge_radius <= 10:
            found.append(f"--edge-radius must be in [0, 10] voxels, got {self.edge_radius}")
        if self.reference not in calibrated.REFERENCES:
            found.append(
                f"--reference must be one of {', '.join(calibrated.REFERENCES)}, got {self.reference!r}"
            )
        return found

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["axes"] = None if self.axes is None else list(self.axes)
        return data


def make_pseudo_labels(
    dataset: str | int,
    name: str = DEFAULT_NAME,
    *,
    settings: PseudoLabelSettings | None = None,
    resume: bool = False,
    num_processes: int = 1,
    show_progress: bool = True,
) -> Path:
    """Write the pseudo-label set ``name`` of a MIP-annotated dataset; returns its folder.

    Parameters
    ----------
    dataset
        Dataset id or folder name.
    name
        Label set name (folder under ``preprocessed/DatasetX/labelsets``); ``dense`` is reserved.
    settings
        Rule and thresholds; ``None`` = the defaults (calibrated rule).
    resume
        Keep cases already finished by an earlier run with the same settings (``--continue``).
    num_processes
        Cases processed in parallel.

    Raises
    ------
    InputError
        Bad settings, a dataset that is not in mip mode, missing / empty / wrong-size annotations,
        or a depth map of the wrong shape.
    """
    settings = settings or PseudoLabelSettings()
    problems = settings.problems() + name_problems(name, "label set name")
    if num_processes < 1:
        problems.append(f"-np must be >= 1, got {num_processes}")
    if problems:
        raise InputError(problems)
    _require_mip_mode(dataset)
    loaded = load_dataset(dataset, read_voxels=False, require_annotations=True)
    axes = _check_axes(loaded, settings.axes)
    labelset = LabelSet(loaded.name, name)
    writer = LabelSetWriter(
        labelset,
        labelset_description(loaded, name, settings, axes),
        resume=resume,
        case_files=lambda case_id: _case_files(labelset, case_id, axes),
    )
    jobs = [
        (loaded, case, axes, settings, writer.target.folder)  # beside a finished set until close
        for case in loaded.cases
        if not writer.finished(case.case_id)
    ]
    with progress_bar(show_progress) as progress:
        task = progress.add_task(f"pseudo-labels {loaded.name}", total=len(loaded.cases))
        progress.advance(task, len(loaded.cases) - len(jobs))
        for case_id, entry in _run_jobs(jobs, num_processes):
            writer.add_case(case_id, entry)
            progress.advance(task)
    writer.close(loaded.case_ids)
    return labelset.folder


def labelset_description(
    dataset: Dataset, name: str, settings: PseudoLabelSettings, axes: tuple[int, ...]
) -> dict[str, Any]:
    """Content of ``labelset.json``: the meaning of every value and file, and the settings."""
    spec = dataset.spec
    return {
        "name": name,
        "dataset": dataset.name,
        "made_by": "mipseg_pseudolabel (MIP back-projection, Guo et al. IEEE TMI 2024)",
        "background": 0,
        "vessel": 1,
        "ignore": spec.ignore_label,
        "labels": {**label_classes(spec), "ignore": spec.ignore_label},
        "seeds": SEEDS_PATTERN,
        "seeds_values": {"seed": 1, "elsewhere": spec.ignore_label},
        "intensity_channel": 0,
        "mip_axes": list(axes),
        "settings": {**settings.to_json(), "axes": list(axes)},
    }


def label_classes(spec: DatasetSpec) -> dict[str, int]:
    """The classes of a pseudo-label map: background 0 and the dataset's first foreground label, 1."""
    return {"background": 0, next(k for k, v in spec.class_labels.items() if v == 1): 1}


def process_case(
    dataset: Dataset, case: Case, axes: tuple[int, ...], settings: PseudoLabelSettings, folder: Path
) -> dict[str, Any]:
    """Make and write the label map, seeds and QC pictures of one case; returns its report entry."""
    volume, geometry = io.read_image(case.images[0], dtype=np.float32)
    annotations = {axis: read_annotation(case.annotations[axis], dataset.spec) > 0 for axis in axes}
    mips = {axis: volume.max(axis=axis) for axis in axes}
    depths = {axis: load_depth_map(dataset, case.case_id, volume, axis, mips[axis]) for axis in axes}
    labels, seeds, counts = bp.pseudo_label_volume(
        volume,
        annotations,
        depths,
        ignore_value=dataset.spec.ignore_label,
        fg_factor=settings.fg_factor,
        min_size=settings.min_size,
        bright_factor=settings.bright_factor,
        dark_factor=settings.dark_factor,
        clip_fraction=settings.clip_fraction,
        overlap=settings.overlap,
        seed_floor=settings.seed_floor,
        rule=settings.rule,
        grow_factor=settings.grow_factor,
        background_factor=settings.background_factor,
        reference=settings.reference,
        edge_sigmas=settings.edge_sigmas,
        edge_radius=settings.edge_radius,
    )
    low, high = bp.intensity_scale(volume, settings.clip_fraction)
    for axis in axes:
        mip = bp.normalize_intensity(mips[axis], low, high)
        overlay = qc_overlay(mip, (labels == 1).any(axis=axis), annotations[axis])
        io.write_png(overlay, folder / "qc" / f"{case.case_id}_mip{axis}.png")
    entry: dict[str, Any] = {"counts": counts}
    if case.label is not None:
        truth, _ = io.read_image(case.label)
        # the vessel value is 1; truth with several classes is scored as "any label > 0"
        entry["agreement"] = agreement(labels, (truth > 0).astype(np.uint8), label_classes(dataset.spec))
    # Seeds as a label map of their own (seed class at seeds, ignore elsewhere), the layout the
    # trainer reads, so preprocessing can treat it exactly like the label map.
    seed_map = np.where(seeds, np.uint8(1), np.uint8(dataset.spec.ignore_label))
    io.write_image(seed_map, geometry, folder / SEEDS_PATTERN.format(case=case.case_id))
    # The label map is written last: its presence (plus the report entry) marks the case finished.
    io.write_image(labels, geometry, folder / f"{case.case_id}.nii.gz")
    return entry


def load_depth_map(
    dataset: Dataset, case_id: str, volume: np.ndarray, axis: int, mip: np.ndarray | None = None
) -> np.ndarray:
    """Depth (argmax) map of ``volume`` along ``axis``: mipseg_plan's file if present, else computed.

    Parameters
    ----------
    volume : np.ndarray, shape (z, y, x)
        Channel 0 of the raw image.
    mip : np.ndarray, optional
        ``volume.max(axis)`` if already computed; used to check that a stored map is current.

    Raises
    ------
    InputError
        If the stored depth map does not fit the MIP grid, points outside the volume, or does not
        point at the brightest voxel of every ray (made from another image).
    """
    path = paths.preprocessed_root() / dataset.name / "mips" / f"{case_id}_mip{axis}_depth.npy"
    expected = tuple(s for a, s in enumerate(volume.shape) if a != axis)
    if not path.is_file():
        return maximum_intensity_projection(volume, axis)[1]
    try:
        depth = np.load(path)
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: unreadable depth map ({error})") from None
    if depth.shape != expected or not np.issubdtype(depth.dtype, np.integer):
        raise InputError(
            f"{path}: depth map {depth.dtype} {depth.shape} does not match the MIP grid {expected} "
            f"of the image along axis {axis}; rerun mipseg_plan or delete it"
        )
    if depth.size and (depth.min() < 0 or depth.max() >= volume.shape[axis]):
        raise InputError(f"{path}: depth values outside 0..{volume.shape[axis] - 1}")
    mip = volume.max(axis=axis) if mip is None else mip
    if not np.array_equal(volume[ray_coordinates(depth, axis)], mip):
        raise InputError(
            f"{path}: depth map does not point at the brightest voxel of each ray of channel 0 "
            f"(made from another image?); rerun mipseg_plan or delete it"
        )
    return depth


def qc_overlay(mip: np.ndarray, foreground_projection: np.ndarray, annotation: np.ndarray) -> np.ndarray:
    """RGB QC picture: grey MIP; S_1 green where annotated, yellow off the annotation, red: drawn, not in S_1.

    Parameters
    ----------
    mip : np.ndarray of float in [0, 1], shape (rows, cols)
    foreground_projection, annotation : np.ndarray of bool, shape (rows, cols)

    Returns
    -------
    np.ndarray of uint8, shape (rows, cols, 3)
    """
    rgb = np.repeat((mip * 255.0)[..., None], 3, axis=-1).astype(np.float32)
    for mask, colour in (
        (foreground_projection & annotation, QC_ANNOTATED),
        (foreground_projection & ~annotation, QC_LEAK),
        (~foreground_projection & annotation, QC_MISSED),
    ):
        rgb[mask] = (1 - QC_ALPHA) * rgb[mask] + QC_ALPHA * colour
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _require_mip_mode(dataset: str | int) -> None:
    """Say first that a dataset is not in mip mode, before its (then irrelevant) annotation problems."""
    path = paths.raw_dataset_dir(dataset) / "dataset.json"
    if not path.is_file():
        return  # load_dataset reports it
    spec, _ = parse_dataset_json(io.read_json(path), str(path))
    if spec is not None and spec.annotation != "mip":
        raise InputError(
            f"{path}: 'annotation' is {spec.annotation!r}; pseudo-labels need \"mip\" annotations"
        )


def _check_axes(dataset: Dataset, requested: tuple[int, ...] | None) -> tuple[int, ...]:
    if requested is None:
        return tuple(dataset.spec.mip_axes)
    unknown = sorted(set(requested) - set(dataset.spec.mip_axes))
    if unknown:
        raise InputError(
            f"--axes {list(requested)}: axes {unknown} are not in dataset.json mip_axes "
            f"{list(dataset.spec.mip_axes)}"
        )
    return tuple(sorted(set(requested)))


def _case_files(labelset: LabelSet, case_id: str, axes: tuple[int, ...]) -> list[Path]:
    """Files of a finished case: seeds and QC pictures, and the label map (written last)."""
    qc = [labelset.folder / "qc" / f"{case_id}_mip{axis}.png" for axis in axes]
    return [labelset.seeds_path(case_id), *qc, labelset.label_path(case_id)]


def _run_job(job: tuple[Dataset, Case, tuple[int, ...], PseudoLabelSettings, Path]) -> tuple[str, dict]:
    dataset, case, axes, settings, folder = job
    return case.case_id, process_case(dataset, case, axes, settings, folder)


def _run_jobs(jobs: list[tuple], num_processes: int) -> Iterator[tuple[str, dict]]:
    """Results of the jobs as they finish, in this process or in a pool of ``num_processes``."""
    if num_processes == 1 or len(jobs) <= 1:
        yield from map(_run_job, jobs)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(num_processes, len(jobs))) as pool:
        yield from pool.imap_unordered(_run_job, jobs)
