"""What the MIP trainer's loader carries: each ray's annotation and its brightest voxel.

Per case and MIP axis ``a``, ``data/mip_targets/{case}.npz`` stores two maps on the
preprocessed grid's projection plane (the two axes other than ``a``, in (z, y, x) order):

* ``annotation{a}`` uint8: the raw annotation PNG cropped to the preprocessing bbox and resampled
  in-plane to the preprocessed shape (indicator interpolated linearly, threshold 0.5, as labels);
* ``depth{a}`` int16: the index along ``a`` of each ray's brightest voxel of channel 0 of the
  WHOLE preprocessed image.

For a patch the loader expands them into two extra ``seg`` channels per axis
(:func:`ray_channels`): the annotation broadcast along every ray, and a depth *step*: 1 from each
ray's brightest voxel onwards along the axis, 0 before it, the ignore value outside the image.
Both go through the same spatial transforms as the labels (label-wise interpolation), so after
rotation about the projection axis, scaling or mirroring a column's annotation is any labelled
value along it, its depth is where the step switches (the first 1, or the last 1 when the ray was
mirrored), and "brightest voxel outside the patch" is "no switch in the column"
(:func:`mipseg.training.mip_losses.ray_targets`). A step rather than a one-voxel marker because
interpolating a rotated single voxel often erases it (measured: 18 % of the in-patch rays lost their
marker under forced rotation, scaling and mirroring, 1 % with the step); a step is a surface and survives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from skimage.transform import resize

from mipseg import io
from mipseg.annotation_png import read_annotation
from mipseg.errors import InputError

TARGETS_FOLDER = "mip_targets"


def plane_axes(axis: int) -> list[int]:
    """The two spatial axes of the projection plane along ``axis`` (rows first)."""
    return [d for d in range(3) if d != axis]


def annotation_on_preprocessed_plane(annotation: np.ndarray, axis: int, properties: dict) -> np.ndarray:
    """Map a raw-grid MIP annotation onto the preprocessed grid's projection plane.

    Parameters
    ----------
    annotation
        ``(rows, cols)`` raw annotation (nonzero = vessel) on the MIP along ``axis`` of the raw image.
    properties
        The case's preprocessing properties (``bbox``, ``shape_before_cropping``,
        ``shape_after_resampling``).

    Returns
    -------
    ``(rows', cols')`` uint8 in {0, 1} on the preprocessed plane.
    """
    plane = plane_axes(axis)
    expected = [properties["shape_before_cropping"][d] for d in plane]
    if list(annotation.shape) != expected:
        raise ValueError(f"annotation shape {list(annotation.shape)} != MIP shape {expected}")
    bbox = properties["bbox"]
    cropped = annotation[tuple(slice(bbox[d][0], bbox[d][1]) for d in plane)] > 0
    shape = [properties["shape_after_resampling"][d] for d in plane]
    if list(cropped.shape) == shape:
        return cropped.astype(np.uint8)
    resampled = resize(cropped.astype(np.float32), shape, order=1, mode="edge", anti_aliasing=False)
    return (resampled >= 0.5).astype(np.uint8)


def compute_mip_targets(
    image: np.ndarray, annotations: dict[int, np.ndarray], properties: dict
) -> dict[str, np.ndarray]:
    """``annotation{a}`` and ``depth{a}`` of one case (see the module docstring).

    Parameters
    ----------
    image
        ``(C, z, y, x)`` preprocessed image; channel 0 defines the brightest voxels.
    annotations
        ``{axis: raw (rows, cols) annotation}``.
    """
    targets = {}
    for axis, annotation in annotations.items():
        targets[f"annotation{axis}"] = annotation_on_preprocessed_plane(annotation, axis, properties)
        targets[f"depth{axis}"] = np.argmax(image[0], axis=axis).astype(np.int16)
        if targets[f"annotation{axis}"].shape != targets[f"depth{axis}"].shape:
            raise ValueError("annotation and depth planes differ; preprocessing properties are stale")
    return targets


def ensure_mip_targets(dataset, data_dir: Path, case_ids: Sequence[str], axes: Sequence[int]) -> Path:
    """Write ``data/mip_targets/{case}.npz`` where missing or older than its sources; returns the folder.

    Parameters
    ----------
    dataset
        The loaded :class:`mipseg.dataset.Dataset` (its cases' annotation PNGs are read).
    data_dir
        ``preprocessed/DatasetX/data``.
    """
    folder = data_dir / TARGETS_FOLDER
    cases = {c.case_id: c for c in dataset.cases}
    problems = []
    for case_id in case_ids:
        out = folder / f"{case_id}.npz"
        case = cases.get(case_id)
        missing = [a for a in axes if case is None or a not in case.annotations]
        if missing:
            problems.append(
                f"{dataset.folder / 'annotationsTr'}: case {case_id} has no annotation for axes {missing}"
            )
            continue
        sources = [data_dir / f"{case_id}.npy", *(case.annotations[a] for a in axes)]
        if out.is_file() and out.stat().st_mtime >= max(p.stat().st_mtime for p in sources):
            continue  # up to date with the preprocessed image and the annotations
        properties = io.read_json(data_dir / f"{case_id}.json")
        image = np.load(data_dir / f"{case_id}.npy", mmap_mode="r")
        annotations = {a: read_annotation(case.annotations[a], dataset.spec) for a in axes}
        try:
            targets = compute_mip_targets(np.asarray(image[:1]), annotations, properties)
        except ValueError as error:
            problems.append(f"{case.annotations[axes[0]]}: {error}")
            continue
        folder.mkdir(parents=True, exist_ok=True)
        with io.atomic_path(out) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **targets)
    if problems:
        raise InputError(problems)
    return folder


def attach_mip_targets(
    dataset_name: str, data_dir: Path, train_cases: list, val_cases: list, axes: Sequence[int]
) -> tuple[list, list]:
    """Make the cases' MIP targets (:func:`ensure_mip_targets`) and return the cases pointing at them.

    ``train_cases``/``val_cases`` are :class:`mipseg.training.data.TrainingCase` lists.
    """
    from mipseg.dataset import load_dataset

    case_ids = sorted({c.case_id for c in train_cases + val_cases})
    folder = ensure_mip_targets(load_dataset(dataset_name, read_voxels=False), data_dir, case_ids, axes)

    def attach(case):
        return dataclasses.replace(case, mip_targets=folder / f"{case.case_id}.npz")

    return [attach(c) for c in train_cases], [attach(c) for c in val_cases]


def _crop_plane(plane: np.ndarray, bbox_rows: Sequence[int], bbox_cols: Sequence[int], pad) -> np.ndarray:
    """``plane[r0:r1, c0:c1]`` with out-of-range positions filled with ``pad``."""
    out = np.full((bbox_rows[1] - bbox_rows[0], bbox_cols[1] - bbox_cols[0]), pad, dtype=np.int32)
    r0, r1 = max(bbox_rows[0], 0), min(bbox_rows[1], plane.shape[0])
    c0, c1 = max(bbox_cols[0], 0), min(bbox_cols[1], plane.shape[1])
    if r1 > r0 and c1 > c0:
        out[r0 - bbox_rows[0] : r1 - bbox_rows[0], c0 - bbox_cols[0] : c1 - bbox_cols[0]] = plane[
            r0:r1, c0:c1
        ]
    return out


def ray_channels(
    targets, axes: Sequence[int], bbox: Sequence[Sequence[int]], image_shape: Sequence[int], ignore_label: int
) -> np.ndarray:
    """The two ``seg`` channels per axis for one crop: annotation along rays, brightest-voxel marker.

    Parameters
    ----------
    targets
        Mapping with ``annotation{a}``/``depth{a}`` (an opened ``.npz``).
    bbox
        Half-open crop ``[[z0, z1], [y0, y1], [x0, x1]]`` in the preprocessed grid (may leave it).
    image_shape
        ``(z, y, x)`` of the preprocessed image.

    Returns
    -------
    ``(2 * len(axes), *crop)`` int16: per axis the annotation (0/1) on every voxel of its ray and
    the depth step (1 at and after the ray's brightest voxel along the axis, 0 before it);
    ``ignore_label`` outside the image.
    """
    crop = [int(b[1] - b[0]) for b in bbox]
    inside = np.ones(crop, dtype=bool)
    for d in range(3):
        coords = np.arange(bbox[d][0], bbox[d][1])
        valid = (coords >= 0) & (coords < image_shape[d])
        shape = [1, 1, 1]
        shape[d] = crop[d]
        inside &= valid.reshape(shape)
    channels = []
    for axis in axes:
        rows, cols = plane_axes(axis)
        annotation = _crop_plane(targets[f"annotation{axis}"], bbox[rows], bbox[cols], ignore_label)
        depth = _crop_plane(targets[f"depth{axis}"], bbox[rows], bbox[cols], -1)
        along = np.arange(bbox[axis][0], bbox[axis][1])
        ray_shape = [1, 1, 1]
        ray_shape[axis] = crop[axis]
        annotation_3d = np.broadcast_to(np.expand_dims(annotation, axis), crop)
        marker = (along.reshape(ray_shape) >= np.expand_dims(depth, axis)).astype(np.int16)
        channels.append(np.where(inside, annotation_3d, ignore_label).astype(np.int16))
        channels.append(np.where(inside, marker, ignore_label).astype(np.int16))
    return np.stack(channels)
