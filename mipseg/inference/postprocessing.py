"""Per-class connected-component rules decided by ``mipseg_find_best_configuration``, applied by predict.

A rule says what to remove from one foreground class of a label map after the argmax:

=============  ====================================================================================
``none``       nothing
``largest``    every component but the largest (organs: one blob per class, as nnU-Net's rule)
``min_size``   every component smaller than ``min_size`` voxels
``tree``       every component smaller than ``min_size`` voxels *except the largest* (the main tree).
               Vessels: a branch touching the main tree is part of its component, so it is never
               removed, and a disconnected vessel piece of real size survives (``largest`` would
               drop it; it is never offered for vessel datasets)
=============  ====================================================================================

Components are 26-connected, as in :mod:`mipseg.inference.export`. The decision lives in the model
folder's ``postprocessing.json`` (key ``rules``, with ``decided_for``: the model folders it was
decided on); ``mipseg_predict --postprocess`` applies it when it predicts with those models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from acvl_utils.morphology.morphology_helper import cc3d_label_with_component_sizes

from mipseg import io
from mipseg.errors import InputError

DECISION_FILE = "postprocessing.json"  # in every model folder the decision was made for
RULE_KINDS = ("none", "largest", "min_size", "tree")
CONNECTIVITY = 26


def removed_components(sizes: np.ndarray, rule: Mapping[str, Any]) -> np.ndarray:
    """Which components a rule removes.

    Parameters
    ----------
    sizes : np.ndarray of int, shape (N,)
        Voxel count of components ``1..N`` (component ids minus one).
    rule
        ``{"kind": ..., "min_size": int}`` (``min_size`` for ``min_size`` and ``tree``).

    Returns
    -------
    np.ndarray of bool, shape (N,)
    """
    kind = rule["kind"]
    if kind not in RULE_KINDS:
        raise InputError(f"postprocessing rule {kind!r}: expected one of {', '.join(RULE_KINDS)}")
    removed = np.zeros(len(sizes), dtype=bool)
    if kind == "none" or len(sizes) == 0:
        return removed
    largest = int(np.argmax(sizes))  # first of equal sizes, deterministic
    if kind == "largest":
        removed[:] = True
    else:
        removed = sizes < int(rule["min_size"])
    if kind in ("largest", "tree"):
        removed[largest] = False
    return removed


def apply_rules(segmentation: np.ndarray, rules: Mapping[str, Mapping[str, Any]]) -> np.ndarray:
    """Apply per-class rules to a label map; removed voxels become background (0).

    Parameters
    ----------
    segmentation : np.ndarray of int, shape (Z, Y, X)
    rules
        ``str(label value) -> rule`` (see the module docstring); classes without a rule stay.
        Key ``"all"`` (applied first): the rule for all foreground labels together (nnU-Net's
        "keep the largest component of the foreground").

    Returns
    -------
    np.ndarray, same shape and dtype (a new array)
    """
    result = segmentation.copy()
    for value, rule in sorted(rules.items(), key=lambda item: item[0] != "all"):
        if rule["kind"] == "none":
            continue
        mask = result > 0 if value == "all" else result == int(value)
        components, sizes = cc3d_label_with_component_sizes(mask, connectivity=CONNECTIVITY)
        ids = np.array(sorted(sizes), dtype=np.int64)
        if ids.size == 0:
            continue
        removed = ids[removed_components(np.array([sizes[i] for i in ids]), rule)]
        if removed.size:
            result[np.isin(components, removed)] = 0
    return result


def rules_in_voxels_of(rules: Mapping[str, Mapping[str, Any]], ratio: float) -> dict[str, dict[str, Any]]:
    """Rules with ``min_size`` scaled by ``ratio`` (preprocessed voxel volume / raw voxel volume)."""
    scaled = {}
    for value, rule in rules.items():
        rule = dict(rule)
        if "min_size" in rule:
            rule["min_size"] = max(1, int(round(rule["min_size"] * ratio)))
        scaled[value] = rule
    return scaled


def read_decision(model_dirs: Sequence[Path]) -> dict[str, Any] | None:
    """The postprocessing decision made for exactly these model folders, or ``None``.

    The first folder's ``postprocessing.json`` counts if its ``decided_for`` names the same set of
    model folders (by folder name) and it holds ``rules``; a decision made for another ensemble
    does not apply.
    """
    path = Path(model_dirs[0]) / DECISION_FILE
    if not path.is_file():
        return None
    stored = io.read_json(path)
    if "rules" not in stored or sorted(stored.get("decided_for", [])) != sorted(p.name for p in model_dirs):
        return None
    return stored
