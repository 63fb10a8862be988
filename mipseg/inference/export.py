"""Probabilities on the raw grid -> segmentation files: argmax, postprocessing, atomic writes.

Every file is written to a temporary name and renamed, so an interrupted prediction never leaves
a half-written ``{case}.nii.gz`` or ``{case}.npz``. The probabilities file is written *before* the
segmentation, so an existing segmentation means the case is complete (what ``--continue`` checks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice
from acvl_utils.morphology.morphology_helper import cc3d_label_with_component_sizes

from mipseg import io, paths
from mipseg.errors import InputError
from mipseg.inference.postprocessing import apply_rules
from mipseg.labelset import SEEDS_PATTERN, LabelSet
from mipseg.metrics import dice_from_counts
from mipseg.planning.plans import Plans
from mipseg.planning.preprocessing import revert_class_probabilities

SEGMENTATION_ENDING = ".nii.gz"
COMPONENT_CONNECTIVITY = 26  # full 3D connectivity, as nnU-Net's postprocessing (skimage label default)
CANDIDATE_MIN_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)  # 1 = keep everything


def class_values(labels: Mapping[str, int]) -> np.ndarray:
    """Label value of each network output channel: the dataset labels without ``ignore``, sorted."""
    return np.array(sorted(v for k, v in labels.items() if k != "ignore"), dtype=np.int64)


def probabilities_to_segmentation(probabilities: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Argmax over classes, mapped to label values.

    Parameters
    ----------
    probabilities : np.ndarray, shape (K, Z, Y, X)
    values : np.ndarray of int, shape (K,)
        Label value of each channel (see :func:`class_values`).

    Returns
    -------
    np.ndarray uint8 (int16 if a value exceeds 255), shape (Z, Y, X)
    """
    dtype = np.uint8 if values.max() <= 255 else np.int16
    return values.astype(dtype)[np.argmax(probabilities, axis=0)]


