"""The selection stage behind ``mipseg_find_best_configuration``: which model, which postprocessing.

1. Every model folder of the dataset with out-of-fold predictions (``fold_k/validation/``) is a
   candidate, and so is every pair of them (an ensemble: mean probabilities).
2. Each candidate is scored on the cases all models validated, by the mean over foreground
   classes of the mean per-case Dice on the **labelled voxels** of the reference label set
   (``ignore`` voxels count for nothing). Dice against dense truth is reported, never used.
3. The best score wins; ties go to the first candidate (single models before ensembles, models
   in folder-name order), as nnU-Net's ``find_best_configuration``.
4. Postprocessing is decided on the winner (:mod:`mipseg.selection.postprocessing_search`).

Writes ``results/{Dataset}/best_configuration.json`` and ``inference_instructions.txt``, and the
decision into ``postprocessing.json`` of every winning model folder (read by ``mipseg_predict
--postprocess`` and packed by ``mipseg_export_model``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mipseg import io, paths
from mipseg.errors import InputError
from mipseg.inference.postprocessing import DECISION_FILE, rules_in_voxels_of
from mipseg.labelset import LabelSet
from mipseg.planning.plans import load_plans
from mipseg.selection.oof import (
    Candidate,
    candidate_segmentations,
    candidates_of,
    common_cases,
    foreground_mean,
    models_with_validation,
    score_candidates,
    validation_files,
)
from mipseg.selection.postprocessing_search import STRUCTURES, decide_postprocessing

BEST_CONFIGURATION_FILE = "best_configuration.json"
INSTRUCTIONS_FILE = "inference_instructions.txt"
ANNOTATOR_LABELSETS = ("pseudo", "propagated")  # made from the annotator's drawings


def reference_labelset(model_dirs: Sequence[Path], labels: str | None) -> str:
    """The label set every candidate is scored on.

    ``labels`` when given; else the one label set the models were trained on; else the
    annotator's (``pseudo`` or ``propagated``) among them: a refined fine-tune learned from a label
    set its own fold models cleaned, and scoring it on that set would reward agreeing with itself.
    """
    if labels is not None:
        return labels
    trained_on = sorted({model.name.split("__")[1] for model in model_dirs})
    if len(trained_on) == 1:
        return trained_on[0]
    annotator = [name for name in trained_on if name in ANNOTATOR_LABELSETS]
    if len(annotator) == 1:
        return annotator[0]
    raise InputError(f"models trained on label sets {trained_on}: choose the one to score on with --labels")


def _structure(model_dir: Path, structure: str) -> str:
    if structure == "auto":
        annotation = io.read_json(model_dir / "dataset.json").get("annotation")
        return "vessel" if annotation == "mip" else "organ"
    if structure not in STRUCTURES:
        raise InputError(f"--structure {structure}: expected auto, {' or '.join(STRUCTURES)}")
    return structure


def find_best_configuration(
    dataset: str | int,
    *,
    labels: str | None = None,
    trainers: Sequence[str] | None = None,
    ensembles: bool = True,
    structure: str = "auto",
) -> dict[str, Any]:
    """Rank the trained models and their pairwise ensembles, decide postprocessing, write the files.

    Parameters
    ----------
    dataset
        Dataset id or name.
    labels
        Label set to score on (see :func:`reference_labelset`).
    trainers
        Only model folders of these trainers (``None``: all).
    ensembles
        Also try every pair of models.
    structure
        ``auto`` (``vessel`` for MIP-annotated datasets, else ``organ``), ``vessel`` or ``organ``:
        which postprocessing rules are tried.

    Returns
    -------
    The content of ``best_configuration.json``.
    """
    found = models_with_validation(dataset)
    if trainers:
        found = {name: folder for name, folder in found.items() if name.split("__")[0] in trainers}
    if not found:
        raise InputError(
            f"{paths.results_dataset_dir(dataset)}: no model with out-of-fold predictions "
            "(fold_k/validation/*.npz); train folds 0..4 with mipseg_train first"
        )
    models = list(found.values())
    reference = reference_labelset(models, labels)
    reference_set = LabelSet.of(dataset, reference)
    cases = [c for c in common_cases(models) if reference_set.preprocessed_file(c).is_file()]
    if not cases:
        raise InputError(
            f"{reference_set.preprocessed_folder}: no preprocessed label of any validated case for "
            f"label set {reference}"
        )
    dense = LabelSet.of(dataset, "dense")
    spec = io.read_json(models[0] / "dataset.json")
    plans = load_plans(models[0] / "plans.json")
    candidates = candidates_of(models, ensembles)
    scores = score_candidates(
        candidates,
        cases,
        reference_set,
        dense if dense.preprocessed_folder.is_dir() else None,
        spec["labels"],
        plans.ignore_label,
    )
    table = [_row(candidate, scores[candidate.name]) for candidate in candidates]
    ranked = [row for row in table if not np.isnan(row["foreground_dice"])]
    if not ranked:
        raise InputError(f"no candidate could be scored on label set {reference} (shapes differ?)")
    best_row = max(ranked, key=lambda row: row["foreground_dice"])  # max keeps the first of equals
    best = next(c for c in candidates if c.name == best_row["name"])

    kind = _structure(best.models[0], structure)
    classes = [int(v) for v in plans.labels.values() if v not in (0, plans.ignore_label)]
    rules, pp_table = decide_postprocessing(
        lambda: winner_cases(best, cases, reference_set, spec["labels"]),
        sorted(classes),
        plans.ignore_label,
        kind,
    )
    ratio = float(np.prod(plans.spacing) / np.prod(plans.original_median_spacing))
    decision = {
        "made_by": "mipseg_find_best_configuration",
        "decided_for": [model.name for model in best.models],
        "reference_labelset": reference,
        "rules": rules,
        "rules_raw": rules_in_voxels_of(rules, ratio),
        "table": pp_table,
    }
    for model in best.models:
        path = model / DECISION_FILE
        stored = io.read_json(path) if path.is_file() else {}
        io.write_json({**stored, **decision}, path)

    result = {
        "rule": "max of the mean over foreground classes of the mean per-case Dice on the labelled voxels "
        f"of label set {reference!r}; ties: first (single models before ensembles)",
        "reference_labelset": reference,
        "cases": cases,
        "candidates": table,
        "best": {"name": best.name, "models": [m.name for m in best.models], **_scores_of(best_row)},
        "postprocessing": {"rules": rules, "rules_raw": decision["rules_raw"], "table": pp_table},
        "predict_command": predict_command(dataset, best, bool(rules)),
    }
    root = paths.results_dataset_dir(dataset)
    io.write_json(result, root / BEST_CONFIGURATION_FILE)
    (root / INSTRUCTIONS_FILE).write_text(_instructions(result, dataset))
    return result


def _row(candidate: Candidate, score: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    per_class, mean = foreground_mean(score["labelset"])
    row = {"name": candidate.name, "models": [m.name for m in candidate.models]}
    row.update(labelset_dice=per_class, foreground_dice=mean)
    if score["dense"]:
        dense_per_class, dense_mean = foreground_mean(score["dense"])
        row.update(dense_dice=dense_per_class, dense_foreground_dice=dense_mean)
    return row


def _scores_of(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in ("name", "models")}


def winner_cases(
    best: Candidate, cases: Sequence[str], reference: LabelSet, labels: dict[str, int]
) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """``(out-of-fold argmax, reference label map)`` of a candidate for each case, one at a time."""
    files = {model: validation_files(model) for model in best.models}
    for case_id in cases:
        reference_map = np.load(reference.preprocessed_file(case_id))[0]
        for _, segmentation in candidate_segmentations([best], case_id, labels, files):
            yield segmentation, reference_map


def predict_command(dataset: str | int, best: Candidate, postprocess: bool) -> str:
    """The ``mipseg_predict`` line that reproduces the winner (nnU-Net's inference instructions)."""
    flag = " --postprocess" if postprocess else ""
    if len(best.models) == 1:
        trainer, labelset, _ = best.models[0].name.split("__")
        name = paths.resolve_dataset(dataset)
        model = f"-d {name} --trainer {trainer} --labels {labelset}"
        return f"mipseg_predict -i INPUT_FOLDER -o OUTPUT_FOLDER {model}{flag}"
    models = " ".join(str(model) for model in best.models)
    return f"mipseg_predict -i INPUT_FOLDER -o OUTPUT_FOLDER -m {models}{flag}"


def _instructions(result: dict[str, Any], dataset: str | int) -> str:
    lines = [
        f"Best configuration of {paths.resolve_dataset(dataset)}: {result['best']['name']}",
        f"  foreground Dice on the labelled voxels of {result['reference_labelset']!r}: "
        f"{result['best']['foreground_dice']:.4f} over {len(result['cases'])} out-of-fold cases",
        f"  postprocessing rules: {result['postprocessing']['rules'] or 'none'}",
        "",
        "Predict with:",
        "  " + result["predict_command"],
        "",
        "Export it for another machine with:",
        f"  mipseg_export_model -d {paths.resolve_dataset(dataset)} -o model.zip",
        "",
    ]
    return "\n".join(lines)
