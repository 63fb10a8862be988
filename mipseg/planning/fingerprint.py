"""Dataset fingerprint: spacings, shapes before/after cropping, foreground intensity statistics.

nnU-Net samples intensities from the dense foreground (``seg > 0``). A weakly annotated dataset
has no dense labels (and must be planned before anything is annotated), so the foreground is
chosen honestly and recorded in ``fingerprint.json["foreground"]``:

``"labels"``       dense labels (labelsTr), only for datasets without an annotation mode (nnU-Net's rule);
``"annotations"``  the annotated seed voxels: for a MIP drawing the brightest voxel of every annotated
                   ray (the MIP depth map), for a slice drawing its annotated pixels -- used once every
                   training case is annotated;
``"nonzero"``      the body: the nonzero region after crop-to-nonzero (holes filled) -- before annotation.

Dense labels of a weakly annotated dataset are evaluation truth and are never used here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice

from mipseg import io
from mipseg.annotation_png import read_annotation_values
from mipseg.planning.mip import maximum_intensity_projection, ray_coordinates
from mipseg.planning.parallel import map_with_progress
from mipseg.planning.preprocessing import crop_to_nonzero, read_case_images

# nnU-Net pools 1e8 foreground samples over the dataset; 1e7 keeps memory small on shared
# machines while its percentiles agree with nnU-Net's to sampling noise.
NUM_INTENSITY_SAMPLES = 10_000_000
SAMPLING_SEED = 1234
FOREGROUND_SOURCES = ("auto", "labels", "annotations", "nonzero")


def choose_foreground(dataset, requested: str = "auto") -> str:
    """Which foreground the intensity statistics come from (see module docstring)."""
    if requested != "auto":
        return requested
    if dataset.spec.annotation is None and dataset.has_dense_labels:
        return "labels"
    if dataset.spec.annotation is not None and dataset.cases and all(c.annotations for c in dataset.cases):
        return "annotations"
    return "nonzero"


def intensity_statistics(values: np.ndarray) -> dict[str, float]:
    """nnU-Net's per-channel statistics of a 1D sample of intensities."""
    if values.size == 0:
        return {
            k: float("nan")
            for k in ("mean", "median", "std", "min", "max", "percentile_99_5", "percentile_00_5")
        }
    p005, median, p995 = np.percentile(values, [0.5, 50.0, 99.5])
    return {
        "mean": float(np.mean(values)),
        "median": float(median),
        "std": float(np.std(values)),
        "min": float(np.min(values)),
        "max": float(np.max(values)),
        "percentile_99_5": float(p995),
        "percentile_00_5": float(p005),
    }


def extract_fingerprint(dataset, *, num_processes: int, foreground: str = "auto") -> dict[str, Any]:
    """Fingerprint of every training case of a loaded :class:`mipseg.dataset.Dataset`.

    Returns
    -------
    dict
        ``cases``, ``spacings`` and ``shapes_before_crop`` / ``shapes_after_crop`` (per case,
        ``(z, y, x)``), ``median_relative_size_after_cropping``, ``foreground`` (the source used),
        ``foreground_intensity_properties_per_channel`` (dataset level, pooled samples) and
        ``intensity_properties_per_case``.
    """
    source = choose_foreground(dataset, foreground)
    samples_per_case = int(NUM_INTENSITY_SAMPLES // max(1, len(dataset.cases)))
    tasks = [
        (
            [str(p) for p in case.images],
            str(case.label) if case.label is not None else None,
            {int(k): str(v) for k, v in case.annotations.items()},
            dataset.spec.annotation,
            source,
            samples_per_case,
        )
        for case in dataset.cases
    ]
    per_case = map_with_progress(_analyze_case, tasks, num_processes, "fingerprint")
    num_channels = dataset.spec.num_channels
    pooled = {
        str(c): intensity_statistics(np.concatenate([r["samples"][c] for r in per_case]))
        for c in range(num_channels)
    }
    return {
        "cases": dataset.case_ids,
        "foreground": source,
        "foreground_per_case": [r["foreground"] for r in per_case],
        "spacings": [r["spacing"] for r in per_case],
        "shapes_before_crop": [r["shape_before_crop"] for r in per_case],
        "shapes_after_crop": [r["shape_after_crop"] for r in per_case],
        "median_relative_size_after_cropping": float(np.median([r["relative_size"] for r in per_case])),
        "foreground_intensity_properties_per_channel": pooled,
        "intensity_properties_per_case": [r["statistics"] for r in per_case],
    }


def annotation_seed_mask(
    volume: np.ndarray, annotations: dict[int, str], annotation_mode: str | None
) -> np.ndarray:
    """Raw-grid boolean mask of the voxels the annotator marked (see module docstring).

    Parameters
    ----------
    volume : np.ndarray, shape (Z, Y, X)
        Channel 0 of the raw image (the one the MIPs are drawn on).
    annotations : dict
        MIP axis (mip mode) or slice index (slice mode) -> PNG path.
    """
    mask = np.zeros(volume.shape, dtype=bool)
    for key, png in annotations.items():
        drawn = read_annotation_values(png) != 0
        if annotation_mode == "mip":
            _, depth = maximum_intensity_projection(volume, key)
            coordinates = ray_coordinates(depth, key)
            mask[tuple(c[drawn] for c in coordinates)] = True
        else:
            mask[key][drawn] = True
    return mask


def _analyze_case(
    image_paths: list[str],
    label_path: str | None,
    annotations: dict[int, str],
    annotation_mode: str | None,
    source: str,
    num_samples: int,
) -> dict[str, Any]:
    images, geometry = read_case_images(image_paths)
    cropped, nonzero, bbox = crop_to_nonzero(images)
    region = bounding_box_to_slice(bbox)
    used = source
    if source == "labels" and label_path is not None:
        foreground = io.read_image(label_path)[0][region] > 0
    elif source == "annotations" and annotations:
        foreground = annotation_seed_mask(images[0], annotations, annotation_mode)[region]
    else:
        foreground, used = nonzero, "nonzero"
    if not foreground.any():
        foreground, used = nonzero if nonzero.any() else np.ones_like(nonzero), "nonzero"
    rng = np.random.RandomState(SAMPLING_SEED)
    samples, statistics = [], []
    for channel in cropped:
        values = channel[foreground]
        samples.append(rng.choice(values, num_samples, replace=True).astype(np.float32))
        statistics.append(intensity_statistics(values))
    return {
        "spacing": [float(s) for s in geometry.spacing_zyx],
        "shape_before_crop": list(images.shape[1:]),
        "shape_after_crop": list(cropped.shape[1:]),
        "relative_size": float(np.prod(cropped.shape[1:]) / np.prod(images.shape[1:])),
        "foreground": used,
        "samples": samples,
        "statistics": statistics,
    }
