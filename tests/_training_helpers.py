"""Tiny plans and preprocessed arrays for the training tests (no planner needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mipseg import io
from mipseg.planning.plans import NetworkTopology, Plans


def tiny_plans(
    *,
    patch_size: tuple[int, int, int] = (16, 32, 32),
    features: tuple[int, ...] = (4, 8, 16),
    batch_size: int = 2,
    labels: dict[str, int] | None = None,
    mip_axes: list[int] | None = None,
) -> Plans:
    """Plans of a 3-stage U-Net for a tiny patch; strides 2 everywhere (divisibility 4)."""
    labels = labels or {"background": 0, "vessel": 1, "ignore": 2}
    n = len(features)
    return Plans(
        dataset_name="Dataset990_Tiny",
        spacing=[1.0, 1.0, 1.0],
        original_median_spacing=[1.0, 1.0, 1.0],
        median_shape=[24, 40, 40],
        patch_size=list(patch_size),
        batch_size=batch_size,
        network=NetworkTopology(
            features_per_stage=list(features),
            kernel_sizes=[[3, 3, 3]] * n,
            strides=[[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
        ),
        normalization=["ZScore"],
        use_mask_for_norm=[False],
        intensity_properties={},
        resampling={},
        labels=labels,
        ignore_label=labels.get("ignore", max(labels.values()) + 1),
        annotation="mip" if mip_axes else None,
        mip_axes=list(mip_axes or []),
    )


def tube_volume(shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A bright tube along z at a random (y, x), in noise: image float32 and dense label uint8."""
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    cy, cx = rng.integers(10, shape[1] - 10), rng.integers(10, shape[2] - 10)
    radius = 2.5
    label = ((y - cy - 4 * np.sin(z / 6)) ** 2 + (x - cx) ** 2 <= radius**2).astype(np.uint8)
    image = (label * 2.0 + rng.normal(0, 0.5, shape)).astype(np.float32)
    return image, label


def partial_labels(label: np.ndarray, ignore: int, rng: np.random.Generator) -> np.ndarray:
    """Keep ~30 % of the foreground and ~40 % of the background; the rest -> ignore (int16)."""
    partial = np.full(label.shape, ignore, dtype=np.int16)
    keep = rng.random(label.shape)
    partial[(label == 1) & (keep < 0.3)] = 1
    partial[(label == 0) & (keep < 0.4)] = 0
    return partial


def write_tiny_dataset(
    roots: dict[str, Path],
    *,
    num_cases: int = 4,
    shape: tuple[int, int, int] = (16, 40, 40),
    seeds: bool = False,
    plans: Plans | None = None,
) -> str:
    """Raw + preprocessed tiny vessel dataset as mipseg_plan/pseudolabel would leave it.

    Preprocessing is the identity (spacing 1, no crop), so arrays are written directly:
    ``data/{case}.npy/.json``, ``data/labelsets/{pseudo,dense}/{case}.npy``, ``splits.json``
    (fold 0: last case validates) and ``plans.json``. Returns the dataset name.
    """
    name = "Dataset990_Tiny"
    rng = np.random.default_rng(0)
    raw = roots["raw"] / name
    pre = roots["preprocessed"] / name
    labels = {"background": 0, "vessel": 1, "ignore": 2}
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    io.write_json(
        {
            "channel_names": {"0": "MRA"},
            "labels": labels,
            "numTraining": num_cases,
            "file_ending": ".nii.gz",
            "annotation": "mip",
            "mip_axes": [0],
        },
        raw / "dataset.json",
    )
    geometry = io.Geometry.identity()
    cases = [f"case_{i:03d}" for i in range(num_cases)]
    for case in cases:
        image, label = tube_volume(shape, rng)
        io.write_image(image, geometry, raw / "imagesTr" / f"{case}_0000.nii.gz")
        io.write_image(label, geometry, raw / "labelsTr" / f"{case}.nii.gz")
        partial = partial_labels(label, 2, rng)
        io.write_image(partial, geometry, pre / "labelsets" / "pseudo" / f"{case}.nii.gz")
        normalized = ((image - image.mean()) / image.std()).astype(np.float32)[None]
        io.save_npy(normalized, pre / "data" / f"{case}.npy")
        io.write_json(
            {
                "shape_before_cropping": list(shape),
                "bbox": [[0, s] for s in shape],
                "shape_after_cropping": list(shape),
                "shape_after_resampling": list(shape),
                "geometry": geometry.to_dict(),
                "original_spacing": [1.0, 1.0, 1.0],
            },
            pre / "data" / f"{case}.json",
        )
        io.save_npy(partial[None], pre / "data" / "labelsets" / "pseudo" / f"{case}.npy")
        io.save_npy(label.astype(np.int16)[None], pre / "data" / "labelsets" / "dense" / f"{case}.npy")
        if seeds:
            seed_map = np.zeros(shape, dtype=np.uint8)
            coords = np.argwhere(label == 1)
            chosen = coords[rng.choice(len(coords), 5, replace=False)]
            seed_map[tuple(chosen.T)] = 1
            io.write_image(seed_map, geometry, pre / "labelsets" / "pseudo" / f"{case}_seeds.nii.gz")
    io.write_json([{"train": cases[:-1], "val": cases[-1:]}] * 5, pre / "splits.json")
    (plans or tiny_plans(patch_size=(16, 32, 32))).save(pre / "plans.json")
    return name
