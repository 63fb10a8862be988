"""Final validation of a fold: sliding-window softmax on whole preprocessed cases, out-of-fold export.

A minimal nnU-Net-style sliding window (tile step 0.5, Gaussian importance weighting with
sigma = patch/8, no mirroring); the prediction stage has the full predictor.

``fold_k/validation/{case}.npz`` (read by mipseg_refine) holds

* ``probabilities``: float16 ``(K, z, y, x)`` softmax in the *preprocessed* grid
  (``preprocessed/DatasetX/data/{case}.npy``'s spatial shape), class order = dataset labels;
* ``properties``: the JSON text of ``data/{case}.json`` (bbox, shapes, geometry) so that
  ``mipseg.planning.preprocessing.revert_preprocessing`` can bring it back to the raw grid.

``validation/summary.json`` holds per-case Dice of the argmax against the label set (labelled
voxels only) and, reported only, against dense truth when it exists.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from scipy.ndimage import gaussian_filter
from torch import nn

from mipseg import io


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 1 / 8) -> np.ndarray:
    """nnU-Net's Gaussian weighting of a patch: peak 1 at the centre, no zeros."""
    impulse = np.zeros(patch_size, dtype=np.float32)
    impulse[tuple(p // 2 for p in patch_size)] = 1
    weights = gaussian_filter(impulse, [p * sigma_scale for p in patch_size], mode="constant", cval=0)
    weights /= weights.max()
    weights[weights == 0] = weights[weights > 0].min()
    return weights


def window_starts(image_size: int, patch: int, step: float = 0.5) -> list[int]:
    """Evenly spaced window starts covering ``image_size`` (``image_size >= patch``)."""
    if image_size <= patch:
        return [0]
    count = int(np.ceil((image_size - patch) / (patch * step))) + 1
    return [int(round(s)) for s in np.linspace(0, image_size - patch, count)]


@torch.no_grad()
def sliding_window_probabilities(
    network: nn.Module,
    image: np.ndarray,
    patch_size: Sequence[int],
    device: torch.device,
    *,
    step: float = 0.5,
) -> np.ndarray:
    """Softmax probabilities of a whole case.

    Parameters
    ----------
    network
        Returns ``(1, K, *patch)`` logits (or a list, highest resolution first).
    image
        ``(C, z, y, x)`` float32 preprocessed case.

    Returns
    -------
    ``(K, z, y, x)`` float32, summing to 1 over K.
    """
    network.eval()
    padded, slicer = pad_nd_image(image, list(patch_size), "constant", {"constant_values": 0}, True)
    shape = padded.shape[1:]
    weights = torch.from_numpy(gaussian_importance_map(patch_size)).to(device)
    accumulated = None
    weight_sum = torch.zeros(shape, device=device)
    starts = [window_starts(s, p, step) for s, p in zip(shape, patch_size)]
    for start in itertools.product(*starts):
        window = tuple(slice(s, s + p) for s, p in zip(start, patch_size))
        tile = torch.from_numpy(np.ascontiguousarray(padded[(slice(None), *window)]))[None].to(device)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            logits = network(tile)
        logits = (logits[0] if isinstance(logits, list | tuple) else logits)[0].float()
        if accumulated is None:
            accumulated = torch.zeros((logits.shape[0], *shape), device=device)
        accumulated[(slice(None), *window)] += torch.softmax(logits, 0) * weights
        weight_sum[window] += weights
    probabilities = (accumulated / weight_sum).cpu().numpy()
    return probabilities[(slice(None), *slicer[1:])]


def dice_per_class(prediction: np.ndarray, reference: np.ndarray, classes: Sequence[int], ignore_label: int):
    """Dice per foreground class over voxels where ``reference != ignore_label`` (NaN if empty)."""
    labelled = reference != ignore_label
    result = {}
    for c in classes:
        p, r = (prediction == c) & labelled, (reference == c) & labelled
        denominator = p.sum() + r.sum()
        result[str(c)] = float(2 * (p & r).sum() / denominator) if denominator else float("nan")
    return result


def export_validation(
    network: nn.Module,
    cases: Sequence[str],
    *,
    data_dir: Path,
    labelset_dir: Path,
    dense_dir: Path | None,
    output_dir: Path,
    patch_size: Sequence[int],
    device: torch.device,
    foreground_labels: Sequence[int],
    ignore_label: int,
    progress: Any = None,
) -> dict[str, Any]:
    """Predict every validation case, save its probabilities, and summarise Dice.

    Parameters
    ----------
    data_dir, labelset_dir
        ``preprocessed/DatasetX/data`` and its ``labelsets/{name}`` folder.
    dense_dir
        Preprocessed dense truth (``data/labelsets/dense``) or None; reported only.
    progress
        Optional callable ``progress(case_id)`` called after each case.

    Returns
    -------
    The summary dict also written to ``output_dir/summary.json``.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    per_case = {}
    for case_id in cases:
        image = np.load(data_dir / f"{case_id}.npy")
        probabilities = sliding_window_probabilities(network, image, patch_size, device)
        properties = (
            (data_dir / f"{case_id}.json").read_text() if (data_dir / f"{case_id}.json").is_file() else "{}"
        )
        with io.atomic_path(output_dir / f"{case_id}.npz") as tmp:
            with open(tmp, "wb") as handle:
                np.savez_compressed(
                    handle, probabilities=probabilities.astype(np.float16), properties=properties
                )
        prediction = probabilities.argmax(0)
        entry = {
            "labelset_dice": dice_per_class(
                prediction, np.load(labelset_dir / f"{case_id}.npy")[0], foreground_labels, ignore_label
            )
        }
        if dense_dir is not None and (dense_dir / f"{case_id}.npy").is_file():
            truth = np.load(dense_dir / f"{case_id}.npy")[0]
            entry["dense_dice"] = dice_per_class(prediction, truth, foreground_labels, ignore_label)
        per_case[case_id] = entry
        if progress is not None:
            progress(case_id)
    summary = {"cases": per_case, "mean": _means(per_case)}
    io.write_json(summary, output_dir / "summary.json")
    return summary


def _means(per_case: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    means: dict[str, dict[str, float]] = {}
    for kind in ("labelset_dice", "dense_dice"):
        values: dict[str, list[float]] = {}
        for entry in per_case.values():
            for label, value in entry.get(kind, {}).items():
                values.setdefault(label, []).append(value)
        if values:
            means[kind] = {
                label: float(np.nanmean(v)) if not np.all(np.isnan(v)) else float("nan")
                for label, v in values.items()
            }
    return means
