"""Trained models -> class probabilities: model folder lookup, fold ensemble, test-time augmentation.

A :class:`Predictor` holds the networks of the chosen folds of one model folder
(``results/DatasetX/{trainer}__{labelset}__3d_fullres``) and predicts a preprocessed volume by
Gaussian sliding windows with mirroring, then averages the folds' **probabilities** (softmax of
each fold's logits), as the issue asks and as nnU-Net v1 did; nnU-Net v2 averages logits instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mipseg import io, paths
from mipseg.devices import resolve_device
from mipseg.errors import InputError
from mipseg.inference.engines import (
    TileRunner,
    auto_uses_openvino,
    check_precision,
    resolve_engine,
    tile_runner,
)
from mipseg.planning.plans import Plans, load_plans
from mipseg.planning.preprocessing import preprocess_case, revert_preprocessing
from mipseg.sliding_window import mirror_combinations, number_of_tiles, sliding_window_logits
from mipseg.training.checkpoint import (
    CHECKPOINT_KINDS,
    checkpoint_kind,
    checkpoint_path,
    load_checkpoint,
    network_from_checkpoint,
)

CONFIGURATION = "3d_fullres"
DEFAULT_MIRROR_AXES = (0, 1, 2)
DEFAULT_CPU_BATCH_SIZE = 2  # tiles per forward pass on CPU: larger batches gain nothing there


def list_model_folders(dataset: str | int) -> dict[tuple[str, str], Path]:
    """``{(trainer, labelset): folder}`` of every 3d_fullres model folder of a dataset."""
    root = paths.results_dataset_dir(dataset)
    found = {}
    if root.is_dir():
        for folder in sorted(root.iterdir()):
            parts = folder.name.split("__")
            if folder.is_dir() and len(parts) == 3 and parts[2] == CONFIGURATION:
                found[(parts[0], parts[1])] = folder
    return found


def _dataset_annotation(dataset: str | int, folders: dict[tuple[str, str], Path]) -> str | None:
    """The ``annotation`` of the dataset's dataset.json (raw folder first, else a model folder's copy)."""
    candidates = [paths.raw_dataset_dir(dataset) / "dataset.json"]
    candidates += [folder / "dataset.json" for folder in folders.values()]
    for candidate in candidates:
        if candidate.is_file():
            return io.read_json(candidate).get("annotation")
    return None


def resolve_model_dir(dataset: str | int, trainer: str | None = None, labels: str | None = None) -> Path:
    """The model folder to predict with, applying the defaults of ``mipseg_predict``.

    Parameters
    ----------
    trainer
        ``None``: ``"mip"`` if the dataset is MIP-annotated and a mip model exists, else ``"plain"``.
    labels
        ``None``: the only label set trained with that trainer; an error lists the choices
        when there are several.

    Raises
    ------
    InputError
        No model folder matches (the message lists what exists).
    """
    folders = list_model_folders(dataset)
    if not folders:
        raise InputError(
            f"{paths.results_dataset_dir(dataset)}: no trained model (*__*__{CONFIGURATION}); "
            "run mipseg_train first"
        )
    existing = ", ".join(f.name for f in folders.values())
    if trainer is None:
        has_mip = any(t == "mip" and (labels is None or s == labels) for t, s in folders)
        trainer = "mip" if has_mip and _dataset_annotation(dataset, folders) == "mip" else "plain"
    labelsets = sorted(s for t, s in folders if t == trainer)
    if labels is None:
        if len(labelsets) != 1:
            reason = "several label sets" if labelsets else "no label set"
            raise InputError(
                f"trainer {trainer!r} has {reason} for {paths.resolve_dataset(dataset)}; "
                f"choose one with --labels (model folders: {existing})"
            )
        labels = labelsets[0]
    if (trainer, labels) not in folders:
        raise InputError(
            f"no model folder {trainer}__{labels}__{CONFIGURATION} for {paths.resolve_dataset(dataset)} "
            f"(model folders: {existing})"
        )
    return folders[(trainer, labels)]


def find_folds(
    model_dir: Path, checkpoint: str = "final", folds: Sequence[str | int] | None = None
) -> list[str]:
    """Fold names (``"0"``..``"4"``, ``"all"``) to ensemble.

    ``folds=None`` takes every ``fold_*`` folder holding ``checkpoint_{checkpoint}.pt`` except
    ``fold_all`` (unless it is the only one); given folds must all have it.
    """
    checkpoint = checkpoint_kind(checkpoint)  # nnU-Net's -chk checkpoint_final.pth too
    if checkpoint not in CHECKPOINT_KINDS:
        raise InputError(f"--checkpoint {checkpoint}: expected one of {', '.join(CHECKPOINT_KINDS)}")
    if folds is None:
        found = [
            d.name[len("fold_") :]
            for d in sorted(model_dir.glob("fold_*"))
            if checkpoint_path(d, checkpoint).is_file()
        ]
        if not found:
            raise InputError(f"{model_dir}: no fold_* folder holds checkpoint_{checkpoint}.pt; train first")
        # like nnU-Net, fold_all (trained on every case) joins only when asked for, or when alone
        return [fold for fold in found if fold != "all"] or found
    names = [str(f) for f in folds]
    missing = [
        str(checkpoint_path(model_dir / f"fold_{n}", checkpoint))
        for n in names
        if not checkpoint_path(model_dir / f"fold_{n}", checkpoint).is_file()
    ]
    if missing:
        raise InputError([f"{m}: checkpoint not found (fold not trained?)" for m in missing])
    return names


class Predictor:
    """Fold ensemble of one trained configuration, predicting whole volumes.

    Parameters
    ----------
    networks
        One network per fold (eval mode, single full-resolution output ``(B, K, z, y, x)``).
    plans
        The plans the networks were trained with (patch, spacing, normalization).
    dataset_json
        The dataset's dataset.json (labels, channels, file ending).
    mirror_axes
        Spatial axes for mirroring test-time augmentation; ``None`` or ``()`` disables it.
    tile_step_size
        Sliding-window step as a fraction of the patch (0.5 = nnU-Net's default).
    batch_size
        Tiles per forward pass; ``None``: the plans' batch size on CUDA, 2 on CPU.
    device
        ``"auto"``, ``"cpu"``, ``"cuda"`` or a torch device.
    engine
        What runs the network on CPU: ``"auto"`` (OpenVINO when installed, else torch),
        ``"torch"`` or ``"openvino"`` (see :mod:`mipseg.inference.engines`); CUDA always uses torch.
        ``"auto"`` keeps torch for a first volume needing fewer than
        :data:`~mipseg.inference.engines.AUTO_OPENVINO_MIN_PASSES` passes per fold unless the
        conversion is cached; :attr:`engine` says what ran.
    precision
        ``"float32"`` or ``"bfloat16"`` (CPU: torch autocast or OpenVINO's inference precision).
    """

    def __init__(
        self,
        networks: Sequence[torch.nn.Module],
        plans: Plans,
        dataset_json: dict[str, Any],
        *,
        mirror_axes: Sequence[int] | None = DEFAULT_MIRROR_AXES,
        tile_step_size: float = 0.5,
        batch_size: int | None = None,
        device: str | torch.device = "auto",
        engine: str = "auto",
        precision: str = "float32",
    ) -> None:
        if not networks:
            raise ValueError("a Predictor needs at least one network")
        self.device = resolve_device(device)
        self.networks = [network.to(self.device).eval() for network in networks]
        self.plans = plans
        self.dataset_json = dataset_json
        self.mirror_axes = tuple(mirror_axes) if mirror_axes else ()
        self.tile_step_size = float(tile_step_size)
        default_batch = plans.batch_size if self.device.type == "cuda" else DEFAULT_CPU_BATCH_SIZE
        self.batch_size = int(batch_size or default_batch)
        self.num_classes = plans.num_classes
        self.engine = resolve_engine(engine, self.device)
        self._auto = engine == "auto"
        self.precision = check_precision(precision)
        self._runners: list[TileRunner] | None = None

    def runners(self, preprocessed_shape: Sequence[int] | None = None) -> list[TileRunner]:
        """One tile runner per fold for :attr:`engine` (built on first use: OpenVINO converts then).

        ``preprocessed_shape`` ``(z, y, x)`` of the first volume lets ``engine="auto"`` skip the
        conversion for a small one (see the class docstring).
        """
        if self._runners is None:
            batch_shape = (self.batch_size, int(self.plans.num_channels), *self.plans.patch_size)
            if self._auto and self.engine == "openvino" and preprocessed_shape is not None:
                passes = number_of_tiles(preprocessed_shape, self.plans.patch_size, self.tile_step_size)
                passes *= len(mirror_combinations(self.mirror_axes))
                if not auto_uses_openvino(self.networks, batch_shape, self.precision, passes):
                    self.engine = "torch"
            self._runners = [
                tile_runner(network, self.engine, self.precision, batch_shape, self.device)
                for network in self.networks
            ]
        return self._runners

    @classmethod
    def from_model_folder(
        cls,
        model_dir: str | Path,
        folds: Sequence[str | int] | None = None,
        checkpoint: str = "final",
        *,
        use_mirroring: bool = True,
        **kwargs: Any,
    ) -> Predictor:
        """Load the chosen folds of ``model_dir`` (its ``plans.json``, ``dataset.json``, checkpoints).

        Mirror axes come from the first checkpoint's ``mirror_axes`` if the trainer stored them,
        else ``(0, 1, 2)``; ``use_mirroring=False`` disables test-time augmentation.
        """
        model_dir = Path(model_dir)
        plans = load_plans(model_dir / "plans.json")
        dataset_json = io.read_json(model_dir / "dataset.json")
        networks, mirror_axes = [], DEFAULT_MIRROR_AXES
        checkpoint = checkpoint_kind(checkpoint)
        for index, fold in enumerate(find_folds(model_dir, checkpoint, folds)):
            loaded = load_checkpoint(checkpoint_path(model_dir / f"fold_{fold}", checkpoint))
            if index == 0 and loaded.get("mirror_axes") is not None:
                mirror_axes = tuple(int(a) for a in loaded["mirror_axes"])
            networks.append(network_from_checkpoint(loaded, deep_supervision=False))
        return cls(networks, plans, dataset_json, mirror_axes=mirror_axes if use_mirroring else (), **kwargs)

    def number_of_tiles(self, preprocessed_shape: Sequence[int]) -> int:
        """Forward passes (tiles x folds, mirrors not counted) for a preprocessed ``(z, y, x)`` shape."""
        return len(self.networks) * number_of_tiles(
            preprocessed_shape, self.plans.patch_size, self.tile_step_size
        )

    def predict_fold_probabilities(
        self, data: np.ndarray, on_tiles_done: Callable[[int], None] | None = None
    ) -> list[np.ndarray]:
        """Softmax probabilities of each fold separately, each float32 ``(K, z, y, x)``."""
        return [
            self._fold_probabilities(runner, data, on_tiles_done).cpu().numpy()
            for runner in self.runners(data.shape[1:])
        ]

    def predict_preprocessed(
        self, data: np.ndarray, on_tiles_done: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """Ensemble probabilities of a preprocessed volume.

        Parameters
        ----------
        data : np.ndarray float32, shape (C, z, y, x)
            As :func:`mipseg.planning.preprocessing.preprocess_case` returns it.
        on_tiles_done
            Progress callback, called with the number of tiles finished.

        Returns
        -------
        np.ndarray float32, shape (K, z, y, x)
            Mean over folds of the softmax of each fold's sliding-window logits.
        """
        expected = int(self.plans.num_channels)
        if data.ndim != 4 or data.shape[0] != expected:
            raise ValueError(f"expected preprocessed data (C={expected}, z, y, x), got shape {data.shape}")
        total = None
        for runner in self.runners(data.shape[1:]):
            probabilities = self._fold_probabilities(runner, data, on_tiles_done)
            total = probabilities if total is None else total.add_(probabilities)
        return total.div_(len(self.networks)).cpu().numpy()

    def predict_case(
        self,
        images: np.ndarray,
        geometry: io.Geometry,
        on_tiles_done: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Probabilities of one raw case on its own grid.

        Parameters
        ----------
        images : np.ndarray, shape (C, Z, Y, X)
            Raw channels (any numeric dtype).
        geometry
            Geometry of the raw image.

        Returns
        -------
        np.ndarray float32, shape (K, Z, Y, X)
            Background has probability 1 outside the nonzero bounding box.
        """
        data, _, properties = preprocess_case(images.astype(np.float32, copy=False), geometry, self.plans)
        probabilities = self.predict_preprocessed(data, on_tiles_done)
        return revert_preprocessing(probabilities, properties, self.plans)

    def _fold_probabilities(
        self, runner: TileRunner, data: np.ndarray, on_tiles_done: Callable[[int], None] | None
    ) -> torch.Tensor:
        logits = sliding_window_logits(
            runner,
            torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)),
            self.plans.patch_size,
            self.num_classes,
            tile_step_size=self.tile_step_size,
            mirror_axes=self.mirror_axes,
            batch_size=self.batch_size,
            device=self.device,
            on_tiles_done=on_tiles_done,
        )
        return torch.softmax(logits, dim=0)


