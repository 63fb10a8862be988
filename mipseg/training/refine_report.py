"""The files of a refined label set besides its label maps: ``labelset.json`` and ``report.json``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mipseg import io
from mipseg.dataset import DatasetSpec
from mipseg.errors import InputError

if TYPE_CHECKING:
    from mipseg.training.refine_api import RefineSettings


def summarize(cases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Totals of the change counts and mean precision / recall before and after, over cases."""
    summary: dict[str, Any] = {"num_cases": len(cases)}
    if not cases:
        return summary
    first = next(iter(cases.values()))
    summary["changes"] = {
        kind: {key: sum(e["changes"][kind][key] for e in cases.values()) for key in first["changes"][kind]}
        for kind in first["changes"]
    }
    scored = [e["agreement"] for e in cases.values() if "agreement" in e]
    if scored:
        summary["agreement_mean"] = {
            when: {
                cls: {m: _mean([s[when][cls][m] for s in scored]) for m in ("precision", "recall")}
                for cls in scored[0][when]
            }
            for when in ("before", "after")
        }
    return summary


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def labelset_description(
    source_dir: Path, dataset: str, labels: str, name: str, spec: DatasetSpec, settings: RefineSettings
) -> dict[str, Any]:
    """``labelset.json``: the source set's description (values, seeds) with this stage's provenance."""
    source = source_dir / "labelset.json"
    description = io.read_json(source) if source.is_file() else {}
    if "settings" in description:
        description["source_settings"] = description.pop("settings")
    description.update(
        {
            "name": name,
            "dataset": dataset,
            "made_by": "mipseg_refine (confident learning + uncertainty, Guo et al. IEEE TMI 2024)",
            "source_labelset": labels,
            "labels": {**spec.class_labels, "ignore": spec.ignore_label},
            "ignore": spec.ignore_label,
            "refine_settings": settings.to_json(),
        }
    )
    return description


def start_report(
    folder: Path, dataset: str, labels: str, name: str, settings: RefineSettings, resume: bool
) -> dict[str, Any]:
    """The report to extend when resuming with the same settings and source, else a new one."""
    path = folder / "report.json"
    if resume and path.is_file():
        earlier = io.read_json(path)
        if earlier.get("settings") != settings.to_json() or earlier.get("source_labelset") != labels:
            raise InputError(
                f"{path}: made from {earlier.get('source_labelset')!r} with settings "
                f"{earlier.get('settings')}; run without --continue to remake the label set"
            )
        earlier.setdefault("cases", {})
        return earlier
    return {
        "labelset": name,
        "dataset": dataset,
        "source_labelset": labels,
        "settings": settings.to_json(),
        "grid": "raw (probabilities reverted from the preprocessed grid)",
        "truth_used_for": "agreement numbers only (labelsTr), never for the labels",
        "cases": {},
    }


def case_finished(folder: Path, case_id: str, report: dict[str, Any]) -> bool:
    """Finished = in the report and its label map written (the label map is written last)."""
    return case_id in report["cases"] and (folder / f"{case_id}.nii.gz").is_file()
