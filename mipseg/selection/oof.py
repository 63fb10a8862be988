"""Out-of-fold predictions of trained models and their pairwise ensembles, scored per class.

Training writes ``fold_k/validation/{case}.npz`` (float16 softmax ``(K, z, y, x)`` on the
preprocessed grid) for the validation cases of every fold ``0..4``; together the folds cover every
case once. A candidate is one model folder or a pair of them (nnU-Net builds all pairwise
ensembles); a pair's probabilities are the mean of its members'.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mipseg.inference.export import class_values, probabilities_to_segmentation
from mipseg.inference.predictor import list_model_folders
from mipseg.labelset import LabelSet
from mipseg.metrics import dice_per_class

ENSEMBLE_SEPARATOR = "___"  # nnU-Net's separator of ensemble member names


@dataclass(frozen=True)
class Candidate:
    """One model folder, or an ensemble of several (probabilities averaged)."""

    models: tuple[Path, ...]

    @property
    def name(self) -> str:
        return ENSEMBLE_SEPARATOR.join(model.name for model in self.models)


def validation_files(model_dir: Path) -> dict[str, Path]:
    """``{case: fold_k/validation/{case}.npz}`` over the numbered folds (``fold_all`` validates nothing)."""
    found = {}
    for path in sorted(model_dir.glob("fold_[0-9]*/validation/*.npz")):
        if not path.name.startswith("."):  # pathlib's * also matches a killed writer's temporary
            found[path.stem] = path
    return found


def models_with_validation(dataset: str | int) -> dict[str, Path]:
    """``{model folder name: folder}`` of every model of a dataset that has out-of-fold predictions."""
    return {
        folder.name: folder for folder in list_model_folders(dataset).values() if validation_files(folder)
    }


def candidates_of(models: Sequence[Path], ensembles: bool = True) -> list[Candidate]:
    """Single models (in the given order), then every pair of them."""
    singles = [Candidate((model,)) for model in models]
    pairs = [Candidate(pair) for pair in itertools.combinations(models, 2)] if ensembles else []
    return singles + pairs


def common_cases(models: Sequence[Path]) -> list[str]:
    """Cases every model has an out-of-fold prediction for, sorted."""
    sets = [set(validation_files(model)) for model in models]
    return sorted(set.intersection(*sets)) if sets else []


def load_probabilities(path: Path) -> np.ndarray:
    """float32 ``(K, z, y, x)`` out-of-fold probabilities of one ``validation/{case}.npz``."""
    with np.load(path) as stored:
        return stored["probabilities"].astype(np.float32)


def candidate_segmentations(
    candidates: Sequence[Candidate],
    case_id: str,
    labels: Mapping[str, int],
    files: Mapping[Path, Mapping[str, Path]],
) -> Iterator[tuple[Candidate, np.ndarray]]:
    """Argmax label map (label values, preprocessed grid) of every candidate for one case.

    ``files`` is :func:`validation_files` of every model. Each model's file is read once per case,
    whatever the number of ensembles it is part of.
    """
    cache: dict[Path, np.ndarray] = {}
    values = class_values(labels)
    for candidate in candidates:
        for model in candidate.models:
            if model not in cache:
                cache[model] = load_probabilities(files[model][case_id])
        shapes = {cache[model].shape for model in candidate.models}
        if len(shapes) != 1:
            continue  # members trained on other plans: no voxel-wise mean
        mean = sum(cache[model] for model in candidate.models) / len(candidate.models)
        yield candidate, probabilities_to_segmentation(mean, values)


def foreground_mean(per_case: Mapping[str, Sequence[float]]) -> tuple[dict[str, float], float]:
    """Per class the mean over cases (NaN cases skipped), and the mean over classes (nnU-Net's rule)."""
    means = {}
    for value, scores in per_case.items():
        finite = [s for s in scores if not np.isnan(s)]
        means[value] = float(np.mean(finite)) if finite else float("nan")
    finite = [m for m in means.values() if not np.isnan(m)]
    return means, float(np.mean(finite)) if finite else float("nan")


def score_candidates(
    candidates: Sequence[Candidate],
    cases: Sequence[str],
    reference: LabelSet,
    dense: LabelSet | None,
    labels: Mapping[str, int],
    ignore_label: int,
) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Per-case Dice of every candidate, per class, on the labelled voxels of a label set.

    Parameters
    ----------
    reference
        The label set scored against, read from its preprocessed copies (``(1, z, y, x)``;
        ``ignore_label`` voxels count for nothing).
    dense
        The ``dense`` label set or None: Dice against dense truth, reported only.

    Returns
    -------
    ``{candidate name: {"labelset": {class: [Dice per case]}, "dense": {...}}}``
    """
    classes = [int(v) for v in class_values(labels) if v != 0]
    files = {model: validation_files(model) for candidate in candidates for model in candidate.models}
    scores = {c.name: {"labelset": {str(v): [] for v in classes}, "dense": {}} for c in candidates}
    for case_id in cases:
        reference_map = np.load(reference.preprocessed_file(case_id))[0]
        dense_path = dense.preprocessed_file(case_id) if dense is not None else None
        dense_map = np.load(dense_path)[0] if dense_path is not None and dense_path.is_file() else None
        for candidate, segmentation in candidate_segmentations(candidates, case_id, labels, files):
            entry = scores[candidate.name]
            if segmentation.shape != reference_map.shape:
                continue
            for value, dice in dice_per_class(reference_map, segmentation, classes, ignore_label).items():
                entry["labelset"][value].append(dice)
            if dense_map is not None and dense_map.shape == segmentation.shape:
                for value, dice in dice_per_class(dense_map, segmentation, classes).items():
                    entry["dense"].setdefault(value, []).append(dice)
    return scores
