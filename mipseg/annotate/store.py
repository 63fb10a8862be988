"""Annotation files of one dataset as the page sees them: targets, states, saves, history.

A *target* is one drawing: ``(case, "mip", axis)`` or ``(case, "slice", k)``, stored as
``annotationsTr/{case}_mip{axis}.png`` / ``{case}_slice{k}.png``. Only targets of the dataset
exist: an unknown case, a kind other than the dataset's annotation mode, an axis outside
``mip_axes`` or a slice outside the volume is refused, so no request can name another file.

A save is checked first (grid size, class values, not an empty MIP), then, under a per-file lock, the
file on disk is compared with the version the page started from (another tab may have saved in
between), the previous version is copied to ``annotationsTr/.history/{name}.{UTC time}.png`` and
the new drawing is written to a temporary file and renamed over the old one: a reader sees the old
file or the new one, never half of either.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from mipseg import io
from mipseg.annotation_png import check_annotation_png, read_annotation
from mipseg.dataset import Dataset
from mipseg.errors import InputError

HISTORY_FOLDER = ".history"
_INDEX = re.compile(r"^\d{1,6}$")
_HISTORY_STAMP = re.compile(r"^\d{8}T\d{6}\.\d{6}Z$")


class Refused(Exception):
    """A request for a case, kind, axis, slice or version that the dataset does not have."""


class Conflict(Exception):
    """The file changed since the page loaded it (another tab or program saved)."""

    def __init__(self, message: str, version: str):
        super().__init__(message)
        self.version = version


@dataclass(frozen=True)
class Target:
    """One drawing: ``kind`` is ``"mip"`` (``index`` = numpy axis) or ``"slice"`` (slice along axis 0)."""

    case_id: str
    kind: str
    index: int

    @property
    def file_name(self) -> str:
        return f"{self.case_id}_{self.kind}{self.index}.png"

    @property
    def stem(self) -> str:
        return self.file_name[: -len(".png")]


def file_version(path: Path) -> str:
    """Short content hash of a file, ``""`` if it does not exist (what a save must start from)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except FileNotFoundError:
        return ""


