"""Final validation of a fold: sliding-window softmax on whole preprocessed cases, out-of-fold export.

The sliding window is the shared one (:func:`mipseg.sliding_window.sliding_window_probabilities`:
tile step 0.5, Gaussian importance weighting with sigma = patch/8, no mirroring).

``fold_k/validation/{case}.npz`` (read by mipseg_refine) holds

* ``probabilities``: float16 ``(K, z, y, x)`` softmax in the *preprocessed* grid
  (``preprocessed/DatasetX/data/{case}.npy``'s spatial shape), class order = dataset labels;
* ``properties``: the JSON text of ``data/{case}.json`` (bbox, shapes, geometry) so that
  ``mipseg.planning.preprocessing.revert_preprocessing`` can bring it back to the raw grid.

``validation/summary.json`` holds per-case Dice of the argmax against the label set (labelled
voxels only) and, reported only, against dense truth when it exists.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mipseg import io
from mipseg.metrics import dice_per_class
from mipseg.sliding_window import sliding_window_probabilities


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
    num_classes: int,
    foreground_labels: Sequence[int],
    ignore_label: int,
    on_case_done: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Predict every validation case, save its probabilities, and summarise Dice.

    Parameters
    ----------
    data_dir, labelset_dir
        ``preprocessed/DatasetX/data`` and its ``labelsets/{name}`` folder.
    dense_dir
        Preprocessed dense truth (``data/labelsets/dense``) or None; reported only.
    num_classes
        Network outputs ``K`` (background included).
    on_case_done
        Called with the case id after each case (progress bars).

    Returns
    -------
    The summary dict also written to ``output_dir/summary.json``.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    per_case = {}
    for case_id in cases:
        image = np.load(data_dir / f"{case_id}.npy")
        probabilities = sliding_window_probabilities(network, image, patch_size, num_classes, device=device)
        properties = (
            (data_dir / f"{case_id}.json").read_text() if (data_dir / f"{case_id}.json").is_file() else "{}"
        )
        with io.atomic_path(output_dir / f"{case_id}.npz") as tmp:
            with open(tmp, "wb") as handle:
                np.savez_compressed(
                    handle, probabilities=probabilities.astype(np.float16), properties=properties
                )
        prediction = probabilities.argmax(0)
        reference = np.load(labelset_dir / f"{case_id}.npy")[0]
        entry = {"labelset_dice": dice_per_class(reference, prediction, foreground_labels, ignore_label)}
        if dense_dir is not None and (dense_dir / f"{case_id}.npy").is_file():
            truth = np.load(dense_dir / f"{case_id}.npy")[0]
            entry["dense_dice"] = dice_per_class(truth, prediction, foreground_labels, ignore_label)
        per_case[case_id] = entry
        if on_case_done is not None:
            on_case_done(case_id)
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
