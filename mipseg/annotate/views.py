"""The images the page draws on: MIPs (with depth maps) and slices of channel 0, cached per case.

The page receives raw intensities (float32) and applies window/level itself, so the window can be
changed without asking the server again. The default window is the 0.5 / 99.5 percentile window
``mipseg_plan`` uses for ``mips/{case}_mip{a}.png``, so the page opens on the same picture.
Volumes are kept in a small least-recently-used cache (a 512 x 512 x 300 CT is 300 MB as float32).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from mipseg import io, paths
from mipseg.annotate.store import AnnotationStore, Target
from mipseg.errors import InputError
from mipseg.planning.mip import maximum_intensity_projection

WINDOW_PERCENTILES = (0.5, 99.5)
WINDOW_SAMPLE = 2_000_000  # voxels sampled for a volume's window percentiles
MAX_MIPS = 24  # MIP + depth pairs kept (2D, about 1.5 MB each for 512 x 512)


class CaseViews:
    """Planes, depth maps and windows of the cases of an :class:`AnnotationStore`.

    Parameters
    ----------
    max_volumes
        Volumes kept in memory at once (the case being drawn and the one before).
    """

    def __init__(self, store: AnnotationStore, max_volumes: int = 2):
        self.store = store
        self.max_volumes = max_volumes
        self._volumes: OrderedDict[str, tuple[np.ndarray, io.Geometry]] = OrderedDict()
        self._mips: OrderedDict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._windows: dict[tuple[str, str, int], tuple[float, float]] = {}
        self._lock = threading.Lock()

    def volume(self, case_id: str) -> tuple[np.ndarray, io.Geometry]:
        """Channel 0 of a case as float32 ``(z, y, x)`` and its geometry."""
        with self._lock:
            if case_id in self._volumes:
                self._volumes.move_to_end(case_id)
                return self._volumes[case_id]
            loaded = io.read_image(self.store.image_path(case_id), dtype=np.float32)
            self._volumes[case_id] = loaded
            while len(self._volumes) > self.max_volumes:
                self._volumes.popitem(last=False)
            return loaded

    def mip(self, case_id: str, axis: int) -> tuple[np.ndarray, np.ndarray]:
        """MIP and depth (index of the brightest voxel) along ``axis``, as ``mipseg_plan`` makes them."""
        key = (case_id, axis)
        if key not in self._mips:
            volume, _ = self.volume(case_id)
            mip, depth = maximum_intensity_projection(volume, axis)
            self._mips[key] = (np.ascontiguousarray(mip, np.float32), depth)
            while len(self._mips) > MAX_MIPS:
                self._mips.popitem(last=False)
        return self._mips[key]

    def plane(self, target: Target) -> np.ndarray:
        """What is drawn on: float32 ``(rows, columns)`` on the target's grid."""
        if target.kind == "mip":
            return self.mip(target.case_id, target.index)[0]
        volume, _ = self.volume(target.case_id)
        return np.ascontiguousarray(volume[target.index])

    def depth(self, target: Target) -> np.ndarray | None:
        """Depth map of a MIP target (``None`` for slices)."""
        return self.mip(target.case_id, target.index)[1] if target.kind == "mip" else None

    def window(self, target: Target) -> tuple[float, float]:
        """Default (low, high) intensity window: of the MIP, or of the whole volume for slices."""
        key = (target.case_id, target.kind, target.index if target.kind == "mip" else -1)
        if key not in self._windows:
            if target.kind == "mip":
                values = self.plane(target)
            else:
                volume, _ = self.volume(target.case_id)
                step = max(1, volume.size // WINDOW_SAMPLE)
                values = volume.ravel()[::step]
            low, high = np.percentile(values, WINDOW_PERCENTILES)
            self._windows[key] = (float(low), float(high if high > low else low + 1.0))
        return self._windows[key]

    def pixel_spacing(self, target: Target) -> tuple[float, float]:
        """Millimetres per (row, column) of the target's grid, so the page can show true proportions."""
        _, geometry = io.read_image_header(self.store.image_path(target.case_id))
        spacing = geometry.spacing_zyx
        if target.kind == "slice":
            return float(spacing[1]), float(spacing[2])
        rows, cols = (float(s) for axis, s in enumerate(spacing) if axis != target.index)
        return rows, cols

    def describe(self, target: Target) -> dict[str, Any]:
        """Grid, spacing and default window of a target (sent with its plane)."""
        rows, cols = self.store.grid(target)
        low, high = self.window(target)
        spacing = self.pixel_spacing(target)
        return {"rows": rows, "cols": cols, "low": low, "high": high, "spacing": spacing}


def suggested_slices(dataset_name: str) -> dict[str, list[int]]:
    """``{case: [slice, ...]}`` from ``mipseg_propagate --suggest N`` (empty if it has not run).

    The first slice is the best single one; ``--suggest N`` adds the others that together cover
    the organ best (``slices`` of suggested_slices.json).
    """
    path: Path = paths.preprocessed_dataset_dir(dataset_name) / "suggested_slices.json"
    if not path.is_file():
        return {}
    try:
        cases = io.read_json(path).get("cases", {})
        return {
            case: [int(index) for index in entry.get("slices", [entry["slice"]])]
            for case, entry in cases.items()
        }
    except (InputError, AttributeError, KeyError, TypeError, ValueError):
        return {}  # a broken suggestion file only loses the mark, the page still works
