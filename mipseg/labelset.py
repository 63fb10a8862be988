"""Label sets, the hand-over between stages: one folder, one ``labelset.json``, one ``report.json``.

A label set is ``preprocessed/DatasetX/labelsets/{name}/`` with one ``{case}.nii.gz`` per training case
(raw geometry; dataset labels plus the ignore value), optionally ``{case}_seeds.nii.gz``. Three stages
write them (``mipseg_pseudolabel``, ``mipseg_propagate``, ``mipseg_refine``) and every later stage reads
them; this module is the one place that knows their files, so every producer and reader agrees:

* :class:`LabelSet`: where a set's files are, and reading them (report, mean Dice against truth);
* :class:`LabelSetWriter`: the one ``report.json`` writer, with the resume rule "same settings, case
  finished" (``--continue``);
* :func:`agreement`: how a label map is scored against dense truth (the report's ``agreement``).

``labelset.json`` (written by the producer through the writer) always holds ``name``, ``dataset``,
``made_by``, ``labels`` (name -> value, ``ignore`` included), ``ignore`` and ``settings``, plus
``made_from`` (the inputs that, with ``settings``, identify the run: a flow model, a source label set)
and whatever the producer adds. ``report.json``::

    {"labelset", "dataset", "made_by", "settings", "made_from", "truth_used_for",
     ...producer fields (e.g. "warnings", "method"),
     "cases": {case: {"counts": {...}, "agreement": {class name: {...}}, ...producer fields}},
     "summary": {"num_cases", "counts", "num_cases_scored", "agreement_mean", "foreground_dice"}}

``counts`` are the producer's voxel counts (nested dicts of integers, summed in ``summary.counts``);
``agreement`` is present only for cases with dense truth (``labelsTr``), per class ``voxels``,
``precision``, ``recall``, ``dice`` and, for foreground classes, ``background_error``. A case's optional
``undrawn_classes`` (list of class values) says its background may hold those classes, drawn nowhere
in it (:meth:`LabelSet.undrawn_classes`). Undefined ratios
are ``null`` and left out of the means. Shared layer: stages import it; it imports no stage.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mipseg import io, paths
from mipseg.errors import InputError
from mipseg.metrics import dice_from_counts

DESCRIPTION_FILE = "labelset.json"
REPORT_FILE = "report.json"
SEEDS_PATTERN = "{case}_seeds.nii.gz"
# The copies mipseg_train makes on the preprocessed grid, per case (:meth:`LabelSet.preprocessed_file`);
# the planner writes the first two for the dense set, fold_inputs the seeds.
PREPROCESSED_SUFFIXES = {"label": ".npy", "locations": "_locations.npz", "seeds": "_seeds.npy"}
RESERVED_NAMES = ("dense",)  # labelsTr, the dense truth
TRUTH_USED_FOR = "agreement numbers only (labelsTr), never for the labels"
# What, besides the label map itself, makes a run of a label set the same run.
IDENTITY_KEYS = ("settings", "made_from")


def name_problems(name: str, flag: str = "--name", also_reserved: Iterable[str] = ()) -> list[str]:
    """One line if ``name`` is not a simple folder name or is reserved (``dense``, ``also_reserved``)."""
    reserved = (*RESERVED_NAMES, *also_reserved)
    if re.fullmatch(r"\w[\w.-]*", name) and name not in reserved:
        return []
    return [
        f"{flag} {name!r}: must be a simple name (letters, digits, _ . -) other than "
        + ", ".join(repr(r) for r in reserved)
    ]


@dataclass(frozen=True)
class LabelSet:
    """One label set of a dataset: its files and what its report says.

    ``dataset`` is the dataset's folder name (``Dataset900_Name``); :meth:`of` resolves an id.
    """

    dataset: str
    name: str
    staged: bool = False  # the folder a fresh run over a finished set writes, beside it (LabelSetWriter)

    @classmethod
    def of(cls, dataset: str | int, name: str) -> LabelSet:
        """The label set ``name`` of a dataset given by id or name."""
        return cls(paths.resolve_dataset(dataset), name)

    @classmethod
    def all_of(cls, dataset: str | int) -> list[LabelSet]:
        """Every label set of a dataset that has a ``report.json``, by name."""
        name = paths.resolve_dataset(dataset)
        folder = paths.preprocessed_root() / name / "labelsets"
        found = sorted(
            p.name for p in folder.glob("*") if (p / REPORT_FILE).is_file() and not p.name.startswith(".")
        )
        return [cls(name, labelset) for labelset in found]

    @property
    def folder(self) -> Path:
        folder = f".{self.name}.next" if self.staged else self.name
        return paths.preprocessed_root() / self.dataset / "labelsets" / folder

    @property
    def preprocessed_folder(self) -> Path:
        """``data/labelsets/{name}``: the copy on the preprocessed grid that mipseg_train makes."""
        return paths.preprocessed_root() / self.dataset / "data" / "labelsets" / self.name

    def preprocessed_file(self, case_id: str, kind: str = "label") -> Path:
        """A case's file in :attr:`preprocessed_folder`: ``kind`` is a key of ``PREPROCESSED_SUFFIXES``."""
        return self.preprocessed_folder / f"{case_id}{PREPROCESSED_SUFFIXES[kind]}"

    @property
    def description_path(self) -> Path:
        return self.folder / DESCRIPTION_FILE

    @property
    def report_path(self) -> Path:
        return self.folder / REPORT_FILE

    def label_path(self, case_id: str) -> Path:
        """``{case}.nii.gz``: the label map a producer writes."""
        return self.folder / f"{case_id}.nii.gz"

    def seeds_path(self, case_id: str) -> Path:
        """``{case}_seeds.nii.gz``: seed voxels (seed class at seeds, ignore elsewhere), optional."""
        return self.folder / SEEDS_PATTERN.format(case=case_id)

    def label_file(self, case_id: str, file_ending: str = ".nii.gz") -> Path | None:
        """The case's label map as a reader finds it (``.nii.gz`` or the dataset's file ending), or None."""
        for ending in (".nii.gz", file_ending):
            if (self.folder / f"{case_id}{ending}").is_file():
                return self.folder / f"{case_id}{ending}"
        return None

    def read_report(self) -> dict[str, Any]:
        """``report.json``; raises :class:`InputError` when it does not exist."""
        if not self.report_path.is_file():
            raise InputError(f"{self.report_path}: not found; make label set {self.name!r} first")
        return io.read_json(self.report_path)

    def foreground_dice(self) -> float:
        """Mean over foreground classes of the mean Dice against dense truth (``summary.foreground_dice``).

        Raises
        ------
        ValueError
            If the report holds no agreement with dense truth.
        """
        value = self.read_report().get("summary", {}).get("foreground_dice")
        if value is None:
            raise ValueError(f"{self.report_path}: holds no agreement with dense truth")
        return float(value)

    def undrawn_classes(self) -> dict[str, tuple[int, ...]]:
        """Per case, the class values nobody drew in it (report ``cases[case].undrawn_classes``).

        The case's background may hold those classes (a propagated set whose drawn slices miss an
        organ); the trainer's marginal loss reads it so. Cases without the field, and label sets
        without a report (``dense``), have none.
        """
        if not self.report_path.is_file():
            return {}
        cases = self.read_report().get("cases", {})
        return {
            case_id: tuple(int(v) for v in entry.get("undrawn_classes", ()))
            for case_id, entry in cases.items()
            if entry.get("undrawn_classes")
        }

    def drop_preprocessed_copy(self, case_id: str) -> None:
        """Delete a case's files in :attr:`preprocessed_folder`: stale once its label map is rewritten.

        mipseg_train preprocesses a label set only where copies are missing, so a rewritten map
        must lose its copies to be preprocessed again.
        """
        for kind in PREPROCESSED_SUFFIXES:
            self.preprocessed_file(case_id, kind).unlink(missing_ok=True)


