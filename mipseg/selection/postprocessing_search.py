"""Decide connected-component postprocessing per class from out-of-fold predictions (nnU-Net's way).

For each foreground class the candidate rules (:mod:`mipseg.inference.postprocessing`) are scored
by the class's mean per-case Dice on the labelled voxels; a rule is kept only if it beats doing
nothing (strictly), and the best one wins (ties: the first tried, so ``none`` beats any rule of
equal Dice). Removing a class's components turns them into background, so a per-class rule cannot
change any other class's Dice.

Organs (``structure="organ"``) first try nnU-Net's step (a): keep only the largest component of
all foreground together, accepted if the mean foreground Dice improves and no class gets worse;
then per class ``largest`` or ``min_size`` N. Vessels (``structure="vessel"``) only try ``tree`` N:
a vessel tree is one component whatever its branches, and a disconnected piece may be a real
vessel the network interrupted, so "keep the largest" is never offered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from mipseg.inference.export import CANDIDATE_MIN_SIZES, component_counts
from mipseg.inference.postprocessing import apply_rules, removed_components
from mipseg.metrics import dice_from_counts, dice_per_class
from mipseg.selection.oof import foreground_mean

STRUCTURES = ("vessel", "organ")
NONE = {"kind": "none"}


def candidate_rules(structure: str, min_sizes: Sequence[int] = CANDIDATE_MIN_SIZES) -> list[dict[str, Any]]:
    """Rules to try for one class in tie-break order: ``none`` first (ties keep the prediction), then
    keep-largest for organs, then minimum sizes from small to large."""
    sizes = [int(s) for s in min_sizes if s > 1]
    if structure == "vessel":
        return [NONE] + [{"kind": "tree", "min_size": s} for s in sizes]
    return [NONE, {"kind": "largest"}] + [{"kind": "min_size", "min_size": s} for s in sizes]


def rule_dice_per_case(
    segmentation: np.ndarray,
    reference: np.ndarray,
    value: int,
    ignore_label: int | None,
    rules: Sequence[dict],
) -> list[float]:
    """Dice of class ``value`` on the labelled voxels after each rule, for one case."""
    known = reference != ignore_label if ignore_label is not None else np.ones(reference.shape, bool)
    sizes, tp, fp, fn_outside = component_counts(segmentation == value, reference == value, known)
    scores = []
    for rule in rules:
        removed = removed_components(sizes[1:], rule)
        tp_left = tp[1:][~removed].sum()
        fp_left = fp[1:][~removed].sum()
        fn = fn_outside + tp[1:][removed].sum()
        scores.append(float(dice_from_counts(tp_left, fp_left, fn)))
    return scores


def _union_step(
    cases: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
    classes: Sequence[int],
    ignore_label: int | None,
) -> dict[str, Any]:
    """nnU-Net's step (a): largest component of all foreground; accepted if it helps and hurts no class."""
    before = {str(v): [] for v in classes}
    after = {str(v): [] for v in classes}
    union_rule = {"all": {"kind": "largest"}}
    for segmentation, reference in cases():
        for value, dice in dice_per_class(reference, segmentation, classes, ignore_label).items():
            before[value].append(dice)
        processed = apply_rules(segmentation, union_rule)
        for value, dice in dice_per_class(reference, processed, classes, ignore_label).items():
            after[value].append(dice)
    (per_class_before, mean_before), (per_class_after, mean_after) = (
        foreground_mean(before),
        foreground_mean(after),
    )
    hurts = [v for v in per_class_before if per_class_after[v] < per_class_before[v]]
    accepted = bool(mean_after > mean_before and not hurts)
    return {
        "accepted": accepted,
        "dice_before": mean_before,
        "dice_after": mean_after,
        "hurts_classes": hurts,
    }


def decide_postprocessing(
    cases: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
    classes: Sequence[int],
    ignore_label: int | None,
    structure: str,
    min_sizes: Sequence[int] = CANDIDATE_MIN_SIZES,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The rules to apply and the table behind them.

    Parameters
    ----------
    cases
        Called once per pass; yields ``(segmentation, reference)`` label maps of one grid per case
        (the winner's out-of-fold argmax and the label set it is scored on).
    classes
        Foreground label values.
    structure
        ``"vessel"`` or ``"organ"`` (see the module docstring).

    Returns
    -------
    rules
        ``str(value) -> rule`` for classes whose rule is not ``none``, plus ``"all"`` when the
        union step was accepted (preprocessed voxels).
    table
        Per class the mean Dice of every rule tried, the union step's numbers.
    """
    table: dict[str, Any] = {"structure": structure, "classes": {}}
    rules: dict[str, dict[str, Any]] = {}
    first_pass = cases
    if structure == "organ" and len(classes) > 1:
        union = _union_step(cases, classes, ignore_label)
        table["all_foreground_largest"] = union
        if union["accepted"]:
            rules["all"] = {"kind": "largest"}

            def first_pass() -> Iterable[tuple[np.ndarray, np.ndarray]]:
                return ((apply_rules(s, rules), r) for s, r in cases())

    tried = candidate_rules(structure, min_sizes)
    per_rule = {str(v): [[] for _ in tried] for v in classes}
    for segmentation, reference in first_pass():
        for value in classes:
            for index, dice in enumerate(
                rule_dice_per_case(segmentation, reference, value, ignore_label, tried)
            ):
                per_rule[str(value)][index].append(dice)
    for value, lists in per_rule.items():
        means = [foreground_mean({value: scores})[0][value] for scores in lists]
        finite = [m if not np.isnan(m) else -np.inf for m in means]
        best = int(np.argmax(finite))  # first of equal means: the earliest tried (none before any rule)
        chosen = tried[best] if finite[best] > finite[0] else NONE
        if chosen is not NONE:
            rules[value] = dict(chosen)
        table["classes"][value] = {
            "chosen": dict(chosen),
            "dice_without": means[0],
            "dice_by_rule": [{**rule, "dice": mean} for rule, mean in zip(tried, means)],
        }
    return rules, table
