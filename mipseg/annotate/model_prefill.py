"""A trained model's predictions of the training cases, as starting drawings and as a case order.

Predicting a case on a CPU takes seconds to minutes, so a background thread predicts every
training case once (fold ensemble, no mirroring: a starting drawing does not need TTA) and caches
the result under ``preprocessed/{dataset}/annotate/{model folder}/{case}.npz``:

* ``labels``: uint8 ``(Z, Y, X)`` argmax on the raw grid (projected per target on request);
* ``expected``: JSON ``{"mip{a}": pixels, "slices": [pixels per slice]}``, the number of pixels a
  person is expected to change on each drawing (:func:`mipseg.annotate.prefill.expected_changes`);
* ``stamp``: the checkpoints' and the image's modification times: a retrained model or a
  replaced image makes the entry stale and it is predicted again.

Cases are predicted in the page's order; the page polls :meth:`ModelPrefill.status` to show
progress and re-sorts the case list as the expected changes arrive (least sure first).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mipseg import io, paths
from mipseg.annotate.prefill import expected_changes
from mipseg.annotate.store import AnnotationStore
from mipseg.errors import InputError
from mipseg.inference.predictor import Predictor, find_folds
from mipseg.planning.mip import maximum_intensity_projection
from mipseg.planning.preprocessing import preprocess_case, revert_preprocessing
from mipseg.training.checkpoint import checkpoint_path

CACHE_FOLDER = "annotate"


class _Stopped(Exception):
    """Raised inside the tile callback when the server shuts down."""


class ModelPrefill:
    """Background predictions of one model folder for the cases of ``store``.

    Parameters
    ----------
    model_dir
        ``results/{dataset}/{trainer}__{labelset}__3d_fullres``.
    folds, checkpoint, device
        As ``mipseg_predict`` (``None``: every trained fold; ``"final"``; ``"auto"``).
    """

    def __init__(
        self,
        store: AnnotationStore,
        model_dir: Path,
        *,
        folds: Sequence[str | int] | None = None,
        checkpoint: str = "final",
        device: str = "auto",
    ):
        self.store = store
        self.model_dir = Path(model_dir)
        self.name = self.model_dir.name
        self.folds = find_folds(self.model_dir, checkpoint, folds)
        self.checkpoint = checkpoint
        self.device = device
        self.cache_dir = paths.preprocessed_dataset_dir(store.dataset.name) / CACHE_FOLDER / self.name
        self.error: str | None = None
        self._cases: dict[str, dict[str, Any]] = {
            case: {"state": "waiting", "progress": 0.0, "expected": None, "error": None}
            for case in store.case_ids
        }
        self._labels: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._predictor: Predictor | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, order: Sequence[str] | None = None) -> None:
        """Read fresh cache entries, then predict the other cases in ``order``, in a thread."""
        order = list(order or self.store.case_ids)
        self._thread = threading.Thread(target=self._run, args=(order,), name="mipseg-prefill", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the thread to stop (it checks between tiles) and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every case is done (tests, benchmark); True if the thread finished."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self._thread is None or not self._thread.is_alive()

    def _run(self, order: list[str]) -> None:
        missing = []
        for case_id in order:
            if not self._load_cached(case_id):
                missing.append(case_id)
        for case_id in missing:
            if self._stop.is_set():
                return
            try:
                self._predict(case_id)
            except _Stopped:
                return
            except InputError as error:
                self._set(case_id, state="failed", error=error.problems[0])
            except Exception as error:  # one bad case (or a missing fold) must not end the thread
                self._set(case_id, state="failed", error=f"{type(error).__name__}: {error}")
                if self._predictor is None:
                    self.error = f"model {self.name} could not be loaded: {error}"
                    return

    # --- results -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Model name, overall state and per-case state (waiting / predicting / ready / failed)."""
        with self._lock:
            cases = {case: dict(entry) for case, entry in self._cases.items()}
        ready = sum(entry["state"] in ("ready", "failed") for entry in cases.values())
        state = "failed" if self.error else ("ready" if ready == len(cases) else "predicting")
        return {"model": self.name, "state": state, "error": self.error, "done": ready, "cases": cases}

    def labels(self, case_id: str) -> np.ndarray | None:
        """Predicted ``(Z, Y, X)`` classes of a case, or ``None`` while it is not predicted yet."""
        with self._lock:
            if self._cases[case_id]["state"] != "ready":
                return None
            if case_id in self._labels:
                self._labels.move_to_end(case_id)
                return self._labels[case_id]
        with np.load(self._cache_path(case_id)) as stored:
            labels = stored["labels"]
        with self._lock:
            self._labels[case_id] = labels
            while len(self._labels) > 2:
                self._labels.popitem(last=False)
        return labels

    def case_expected_changes(self, case_id: str, suggested_slice: int | None = None) -> float | None:
        """Expected pixels to change on the case's drawings: MIP axes summed; the suggested (else
        the most uncertain) slice in slice mode. ``None`` while unknown."""
        with self._lock:
            expected = self._cases[case_id]["expected"]
        if expected is None:
            return None
        if self.store.spec.annotation == "mip":
            return float(sum(expected[f"mip{axis}"] for axis in self.store.spec.mip_axes))
        slices = expected["slices"]
        if suggested_slice is not None and 0 <= suggested_slice < len(slices):
            return float(slices[suggested_slice])
        return float(max(slices))

    # --- work --------------------------------------------------------------------------------

    def _cache_path(self, case_id: str) -> Path:
        return self.cache_dir / f"{case_id}.npz"

    def _stamp(self, case_id: str) -> str:
        files = [checkpoint_path(self.model_dir / f"fold_{fold}", self.checkpoint) for fold in self.folds]
        files.append(self.store.image_path(case_id))
        return ";".join(f"{path.name}:{path.stat().st_mtime_ns}" for path in files)

    def _load_cached(self, case_id: str) -> bool:
        path = self._cache_path(case_id)
        if not path.is_file():
            return False
        try:
            with np.load(path) as stored:
                if str(stored["stamp"]) != self._stamp(case_id):
                    return False
                expected = json.loads(str(stored["expected"]))
        except (OSError, KeyError, ValueError):
            return False  # unreadable or from an older layout: predict again
        self._set(case_id, state="ready", progress=1.0, expected=expected)
        return True

    def _predict(self, case_id: str) -> None:
        self._set(case_id, state="predicting", progress=0.0)
        if self._predictor is None:
            self._predictor = Predictor.from_model_folder(
                self.model_dir, self.folds, self.checkpoint, use_mirroring=False, device=self.device
            )
        predictor = self._predictor
        case = self.store.dataset.case(case_id)
        channels = [io.read_image(path, dtype=np.float32) for path in case.images]
        images, geometry = np.stack([array for array, _ in channels]), channels[0][1]
        data, _, properties = preprocess_case(images, geometry, predictor.plans)
        total = max(1, predictor.number_of_tiles(data.shape[1:]))
        done = [0]

        def on_tiles_done(count: int) -> None:
            if self._stop.is_set():
                raise _Stopped
            done[0] += count
            self._set(case_id, progress=min(0.99, done[0] / total))

        probabilities = revert_preprocessing(
            predictor.predict_preprocessed(data, on_tiles_done), properties, predictor.plans
        )
        expected = self._expected(images[0], probabilities)
        labels = probabilities.argmax(axis=0).astype(np.uint8)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with io.atomic_path(self._cache_path(case_id)) as tmp, open(tmp, "wb") as handle:
            np.savez_compressed(
                handle, labels=labels, expected=json.dumps(expected), stamp=self._stamp(case_id)
            )
        self._set(case_id, state="ready", progress=1.0, expected=expected)

    def _expected(self, volume: np.ndarray, probabilities: np.ndarray) -> dict[str, Any]:
        """Expected changes per MIP axis (probabilities of the brightest voxels) and per slice."""
        expected: dict[str, Any] = {
            "slices": [expected_changes(probabilities[:, k]) for k in range(probabilities.shape[1])]
        }
        if self.store.spec.annotation == "mip":
            for axis in self.store.spec.mip_axes:
                _, depth = maximum_intensity_projection(volume, axis)
                index = np.expand_dims(depth.astype(np.intp), (0, axis + 1))
                plane = np.take_along_axis(probabilities, index, axis=axis + 1).squeeze(axis + 1)
                expected[f"mip{axis}"] = expected_changes(plane)
        return expected

    def _set(self, case_id: str, **values: Any) -> None:
        with self._lock:
            self._cases[case_id].update(values)