def agreement(
    labels: np.ndarray,
    truth: np.ndarray,
    classes: Mapping[str, int],
    region: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """How a label map agrees with dense truth, per class (the ``agreement`` of ``report.json``).

    For class ``c`` with labelled voxels ``L_c`` and true voxels ``T_c``: ``voxels = |L_c|``,
    ``precision = |L_c & T_c| / |L_c|``, ``recall = |L_c & T_c| / |T_c|``, ``dice`` from
    :func:`mipseg.metrics.dice_from_counts` (NaN when both are empty), and for a foreground class
    (value != 0) ``background_error = |L_0 & T_c| / |T_c|``, the share of its true voxels labelled
    background. Voxels of any other value (ignore) are in no ``L_c``. Undefined ratios are NaN.

    Parameters
    ----------
    labels, truth : np.ndarray of int, shape (z, y, x)
        The label map and the dense truth (dataset label values).
    classes
        Class name -> value to score (``0`` = background).
    region : np.ndarray of bool, shape (z, y, x), optional
        Score only inside this region (e.g. where the truth is known to be complete).
    """
    if region is not None:
        labels, truth = labels[region], truth[region]
    background = labels == 0
    scores: dict[str, dict[str, float]] = {}
    for name, value in classes.items():
        labelled, true = labels == value, truth == value
        hits = int(np.count_nonzero(labelled & true))
        size, total = int(np.count_nonzero(labelled)), int(np.count_nonzero(true))
        entry = {
            "voxels": size,
            "precision": _ratio(hits, size),
            "recall": _ratio(hits, total),
            "dice": float(dice_from_counts(hits, size - hits, total - hits)),
        }
        if value != 0:
            entry["background_error"] = _ratio(int(np.count_nonzero(background & true)), total)
        scores[name] = entry
    return scores


def mean_agreement(entries: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float | None]]:
    """Mean over cases of every number of :func:`agreement` (undefined values left out; None if all are)."""
    if not entries:
        return {}
    return {
        name: {key: _mean([entry[name].get(key) for entry in entries]) for key in entries[0][name]}
        for name in entries[0]
    }