class AnnotationStore:
    """The annotation files of a loaded dataset (``mipseg.dataset.Dataset``)."""

    def __init__(self, dataset: Dataset):
        if dataset.spec.annotation not in ("mip", "slice"):
            raise InputError(
                f'{dataset.folder / "dataset.json"}: no \'annotation\' mode ("mip" or "slice"); '
                "set one to say what to draw"
            )
        self.dataset = dataset
        self.spec = dataset.spec
        self.folder = dataset.folder / "annotationsTr"
        self.history_folder = self.folder / HISTORY_FOLDER
        self.class_values = sorted(self.spec.class_labels.values())
        if max(self.class_values) > 255:
            raise InputError(f"{dataset.folder / 'dataset.json'}: more than 255 labels; the page saves 8-bit")
        self._cases = {case.case_id: case for case in dataset.cases}
        self._shapes: dict[str, tuple[int, int, int]] = {}
        self._states: dict[Path, tuple[tuple[int, int], dict[str, Any]]] = {}
        self._locks: dict[Path, threading.Lock] = {}
        self._guard = threading.Lock()
        self._pattern = re.compile(r"^(?P<case>.+)_" + self.spec.annotation + r"(?P<index>\d+)\.png$")

    # --- what exists -------------------------------------------------------------------------

    @property
    def case_ids(self) -> list[str]:
        return list(self._cases)

    def image_path(self, case_id: str) -> Path:
        """Channel 0 of a case (what MIPs and slices are made of)."""
        return self._case(case_id).images[0]

    def image_shape(self, case_id: str) -> tuple[int, int, int]:
        """``(z, y, x)`` of a case, from the image header (cached)."""
        if case_id not in self._shapes:
            self._shapes[case_id] = io.read_image_header(self.image_path(case_id))[0]
        return self._shapes[case_id]

    def target(self, case_id: str, kind: str, index: str | int) -> Target:
        """The target named by a request, or :class:`Refused`."""
        self._case(case_id)
        if kind != self.spec.annotation:
            raise Refused(f"kind {kind!r}: this dataset is annotated in {self.spec.annotation!r} mode")
        if not _INDEX.match(str(index)):
            raise Refused(f"{kind} index {index!r} is not a number")
        index = int(index)
        if kind == "mip" and index not in self.spec.mip_axes:
            raise Refused(f"axis {index} is not in dataset.json mip_axes {list(self.spec.mip_axes)}")
        if kind == "slice" and not 0 <= index < self.image_shape(case_id)[0]:
            raise Refused(f"slice {index} is outside the {self.image_shape(case_id)[0]} slices of {case_id}")
        return Target(case_id, kind, index)

    def grid(self, target: Target) -> tuple[int, int]:
        """``(rows, columns)`` every drawing of ``target`` must have."""
        shape = self.image_shape(target.case_id)
        if target.kind == "slice":
            return shape[1], shape[2]
        rows, cols = (s for axis, s in enumerate(shape) if axis != target.index)
        return rows, cols

    def path(self, target: Target) -> Path:
        return self.folder / target.file_name

    def drawn_targets(self, case_id: str) -> list[Target]:
        """Targets of a case with a file on disk (the page may have added slices since start)."""
        self._case(case_id)
        found = []
        if self.folder.is_dir():
            for path in self.folder.iterdir():
                match = self._pattern.match(path.name)
                if match and match["case"] == case_id and path.is_file():
                    found.append(Target(case_id, self.spec.annotation, int(match["index"])))
        return sorted(found, key=lambda t: t.index)

    def state(self, target: Target) -> dict[str, Any]:
        """``{"state": "none" | "invalid" | "valid", "problem": str | None, "version": str}``.

        ``valid`` means the file passes the check ``mipseg_validate`` applies to it.
        """
        path = self.path(target)
        try:
            stat = path.stat()
        except FileNotFoundError:
            return {"state": "none", "problem": None, "version": ""}
        key = (stat.st_mtime_ns, stat.st_size)
        cached = self._states.get(path)
        if cached is None or cached[0] != key:
            problems = check_annotation_png(path, self.spec, self.image_shape(target.case_id), target.index)
            state = {
                "state": "invalid" if problems else "valid",
                "problem": problems[0] if problems else None,
                "version": file_version(path),
            }
            self._states[path] = (key, state)
            return state
        return cached[1]

    def case_summary(self, case_id: str) -> dict[str, Any]:
        """States of every axis (mip mode) or every drawn slice (slice mode) of one case."""
        if self.spec.annotation == "mip":
            targets = [Target(case_id, "mip", axis) for axis in self.spec.mip_axes]
        else:
            targets = self.drawn_targets(case_id)
        entries = [{"index": t.index, **self.state(t)} for t in targets]
        states = {e["state"] for e in entries}
        if self.spec.annotation == "slice" and not entries:
            overall = "none"
        elif states == {"valid"}:
            overall = "valid"
        elif "invalid" in states:
            overall = "invalid"
        elif "valid" in states:
            overall = "partial"
        else:
            overall = "none"
        return {"case": case_id, "state": overall, "targets": entries, "shape": self.image_shape(case_id)}

    # --- reading -----------------------------------------------------------------------------

    def load(self, target: Target) -> tuple[np.ndarray | None, str, str | None]:
        """Classes of the file, its version and its problem (classes is ``None`` if unreadable)."""
        path = self.path(target)
        version = file_version(path)
        if not version:
            return None, "", None
        try:
            classes = read_annotation(path, self.spec)
        except InputError as error:
            return None, version, error.problems[0]
        if classes.shape != self.grid(target):
            return None, version, f"{path}: size {classes.shape} is not the grid {self.grid(target)}"
        return classes, version, None

    def history(self, target: Target) -> list[str]:
        """Saved-over versions of a target, newest first (``.history/{name}.{stamp}.png``)."""
        if not self.history_folder.is_dir():
            return []
        prefix = target.stem + "."
        stamps = [
            p.name[len(prefix) : -len(".png")]
            for p in self.history_folder.iterdir()
            if p.name.startswith(prefix) and p.name.endswith(".png")
        ]
        return sorted((s for s in stamps if _HISTORY_STAMP.match(s)), reverse=True)

    def load_history(self, target: Target, stamp: str) -> np.ndarray:
        """Classes of one saved-over version, or :class:`Refused`."""
        if stamp not in self.history(target):
            raise Refused(f"no saved version {stamp!r} of {target.file_name}")
        classes = read_annotation(self.history_folder / f"{target.stem}.{stamp}.png", self.spec)
        if classes.shape != self.grid(target):
            raise Refused(f"saved version {stamp} of {target.file_name} has another grid")
        return classes

    # --- writing -----------------------------------------------------------------------------

    def check_drawing(self, target: Target, data: bytes, rows: int, cols: int) -> np.ndarray:
        """A drawing sent by the page as ``rows * cols`` class bytes, checked; or :class:`InputError`."""
        expected = self.grid(target)
        if (rows, cols) != expected:
            raise InputError(
                f"{target.file_name}: drawing is {rows} x {cols}, the {target.kind} grid is "
                f"{expected[0]} x {expected[1]}"
            )
        if len(data) != rows * cols:
            raise InputError(f"{target.file_name}: {len(data)} bytes sent, {rows * cols} expected")
        classes = np.frombuffer(data, dtype=np.uint8).reshape(rows, cols)
        unknown = sorted(set(np.unique(classes).tolist()) - set(self.class_values))
        if unknown:
            raise InputError(f"{target.file_name}: values {unknown} are not labels {self.class_values}")
        if not classes.any() and target.kind != "slice":  # an empty slice says "no organ here"
            raise InputError(f"{target.file_name}: nothing drawn; an empty annotation is not saved")
        return classes

    def save(self, target: Target, classes: np.ndarray, base_version: str, force: bool = False) -> dict:
        """Write a checked drawing; keep the previous file in ``.history/``. Returns the new state.

        Raises
        ------
        Conflict
            The file is no longer ``base_version`` (and ``force`` is off).
        """
        path = self.path(target)
        with self._lock(path):
            current = file_version(path)
            if current != base_version and not force:
                raise Conflict(f"{target.file_name} was saved elsewhere since this page loaded it", current)
            if current:
                self._keep_previous(target, path)
            io.write_png(np.ascontiguousarray(classes, dtype=np.uint8), path)
        return self.state(target)

    def delete(self, target: Target, base_version: str, force: bool = False) -> dict:
        """Move the file to ``.history/`` (a case without it is "not started" again)."""
        path = self.path(target)
        with self._lock(path):
            current = file_version(path)
            if not current:
                raise Refused(f"{target.file_name} does not exist")
            if current != base_version and not force:
                raise Conflict(f"{target.file_name} was saved elsewhere since this page loaded it", current)
            self.history_folder.mkdir(parents=True, exist_ok=True)
            path.replace(self._history_path(target))
        return self.state(target)

    def _keep_previous(self, target: Target, path: Path) -> None:
        self.history_folder.mkdir(parents=True, exist_ok=True)
        destination = self._history_path(target)
        with io.atomic_path(destination) as tmp:
            shutil.copy2(path, tmp)

    def _history_path(self, target: Target) -> Path:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        return self.history_folder / f"{target.stem}.{stamp}.png"

    def _lock(self, path: Path) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(path, threading.Lock())

    def _case(self, case_id: str):
        case = self._cases.get(case_id)
        if case is None:
            raise Refused(f"case {case_id!r} is not a training case of {self.dataset.name}")
        return case