def segmentation_on_raw_grid(
    probabilities: np.ndarray,
    properties: dict,
    plans: Plans,
    values: np.ndarray,
    keep_probabilities: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Argmax label map on the raw grid from preprocessed-grid probabilities, one class at a time.

    The same result as ``probabilities_to_segmentation(revert_preprocessing(...), values)``
    (``np.argmax``'s first-maximum rule included) without the ``(K, Z, Y, X)`` float32 array: a
    running maximum and its class index over the classes resampled one by one into the crop box;
    outside the box background wins, as there its probability is 1.

    Parameters
    ----------
    probabilities : np.ndarray float32, shape (K, z, y, x)
        On the preprocessed grid.
    values : np.ndarray of int, shape (K,)
        Label value of each channel (see :func:`class_values`).
    keep_probabilities
        Also return the raw-grid probabilities as float16 ``(K, Z, Y, X)`` (for ``.npz``).

    Returns
    -------
    segmentation : np.ndarray uint8 (int16 if a value exceeds 255), shape (Z, Y, X)
    probabilities : np.ndarray float16, shape (K, Z, Y, X), or None
    """
    shape = tuple(properties["shape_before_cropping"])
    box = bounding_box_to_slice(properties["bbox"])
    kept = None
    if keep_probabilities:
        kept = np.zeros((len(values), *shape), dtype=np.float16)
        kept[0] = 1
    best, index = None, None
    for k, resampled in enumerate(revert_class_probabilities(probabilities, properties, plans)):
        if kept is not None:
            kept[k][box] = resampled
        if best is None:
            best = np.array(resampled, dtype=np.float32)  # a copy: ``resampled`` may be a view
            index = np.zeros(best.shape, dtype=np.uint8 if len(values) <= 256 else np.int16)
            continue
        better = resampled > best  # strict: ties keep the earlier class, as np.argmax
        index[better] = k
        np.maximum(best, resampled, out=best)
    dtype = np.uint8 if values.max() <= 255 else np.int16
    segmentation = np.full(shape, values[0], dtype=dtype)
    segmentation[box] = values.astype(dtype)[index]
    return segmentation, kept


def remove_small_components(
    segmentation: np.ndarray, min_size: int, connectivity: int = COMPONENT_CONNECTIVITY
) -> np.ndarray:
    """Set to background every connected component of each foreground label smaller than ``min_size`` voxels.

    Parameters
    ----------
    segmentation : np.ndarray of int, shape (Z, Y, X)
    min_size
        Components with fewer voxels are removed; ``<= 1`` keeps everything.
    connectivity
        cc3d connectivity (6, 18 or 26).

    Returns
    -------
    np.ndarray, same shape and dtype (a new array)
    """
    result = segmentation.copy()
    if min_size <= 1:
        return result
    for value in np.unique(segmentation):
        if value == 0:
            continue
        components, sizes = cc3d_label_with_component_sizes(segmentation == value, connectivity=connectivity)
        small = np.array([i for i, size in sizes.items() if size < min_size], dtype=components.dtype)
        if small.size:
            result[np.isin(components, small)] = 0
    return result


def smallest_component_size(label_maps: Sequence[np.ndarray], ignore_label: int | None) -> int | None:
    """Smallest connected component of any foreground label over some label maps (ignore excluded).

    Returns ``None`` when the maps hold no foreground.
    """
    smallest = None
    for label_map in label_maps:
        for value in np.unique(label_map):
            if value == 0 or value == ignore_label:
                continue
            _, sizes = cc3d_label_with_component_sizes(
                label_map == value, connectivity=COMPONENT_CONNECTIVITY
            )
            if sizes:
                size = int(min(sizes.values()))
                smallest = size if smallest is None else min(smallest, size)
    return smallest


def component_counts(prediction: np.ndarray, reference: np.ndarray, known: np.ndarray) -> tuple:
    """Per predicted component (26-connected): size, true-positive and false-positive voxels.

    Returns ``(sizes, tp, fp, fn_outside)``: arrays indexed by component id (0 = background,
    unused) and the reference voxels no component covers. Ignored voxels count for nothing.
    """
    components, _ = cc3d_label_with_component_sizes(prediction, connectivity=COMPONENT_CONNECTIVITY)
    n = int(components.max()) + 1
    sizes = np.bincount(components.ravel(), minlength=n)
    tp = np.bincount(components[known & reference], minlength=n)
    fp = np.bincount(components[known & ~reference], minlength=n)
    fn_outside = int(np.count_nonzero(known & reference & ~prediction))
    return sizes, tp, fp, fn_outside


def min_size_from_validation(
    cases: Sequence[tuple[np.ndarray, np.ndarray]],
    ignore_label: int | None,
    candidates: Sequence[int] = CANDIDATE_MIN_SIZES,
) -> tuple[int, dict[int, float]]:
    """The minimum component size that maximizes Dice on out-of-fold predictions.

    Parameters
    ----------
    cases
        ``(segmentation, reference)`` label maps of the same ``(z, y, x)`` grid per case.
    ignore_label
        Reference value excluded from the counts.
    candidates
        Sizes to try, ascending; ``1`` (remove nothing) should be first so that ties keep
        the prediction unchanged.

    Returns
    -------
    best : int
        First candidate with the highest Dice, averaged over foreground labels, each label's
        Dice computed from TP/FP/FN summed over all cases.
    dice : dict
        Candidate -> that mean Dice.
    """
    candidates = np.asarray(sorted(candidates))
    counts: dict[int, np.ndarray] = {}  # label -> (tp, fp, fn) per candidate
    for segmentation, reference in cases:
        known = reference != ignore_label if ignore_label is not None else np.ones(reference.shape, bool)
        values = set(np.unique(reference[known]).tolist()) | set(np.unique(segmentation).tolist())
        for value in sorted(values - {0, ignore_label}):
            sizes, tp, fp, fn_outside = component_counts(segmentation == value, reference == value, known)
            removed = sizes[None, 1:] < candidates[:, None]  # (candidates, components)
            tp_left = tp[1:].sum() - (removed * tp[None, 1:]).sum(1)
            fp_left = fp[1:].sum() - (removed * fp[None, 1:]).sum(1)
            fn = fn_outside + tp[1:].sum() - tp_left
            counts[value] = counts.get(value, 0) + np.stack([tp_left, fp_left, fn])
    if not counts:
        return int(candidates[0]), {int(c): float("nan") for c in candidates}
    # A label empty on both sides at some candidate counts 0 (not NaN): the mean over labels must
    # stay defined for every candidate to rank them.
    dice_per_label = [np.nan_to_num(dice_from_counts(tp, fp, fn), nan=0.0) for tp, fp, fn in counts.values()]
    mean_dice = np.mean(dice_per_label, axis=0)
    return int(candidates[int(np.argmax(mean_dice))]), {
        int(c): float(d) for c, d in zip(candidates, mean_dice)
    }


def _validation_cases(
    model_dir: Path, dataset: str | int, labelset: str, labels: Mapping[str, int]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Argmax of every ``fold_*/validation/{case}.npz`` with its preprocessed label-set reference."""
    reference = LabelSet.of(dataset, labelset)
    cases = []
    for npz_path in sorted(model_dir.glob("fold_*/validation/*.npz")):
        reference_path = reference.preprocessed_file(npz_path.stem)
        if not reference_path.is_file():
            continue
        with np.load(npz_path) as npz:
            segmentation = probabilities_to_segmentation(npz["probabilities"], class_values(labels))
        reference = np.load(reference_path)[0]
        if reference.shape == segmentation.shape:
            cases.append((segmentation, reference))
    return cases


def learned_min_component_size(
    model_dir: Path, dataset: str | int, labelset: str, plans: Plans, ignore_label: int
) -> int:
    """Minimum component size (voxels of the output grid) for ``--postprocess`` when none is given.

    1. ``model_dir/postprocessing.json`` key ``min_component_size``, if already learned;
    2. else learned from the out-of-fold predictions ``fold_*/validation/*.npz`` against the
       preprocessed label set: the candidate size (:data:`CANDIDATE_MIN_SIZES`, preprocessed
       voxels) with the best Dice, as nnU-Net picks its postprocessing from cross-validation;
       converted to raw voxels with the ratio of voxel volumes (planned / median original
       spacing) and cached in ``postprocessing.json``;
    3. else the smallest foreground component in the label maps the model was trained on
       (``preprocessed/.../labelsets/{labelset}/{case}.nii.gz``, not its seed maps, or ``labelsTr``
       for ``dense``): a
       predicted component smaller than anything the model ever saw as a structure is noise.

    Raises
    ------
    InputError
        If no source exists (pass ``--min-component-size``).
    """
    stored = model_dir / "postprocessing.json"
    if stored.is_file():
        value = io.read_json(stored).get("min_component_size")
        if value is not None:
            return int(value)
    validation = _validation_cases(model_dir, dataset, labelset, plans.labels)
    if validation:
        best, dice = min_size_from_validation(validation, ignore_label)
        ratio = float(np.prod(plans.spacing) / np.prod(plans.original_median_spacing))
        size = max(1, int(round(best * ratio)))
        record = {
            "min_component_size": size,
            "min_component_size_preprocessed": best,
            "dice_by_size_preprocessed": dice,
            "num_validation_cases": len(validation),
            "source": "out-of-fold validation predictions vs label set " + labelset,
        }
        with contextlib.suppress(OSError):  # a read-only model folder: learn again next time
            io.write_json(record, stored)
        return size
    folder = (
        paths.raw_dataset_dir(dataset) / "labelsTr"
        if labelset == "dense"
        else LabelSet.of(dataset, labelset).folder
    )
    found = folder.glob(f"*{SEGMENTATION_ENDING}") if folder.is_dir() else []
    seeds = SEEDS_PATTERN.format(case="")  # a label set's seed maps are no label maps
    # nor is a hidden file (a killed writer's temporary)
    files = sorted(p for p in found if not p.name.startswith(".") and not p.name.endswith(seeds))
    smallest = smallest_component_size((io.read_image(f)[0] for f in files), ignore_label) if files else None
    if smallest is None:
        raise InputError(
            f"--postprocess: cannot learn a minimum component size (no {stored}, no validation "
            f"predictions, no foreground in {folder}); pass --min-component-size N"
        )
    return smallest


def segmentation_path(output_dir: Path, case_id: str) -> Path:
    return output_dir / f"{case_id}{SEGMENTATION_ENDING}"


def probabilities_path(output_dir: Path, case_id: str) -> Path:
    return output_dir / f"{case_id}.npz"


def write_probabilities(probabilities: np.ndarray, path: Path) -> Path:
    """``np.savez_compressed`` with key ``probabilities`` (float16 ``(K, Z, Y, X)``), atomically."""
    with io.atomic_path(path) as tmp:
        with open(tmp, "wb") as stream:
            np.savez_compressed(stream, probabilities=probabilities.astype(np.float16, copy=False))
    return path


def export_case(
    probabilities: np.ndarray,
    properties: dict,
    plans: Plans,
    output_dir: Path,
    case_id: str,
    *,
    labels: Mapping[str, int],
    save_probabilities: bool = False,
    min_component_size: int | None = None,
    rules: Mapping[str, Mapping] | None = None,
) -> Path:
    """Map preprocessed-grid probabilities back to the raw grid and write the case's files.

    Parameters
    ----------
    probabilities : np.ndarray float32, shape (K, z, y, x)
        Ensemble probabilities on the preprocessed grid.
    properties
        From :func:`mipseg.planning.preprocessing.preprocess_case`; its ``geometry`` (of the
        channel-0 image) is copied onto the output exactly.
    labels
        dataset.json labels (channel -> label value mapping).
    save_probabilities
        Also write ``{case}.npz`` (raw-grid probabilities, float16).
    min_component_size
        If given, remove smaller components of each foreground label.
    rules
        Per-class component rules decided by ``mipseg_find_best_configuration``
        (:func:`mipseg.inference.postprocessing.apply_rules`), applied before ``min_component_size``.

    Returns
    -------
    Path of ``{case}.nii.gz``.
    """
    # streamed class by class: the (K, Z, Y, X) float32 raw-grid array never exists
    segmentation, raw = segmentation_on_raw_grid(
        probabilities, properties, plans, class_values(labels), keep_probabilities=save_probabilities
    )
    if raw is not None:
        write_probabilities(raw, probabilities_path(output_dir, case_id))
        del raw
    if rules:
        segmentation = apply_rules(segmentation, rules)
    if min_component_size is not None:
        segmentation = remove_small_components(segmentation, min_component_size)
    geometry = io.Geometry.from_dict(properties["geometry"])
    return io.write_image(segmentation, geometry, segmentation_path(output_dir, case_id))