def summarize(
    cases: Mapping[str, dict[str, Any]],
    labels: Mapping[str, int],
    agreement_keys: tuple[str, ...] = ("agreement",),
) -> dict[str, Any]:
    """``summary`` of a report: counts summed, agreement averaged over cases, mean foreground Dice.

    ``agreement_keys``: per-case fields holding an :func:`agreement` each; ``{key}_mean`` averages
    them. ``foreground_dice`` = mean over the foreground classes of ``labels`` of ``agreement_mean``'s
    Dice (the number the demo table shows).
    """
    summary: dict[str, Any] = {"num_cases": len(cases)}
    counted = [entry["counts"] for entry in cases.values() if "counts" in entry]
    if counted:
        summary["counts"] = _sum_counts(counted)
    for key in agreement_keys:
        scored = [entry[key] for entry in cases.values() if entry.get(key)]
        if not scored:
            continue
        summary[f"{key}_mean"] = mean_agreement(scored)
        if key == "agreement":
            summary["num_cases_scored"] = len(scored)
    means = summary.get("agreement_mean", {})
    foreground = [
        means[name]["dice"]
        for name, value in labels.items()
        if name in means and value != 0 and means[name].get("dice") is not None
    ]
    if foreground:
        summary["foreground_dice"] = float(np.mean(foreground))
    return summary


class LabelSetWriter:
    """Writes a label set's ``labelset.json`` and ``report.json`` while a producer makes its cases.

    The resume rule: with ``resume``, an earlier run's entries are kept for the cases it finished
    (report entry present and every file of ``case_files`` on disk; the producer writes the label
    map last), provided ``labelset.json`` shows the same ``settings`` and ``made_from``; other
    settings raise :class:`InputError`. Without ``resume`` the report starts empty. The report is
    rewritten after every case, so an interrupted run keeps what it finished.

    Nothing finished is replaced before its replacement is complete: a run without ``resume`` over a
    set that has a ``report.json`` writes into ``labelsets/.{name}.next/`` (:attr:`target`; producers
    write their files there) and :meth:`close` swaps it in; until then readers (training) see the
    earlier set unchanged. ``--continue`` after an interruption goes on in ``.{name}.next``.

    Parameters
    ----------
    labelset
        The set being written.
    description
        ``labelset.json``: ``made_by``, ``labels``, ``ignore``, ``settings`` required, ``made_from``
        optional; ``name`` and ``dataset`` are filled in.
    resume
        Keep the cases an earlier run with the same settings finished.
    header
        Producer fields of ``report.json`` besides the common ones (e.g. ``warnings``).
    case_files
        Files a finished case has (default: its label map).
    agreement_keys
        Per-case fields averaged in the summary (see :func:`summarize`).
    settings_added
        Settings keys the producer added after it first wrote label sets, each with the value that
        reproduces a run from before the key existed: an earlier ``labelset.json`` without the key
        counts as having that value, so ``--continue`` over a set an older version began goes on.
    """

    def __init__(
        self,
        labelset: LabelSet,
        description: dict[str, Any],
        *,
        resume: bool = False,
        header: dict[str, Any] | None = None,
        case_files: Callable[[str], list[Path]] | None = None,
        agreement_keys: tuple[str, ...] = ("agreement",),
        settings_added: dict[str, Any] | None = None,
    ) -> None:
        self.labelset = labelset
        self.target = _target(labelset, resume)
        self.description = io.json_round_trip(
            {"name": labelset.name, "dataset": labelset.dataset, **description}
        )
        self.header = dict(header or {})
        self.case_files = case_files or (lambda case_id: [labelset.label_path(case_id)])
        self.agreement_keys = agreement_keys
        self.settings_added = io.json_round_trip(dict(settings_added or {}))
        self.cases: dict[str, dict[str, Any]] = self._earlier_cases() if resume else {}
        io.write_json(self.description, self.target.description_path)

    def _earlier_cases(self) -> dict[str, dict[str, Any]]:
        description_path, report_path = self.target.description_path, self.target.report_path
        if not (description_path.is_file() and report_path.is_file()):
            return {}
        earlier = io.read_json(description_path)
        if isinstance(earlier.get("settings"), dict):
            earlier["settings"] = {**self.settings_added, **earlier["settings"]}
        changed = [key for key in IDENTITY_KEYS if earlier.get(key) != self.description.get(key)]
        if changed:
            made = ", ".join(f"{key} {earlier.get(key)}" for key in changed)
            raise InputError(
                f"{description_path}: made with other settings or inputs ({made}) than this run; run "
                "without --continue to remake the label set, or choose another --name"
            )
        cases = io.read_json(report_path).get("cases", {})
        return {case_id: entry for case_id, entry in cases.items() if self._files_exist(case_id)}

    def _files_exist(self, case_id: str) -> bool:
        # case_files name the set's own folder; while staged the files are in the target folder
        final, target = self.labelset.folder, self.target.folder
        return all((target / path.relative_to(final)).is_file() for path in self.case_files(case_id))

    def finished(self, case_id: str) -> bool:
        """Whether the case is kept from an earlier run (or was added in this one)."""
        return case_id in self.cases and self._files_exist(case_id)

    def add_case(self, case_id: str, entry: dict[str, Any]) -> None:
        """Record a case whose files are written, drop its stale preprocessed copy, rewrite the report."""
        if not self.target.staged:  # staged: the set being read stays as it is until close
            self.labelset.drop_preprocessed_copy(case_id)
        self.cases[case_id] = entry
        self.write()

    def close(self, case_order: Iterable[str]) -> Path:
        """Final report: cases in ``case_order`` (others dropped, e.g. no longer annotated)."""
        order = list(case_order)
        self.cases = {case_id: self.cases[case_id] for case_id in order if case_id in self.cases}
        self.write()
        self._remove_stale_partials(order)
        if self.target.staged:
            _swap_in(self.labelset)
        return self.labelset.report_path

    def _remove_stale_partials(self, case_ids: list[str]) -> None:
        """Temporaries a SIGKILLed earlier run left in the set (every file is written by now)."""
        final, target = self.labelset.folder, self.target.folder
        stems: dict[Path, list[str]] = {target: [io.file_stem(DESCRIPTION_FILE), io.file_stem(REPORT_FILE)]}
        for case_id in case_ids:
            for path in self.case_files(case_id):  # named in the final folder, written in the target
                stems.setdefault(target / path.relative_to(final).parent, []).append(io.file_stem(path))
        for folder, names in stems.items():  # one listing per folder, not one per file
            io.remove_stale_partials(folder, names)

    def write(self) -> Path:
        """Write ``report.json`` as it stands."""
        common = {key: self.description.get(key) for key in ("made_by", *IDENTITY_KEYS)}
        report = {
            "labelset": self.labelset.name,
            "dataset": self.labelset.dataset,
            **common,
            "truth_used_for": TRUTH_USED_FOR,
            **self.header,
            "cases": self.cases,
            "summary": summarize(self.cases, self.description.get("labels", {}), self.agreement_keys),
        }
        return io.write_json(io.json_round_trip(report), self.target.report_path)