def load_predictor(model_dirs: Sequence[Path], settings: Any, device: str) -> Predictor:
    """One :class:`Predictor` over the chosen folds of every model folder (all must share the plans).

    ``settings`` is a :class:`mipseg.inference.predict_api.PredictionSettings`; the folds of all
    folders are averaged together (equal fold counts: the mean of the models' means).
    """
    predictors = [
        Predictor.from_model_folder(
            model_dir,
            settings.folds,
            settings.checkpoint,
            use_mirroring=settings.tta,
            tile_step_size=settings.step_size,
            batch_size=settings.batch_size,
            device=device,
            engine=settings.engine,
            precision=settings.precision,
        )
        for model_dir in model_dirs
    ]
    first = predictors[0]
    if len(predictors) == 1:
        return first
    for model_dir, other in zip(model_dirs[1:], predictors[1:]):
        if other.plans.to_json() != first.plans.to_json() or other.mirror_axes != first.mirror_axes:
            raise InputError(
                f"{model_dir}: plans or mirror axes differ from {model_dirs[0]}; cannot ensemble"
            )
    return Predictor(
        [network for predictor in predictors for network in predictor.networks],
        first.plans,
        first.dataset_json,
        mirror_axes=first.mirror_axes,
        tile_step_size=settings.step_size,
        batch_size=settings.batch_size,
        device=device,
        engine=settings.engine,
        precision=settings.precision,
    )
