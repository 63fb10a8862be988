"""Preprocessing: crop to nonzero, normalize, resample, and the exact inverse for predictions.

The one raw <-> preprocessed grid mapping of mipseg: images and label maps forward
(:func:`preprocess_case`, :func:`preprocess_label`, :func:`preprocess_seeds`), probabilities back
(:func:`revert_preprocessing`, used by prediction and refinement).

The order is nnU-Net's ``DefaultPreprocessor.run_case_npy`` without its transpose (mipseg keeps
arrays ``(z, y, x)`` throughout): crop to the nonzero region -> normalize (before resampling, so
the mask is exact) -> resample to ``plans.spacing``. Per case the properties needed to map a
prediction back onto the raw grid are stored next to the array::

    preprocessed/DatasetX/data/{case}.npy        float32 (C, z, y, x)
    preprocessed/DatasetX/data/{case}.json       properties (bbox, shapes, raw geometry, spacings)
    preprocessed/DatasetX/data/labelsets/{name}/{case}.npy             int16 (1, z, y, x)
    preprocessed/DatasetX/data/labelsets/{name}/{case}_locations.npz   sampled voxels per class

Unlike nnU-Net, voxels inside the bounding box but outside the nonzero mask are NOT set to -1 in
label maps: label sets only hold dataset labels and the ignore value, so every loss can use them
as they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice, get_bbox_from_mask
from scipy.ndimage import binary_fill_holes

from mipseg import io, paths
from mipseg.errors import InputError
from mipseg.labelset import PREPROCESSED_SUFFIXES, LabelSet
from mipseg.planning.parallel import DEFAULT_NUM_PROCESSES, map_with_progress
from mipseg.planning.plans import Plans, load_plans
from mipseg.planning.resampling import compute_new_shape, resample_to_shape

if TYPE_CHECKING:
    from mipseg.dataset import Dataset

NUM_LOCATIONS_PER_CLASS = 10000  # nnU-Net's _sample_foreground_locations
MIN_LOCATION_COVERAGE = 0.01
LOCATION_SEED = 1234


def crop_to_nonzero(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """Crop ``(C, Z, Y, X)`` images to the bounding box of their nonzero region (nnU-Net's crop).

    Returns
    -------
    cropped : np.ndarray, shape (C, z, y, x)
    nonzero_mask : np.ndarray of bool, shape (z, y, x)
        OR over channels of ``image != 0``, holes filled, inside the box.
    bbox : list of 3 ``[start, stop)`` pairs in the raw ``(z, y, x)`` grid
        The whole image if it has no nonzero voxel.
    """
    mask = binary_fill_holes(np.any(images != 0, axis=0))
    bbox = get_bbox_from_mask(mask) if mask.any() else [[0, s] for s in mask.shape]
    bbox = [[int(a), int(b)] for a, b in bbox]
    region = bounding_box_to_slice(bbox)
    return images[(slice(None), *region)], mask[region], bbox


def normalize(images: np.ndarray, nonzero_mask: np.ndarray, plans: Plans) -> np.ndarray:
    """Normalize each channel of ``(C, z, y, x)`` images as planned (float32, new array).

    ``"CT"``: clip to the dataset foreground's 0.5/99.5 percentiles, z-score with its mean/std.
    ``"ZScore"``: z-score with this image's statistics; with ``use_mask_for_norm`` only inside
    the nonzero mask, and the outside is set to 0 (nnU-Net's ZScoreNormalization).
    """
    result = np.empty(images.shape, dtype=np.float32)
    for c, scheme in enumerate(plans.normalization):
        image = images[c].astype(np.float32, copy=True)
        if scheme == "CT":
            stats = plans.intensity_properties[str(c)]
            image = np.clip(image, stats["percentile_00_5"], stats["percentile_99_5"])
            image = (image - stats["mean"]) / max(stats["std"], 1e-8)
        elif plans.use_mask_for_norm[c] and nonzero_mask.any():
            values = image[nonzero_mask]
            image = np.where(nonzero_mask, (image - values.mean()) / max(values.std(), 1e-8), 0)
        else:
            image = (image - image.mean()) / max(image.std(), 1e-8)
        result[c] = image
    return result


def preprocess_case(
    images: np.ndarray,
    geometry: io.Geometry,
    plans: Plans,
    label: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Crop, normalize and resample one case to the planned spacing.

    Parameters
    ----------
    images : np.ndarray, shape (C, Z, Y, X)
        Raw channels in the raw grid.
    geometry : io.Geometry
        Geometry of the raw image (its spacing drives the resampling).
    plans : Plans
    label : np.ndarray, shape (Z, Y, X) or (1, Z, Y, X), optional
        Label map in the raw grid (dataset labels plus the ignore value).

    Returns
    -------
    data : np.ndarray float32, shape (C, z, y, x)
    seg : np.ndarray int16, shape (1, z, y, x), or None without ``label``
    properties : dict
        ``shape_before_cropping``, ``bbox``, ``shape_after_cropping``, ``shape_after_resampling``,
        ``geometry``, ``original_spacing``, ``spacing`` -- what :func:`revert_preprocessing` needs.
    """
    if images.ndim != 4:
        raise ValueError(f"expected (C, Z, Y, X) images, got shape {images.shape}")
    original_spacing = list(geometry.spacing_zyx)
    cropped, nonzero_mask, bbox = crop_to_nonzero(images)
    new_shape = compute_new_shape(cropped.shape[1:], original_spacing, plans.spacing)
    data = resample_to_shape(
        normalize(cropped, nonzero_mask, plans),
        new_shape,
        original_spacing,
        plans.spacing,
        is_seg=False,
        order=plans.resampling["data_order"],
        order_z=plans.resampling["data_order_z"],
        separate_z_threshold=plans.resampling["separate_z_anisotropy_threshold"],
    )
    properties = {
        "shape_before_cropping": list(images.shape[1:]),
        "bbox": bbox,
        "shape_after_cropping": list(cropped.shape[1:]),
        "shape_after_resampling": list(new_shape),
        "geometry": geometry.to_dict(),
        "original_spacing": original_spacing,
        "spacing": list(plans.spacing),
    }
    seg = None if label is None else preprocess_label(label, properties, plans)
    return data, seg, properties


def preprocess_label(label: np.ndarray, properties: dict[str, Any], plans: Plans) -> np.ndarray:
    """Crop and resample a raw-grid label map like its image was (``properties`` of that image).

    Returns
    -------
    np.ndarray int16, shape (1, z, y, x)
        Same grid as the preprocessed image; the ignore value is kept as its own label.
    """
    label = label[0] if label.ndim == 4 else label
    if list(label.shape) != list(properties["shape_before_cropping"]):
        raise ValueError(f"label shape {label.shape} != image shape {properties['shape_before_cropping']}")
    cropped = label[bounding_box_to_slice(properties["bbox"])].astype(np.int16)[None]
    return resample_to_shape(
        cropped,
        properties["shape_after_resampling"],
        properties["original_spacing"],
        plans.spacing,
        is_seg=True,
        order=plans.resampling["seg_order"],
        order_z=plans.resampling["seg_order_z"],
        separate_z_threshold=plans.resampling["separate_z_anisotropy_threshold"],
    ).astype(np.int16)


def revert_preprocessing(probabilities: np.ndarray, properties: dict[str, Any], plans: Plans) -> np.ndarray:
    """Map ``(K, z, y, x)`` class probabilities from the preprocessed grid back onto the raw grid.

    Resamples to the cropped raw shape (order ``probabilities_order``, separate-z rule), pastes
    into the bounding box, and gives every voxel outside the box background probability 1.

    Returns
    -------
    np.ndarray float32, shape (K, Z, Y, X)
        ``Z, Y, X = properties["shape_before_cropping"]``.
    """
    full = np.zeros((probabilities.shape[0], *properties["shape_before_cropping"]), dtype=np.float32)
    full[0] = 1.0
    box = bounding_box_to_slice(properties["bbox"])
    for k, resampled in enumerate(revert_class_probabilities(probabilities, properties, plans)):
        full[k][box] = resampled  # one class at a time: no (K, z, y, x) resampled copy besides ``full``
    return full


def revert_class_probabilities(
    probabilities: np.ndarray, properties: dict[str, Any], plans: Plans
) -> Iterator[np.ndarray]:
    """Like :func:`revert_preprocessing`, one class at a time and only inside the crop box.

    Resampling treats every channel on its own, so class ``k`` here is exactly
    ``revert_preprocessing(...)[k][bounding_box_to_slice(properties["bbox"])]``, while memory holds
    one class of the raw crop box instead of all ``K`` classes of the whole raw grid.

    Yields
    ------
    np.ndarray float32, shape ``properties["shape_after_cropping"]``
        Class ``k`` for ``k = 0 .. K-1``; may be a view of ``probabilities`` when no resampling
        is needed (do not modify it).
    """
    for k in range(probabilities.shape[0]):
        yield resample_to_shape(
            probabilities[k : k + 1],
            properties["shape_after_cropping"],
            plans.spacing,
            properties["original_spacing"],
            is_seg=False,
            order=plans.resampling["probabilities_order"],
            order_z=plans.resampling["probabilities_order_z"],
            separate_z_threshold=plans.resampling["separate_z_anisotropy_threshold"],
        )[0]


def preprocess_seeds(seeds: np.ndarray, properties: dict[str, Any], ignore_label: int) -> np.ndarray:
    """Map raw-grid seed voxels onto the preprocessed grid, point by point.

    Interpolating a map of isolated voxels would erase them when the grid gets coarser; instead
    each seed's coordinate is cropped (``properties["bbox"]``) and scaled to
    ``properties["shape_after_resampling"]``.

    Parameters
    ----------
    seeds
        Raw ``(Z, Y, X)``: a class label (> 0, != ``ignore_label``) at seed voxels, 0 or the
        ignore value elsewhere.
    properties
        The case's preprocessing properties (``data/{case}.json``).

    Returns
    -------
    ``(1, z, y, x)`` int16: the seed class at seed voxels, ``ignore_label`` elsewhere.
    """
    bbox = np.array(properties["bbox"])
    cropped_shape = bbox[:, 1] - bbox[:, 0]
    target_shape = np.array(properties["shape_after_resampling"])
    result = np.full((1, *target_shape), ignore_label, dtype=np.int16)
    coords = np.argwhere((seeds > 0) & (seeds != ignore_label))
    values = seeds[tuple(coords.T)]
    inside = np.all((coords >= bbox[:, 0]) & (coords < bbox[:, 1]), axis=1)
    coords, values = coords[inside] - bbox[:, 0], values[inside]
    mapped = np.floor((coords + 0.5) * target_shape / cropped_shape).astype(int)
    mapped = np.minimum(mapped, target_shape - 1)
    result[(0, *mapped.T)] = values
    return result


def sample_class_locations(
    seg: np.ndarray, foreground_labels: list[int], ignore_label: int | None, seed: int = LOCATION_SEED
) -> dict[str, np.ndarray]:
    """Up to 10000 voxels (at least 1 %) per foreground label, for foreground oversampling.

    Parameters
    ----------
    seg : np.ndarray, shape (1, z, y, x) or (z, y, x)

    Returns
    -------
    dict
        ``str(label) -> (N, 3) int32 (z, y, x)`` for each label present, plus ``"annotated"``
        (voxels that are not ``ignore_label``) when the ignore value occurs, as nnU-Net does.
    """
    seg = seg[0] if seg.ndim == 4 else seg
    rng = np.random.RandomState(seed)
    wanted = {str(v): seg == v for v in foreground_labels}
    if ignore_label is not None and np.any(seg == ignore_label):
        wanted["annotated"] = seg != ignore_label
    locations = {}
    for key, mask in wanted.items():
        coordinates = np.argwhere(mask)
        if len(coordinates) == 0:
            continue
        count = min(NUM_LOCATIONS_PER_CLASS, len(coordinates))
        count = max(count, int(np.ceil(len(coordinates) * MIN_LOCATION_COVERAGE)))
        chosen = rng.choice(len(coordinates), count, replace=False)
        locations[key] = coordinates[np.sort(chosen)].astype(np.int32)
    return locations


def data_dir(dataset: str | int) -> Path:
    """``preprocessed/DatasetX/data``."""
    return paths.preprocessed_dataset_dir(dataset) / "data"


def load_properties(dataset: str | int, case_id: str) -> dict[str, Any]:
    """Properties of one preprocessed case (``data/{case}.json``)."""
    return io.read_json(data_dir(dataset) / f"{case_id}.json")


def preprocess_dataset(dataset, plans: Plans, *, num_processes: int, resume: bool = False) -> list[str]:
    """Preprocess every training case of a loaded dataset into ``data/``; returns the case ids done.

    Parameters
    ----------
    dataset : mipseg.dataset.Dataset
    resume : bool
        Skip cases whose ``.npy`` and ``.json`` already exist (``--continue``).
    """
    out = paths.preprocessed_root() / dataset.name / "data"
    out.mkdir(parents=True, exist_ok=True)
    tasks = [
        ([str(p) for p in case.images], str(out / case.case_id), plans.to_json())
        for case in dataset.cases
        if not (resume and _case_done(out / case.case_id))
    ]
    case_ids = [Path(task[1]).name for task in tasks]  # {case}.npy and {case}.json
    io.remove_stale_partials(out, case_ids)  # left by a killed run
    map_with_progress(_preprocess_case_files, tasks, num_processes, "preprocessing")
    return case_ids


def _case_done(stem: Path) -> bool:
    return stem.with_suffix(".npy").is_file() and stem.with_suffix(".json").is_file()


def read_case_images(image_paths: list[str | Path]) -> tuple[np.ndarray, io.Geometry]:
    """All channels of one case as float32 ``(C, Z, Y, X)`` and the geometry of channel 0."""
    arrays, geometry = [], None
    for path in image_paths:
        array, channel_geometry = io.read_image(path, np.float32)
        geometry = geometry or channel_geometry
        arrays.append(array)
    return np.stack(arrays), geometry


def _preprocess_case_files(image_paths: list[str], stem: str, plans_json: dict[str, Any]) -> None:
    images, geometry = read_case_images(image_paths)
    data, _, properties = preprocess_case(images, geometry, Plans.from_json(plans_json))
    # the array first: a case counts as done only once its properties (written last) exist
    io.save_npy(data, stem + ".npy")
    io.write_json(properties, stem + ".json")


def labelset_sources(loaded: Dataset, name: str) -> dict[str, Path]:
    """Case id -> the raw-geometry label file of label set ``name``, for the cases that have one.

    ``labelsTr`` for ``"dense"``, else ``preprocessed/DatasetX/labelsets/{name}/{case}.nii.gz``: the
    cases a label set labels, which its preprocessed copy must hold (a killed copy may lack some).
    """
    labelset = LabelSet(loaded.name, name)
    sources = {}
    for case in loaded.cases:
        path = case.label if name == "dense" else labelset.label_file(case.case_id, loaded.spec.file_ending)
        if path is not None and Path(path).is_file():
            sources[case.case_id] = Path(path)
    return sources


def preprocess_labelset(dataset: str | int, name: str, *, num_processes: int = DEFAULT_NUM_PROCESSES) -> Path:
    """Bring label set ``name`` onto the preprocessed grid: ``data/labelsets/{name}/{case}.npy``.

    Source files: ``preprocessed/DatasetX/labelsets/{name}/{case}.nii.gz`` (raw geometry), or
    raw ``labelsTr`` when ``name == "dense"``. Cases without a label file are skipped. Needs the
    images preprocessed (``mipseg_plan``) because the crop box and shapes come from them.

    Returns
    -------
    Path
        The output folder ``data/labelsets/{name}``.

    Raises
    ------
    InputError
        No plans / preprocessed data, no label file at all, or labels with a wrong grid or values.
    """
    from mipseg.dataset import load_dataset

    loaded = load_dataset(dataset, read_voxels=False)
    plans = load_plans(paths.preprocessed_dataset_dir(dataset) / "plans.json")
    labelset = LabelSet(loaded.name, name)
    out = labelset.preprocessed_folder
    tasks, problems = [], []
    for case_id, label_path in labelset_sources(loaded, name).items():
        properties_path = data_dir(dataset) / f"{case_id}.json"
        if not properties_path.is_file():
            problems.append(f"{properties_path}: case not preprocessed; run mipseg_plan -d {dataset} first")
            continue
        tasks.append((str(label_path), str(properties_path), str(out / case_id), plans.to_json()))
    if not tasks and not problems:
        where = loaded.folder / "labelsTr" if name == "dense" else labelset.folder
        problems.append(f"{where}: no label files for label set {name!r}")
    if problems:
        raise InputError(problems)
    out.mkdir(parents=True, exist_ok=True)
    io.remove_stale_partials(  # left by a killed run
        out, [io.file_stem(path) for task in tasks for path in preprocessed_label_files(task[2])]
    )
    spec = loaded.spec
    allowed = sorted(set(spec.class_labels.values()) | {spec.ignore_label})
    results = map_with_progress(
        _preprocess_label_file,
        [(*task, spec.foreground_labels, spec.ignore_label, allowed) for task in tasks],
        num_processes,
        f"label set {name}",
    )
    problems = [p for result in results for p in result]
    if problems:
        raise InputError(problems)
    return out


def _preprocess_label_file(
    label_path: str,
    properties_path: str,
    stem: str,
    plans_json: dict[str, Any],
    foreground_labels: list[int],
    ignore_label: int,
    allowed: list[int],
) -> list[str]:
    """Preprocess one label file; returns its problems (empty when written)."""
    properties = io.read_json(properties_path)
    label, geometry = io.read_image(label_path)
    raw = io.Geometry.from_dict(properties["geometry"])
    if list(label.shape) != list(properties["shape_before_cropping"]) or not geometry.matches(raw):
        return [
            f"{label_path}: grid {list(label.shape)} spacing {list(geometry.spacing_zyx)} differs from its "
            f"image {properties['shape_before_cropping']} spacing {properties['original_spacing']}"
        ]
    unknown = sorted(set(np.unique(label).tolist()) - set(allowed))
    if unknown:
        return [
            f"{label_path}: values {unknown} are neither dataset labels nor the ignore value {ignore_label}"
        ]
    seg = preprocess_label(label, properties, Plans.from_json(plans_json))
    locations = sample_class_locations(seg, foreground_labels, ignore_label)
    seg_path, locations_path = preprocessed_label_files(stem)
    with io.atomic_path(locations_path) as tmp:
        np.savez(tmp, **locations)
    io.save_npy(seg, seg_path)
    return []


def preprocessed_label_files(stem: str | Path) -> tuple[Path, Path]:
    """A case's preprocessed label map ``{stem}.npy`` and its class locations ``{stem}_locations.npz``."""
    return tuple(Path(f"{stem}{PREPROCESSED_SUFFIXES[kind]}") for kind in ("label", "locations"))