def _target(labelset: LabelSet, resume: bool) -> LabelSet:
    """Where a run writes: beside a finished set (fresh run, or resuming such a run), else in place."""
    staged = LabelSet(labelset.dataset, labelset.name, staged=True)
    _finish_swap(labelset)
    if resume:
        return staged if staged.folder.is_dir() else labelset
    shutil.rmtree(staged.folder, ignore_errors=True)  # an unfinished fresh run: this one starts anew
    return staged if labelset.report_path.is_file() else labelset


def _old_folder(labelset: LabelSet) -> Path:
    return labelset.folder.with_name(f".{labelset.name}.old")


def _swap_in(labelset: LabelSet) -> None:
    """Replace the set by its complete staged folder (two renames), then drop the old copies."""
    old = _old_folder(labelset)
    shutil.rmtree(old, ignore_errors=True)
    os.replace(labelset.folder, old)
    _finish_swap(labelset)


def _finish_swap(labelset: LabelSet) -> None:
    """Complete a swap that a kill cut between its two renames (the staged folder is then complete)."""
    old, staged = _old_folder(labelset), LabelSet(labelset.dataset, labelset.name, staged=True).folder
    if old.is_dir() and not labelset.folder.exists() and staged.is_dir():
        os.replace(staged, labelset.folder)
    if old.is_dir():
        shutil.rmtree(old)
        # every map may have changed: training preprocesses the set again
        shutil.rmtree(labelset.preprocessed_folder, ignore_errors=True)


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else math.nan


def _mean(values: list[float | None]) -> float | None:
    present = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(present)) if present else None


def _sum_counts(counts: list[dict[str, Any]]) -> dict[str, Any]:
    """Key-wise sums of nested dicts of integers (the keys of the first one)."""
    return {
        key: _sum_counts([c[key] for c in counts]) if isinstance(value, dict) else sum(c[key] for c in counts)
        for key, value in counts[0].items()
    }
