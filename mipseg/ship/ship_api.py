"""The ship stage behind ``mipseg_export_model`` and ``mipseg_install_model``.

Export packs a trained model (plans, dataset.json, the chosen checkpoint of the chosen folds, the
postprocessing decision) into one zip with a manifest of checksums
(:mod:`mipseg.inference.model_package` describes the layout and does the checking); install
checks a package and unpacks it under ``MIPSEG_RESULTS``, where ``mipseg_predict -d`` finds it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

import torch

from mipseg import __version__, io, paths
from mipseg.errors import InputError
from mipseg.inference.model_package import FORMAT_VERSION, MANIFEST, extract, read_manifest
from mipseg.inference.postprocessing import DECISION_FILE
from mipseg.inference.predictor import find_folds, resolve_model_dir
from mipseg.selection.selection_api import BEST_CONFIGURATION_FILE
from mipseg.training.checkpoint import load_checkpoint

# checkpoint keys prediction never reads (mipseg.training.checkpoint lists them all)
TRAINING_ONLY_KEYS = ("optimizer_state", "grad_scaler_state", "rng_state", "mip_branch_weights")


def chosen_models(dataset: str | int, trainer: str | None, labels: str | None) -> list[Path]:
    """Model folders to export.

    ``trainer`` or ``labels`` given: that model (``mipseg_predict``'s defaults fill the other).
    Neither: the winner of ``mipseg_find_best_configuration`` (one model or an ensemble) when
    ``results/{Dataset}/best_configuration.json`` exists, else ``mipseg_predict``'s default model.
    """
    best = paths.results_dataset_dir(dataset) / BEST_CONFIGURATION_FILE
    if trainer is None and labels is None and best.is_file():
        root = paths.results_dataset_dir(dataset)
        folders = [root / name for name in io.read_json(best)["best"]["models"]]
        missing = [str(f) for f in folders if not f.is_dir()]
        if missing:
            raise InputError(f"{best} names model folder {missing[0]}, which does not exist")
        return folders
    return [resolve_model_dir(dataset, trainer, labels)]


def _package_files(model_dir: Path, folds: list[str], checkpoint: str) -> list[Path]:
    files = [model_dir / "plans.json", model_dir / "dataset.json"]
    if (model_dir / DECISION_FILE).is_file():
        files.append(model_dir / DECISION_FILE)
    files += [model_dir / f"fold_{fold}" / f"checkpoint_{checkpoint}.pt" for fold in folds]
    return files


def prediction_checkpoint(path: Path) -> bytes:
    """A checkpoint without what only training needs (optimizer, grad scaler, RNG, MIP branch).

    The momentum buffers alone are as large as the weights: the package is about half the size
    of the training checkpoints. The network weights are the same bytes, so predictions are too.
    """
    stored = load_checkpoint(path)
    for key in TRAINING_ONLY_KEYS:
        stored.pop(key, None)
    buffer = BytesIO()
    torch.save(stored, buffer)
    return buffer.getvalue()


def export_model(
    dataset: str | int,
    output: str | Path,
    *,
    trainer: str | None = None,
    labels: str | None = None,
    folds: Sequence[str | int] | None = None,
    checkpoint: str = "final",
) -> Path:
    """Write ``output`` (a zip): everything ``mipseg_predict -m`` needs and nothing else.

    Parameters
    ----------
    dataset
        Dataset id or name (its results tree).
    output
        The zip to write (atomically; an existing file is replaced).
    trainer, labels
        Which model (see :func:`chosen_models`).
    folds
        Folds to include (``None``: every trained fold, as ``mipseg_predict``).
    checkpoint
        ``final``, ``best`` or ``latest``.

    Returns
    -------
    Path of the zip.
    """
    model_dirs = chosen_models(dataset, trainer, labels)
    fold_names = find_folds(model_dirs[0], checkpoint, folds)
    for model_dir in model_dirs[1:]:
        find_folds(model_dir, checkpoint, fold_names)  # every member must hold the same folds
    root = paths.results_dataset_dir(dataset).parent
    files = [f for model_dir in model_dirs for f in _package_files(model_dir, fold_names, checkpoint)]
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "mipseg_version": __version__,
        "dataset": paths.resolve_dataset(dataset),
        "models": [model_dir.relative_to(root).as_posix() for model_dir in model_dirs],
        "folds": fold_names,
        "checkpoint": checkpoint,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "files": {},
    }
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(output) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for f in files:  # one file in memory at a time; the manifest goes last
                data = prediction_checkpoint(f) if f.suffix == ".pt" else f.read_bytes()
                name = f.relative_to(root).as_posix()
                manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                # checkpoints barely compress; storing them keeps export and install fast
                kind = zipfile.ZIP_STORED if f.suffix == ".pt" else zipfile.ZIP_DEFLATED
                archive.writestr(name, data, compress_type=kind)
            archive.writestr(MANIFEST, json.dumps(manifest, indent=2))
    return output


def install_model(package: str | Path, *, force: bool = False) -> list[Path]:
    """Check a package and unpack its model folders under ``MIPSEG_RESULTS``.

    Parameters
    ----------
    package
        A zip written by :func:`export_model`.
    force
        Replace model folders that already exist (otherwise: an error, nothing written).

    Returns
    -------
    The installed model folders (``MIPSEG_RESULTS/{Dataset}/{model}``).

    Raises
    ------
    InputError
        A bad package (see :func:`mipseg.inference.model_package.read_manifest`) or an existing
        model folder without ``force``.
    """
    manifest = read_manifest(Path(package))
    root = paths.results_root()
    targets = [root / model for model in manifest["models"]]
    existing = [t for t in targets if t.exists()]
    if existing and not force:
        raise InputError(f"{existing[0]} exists; pass --force to replace it")
    root.mkdir(parents=True, exist_ok=True)
    # unpack next to the destination, then swap folders: an interrupted install leaves no half model
    with tempfile.TemporaryDirectory(prefix=".mipseg-install-", dir=root) as staging:
        _, unpacked = extract(Path(package), Path(staging))
        for source, target in zip(unpacked, targets):
            # the old model moves aside and is deleted only once the new one is in place: an
            # interruption between the two renames leaves it whole as .{name}.old
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            if target.exists():
                target.rename(old)
            target.parent.mkdir(parents=True, exist_ok=True)
            source.rename(target)
            shutil.rmtree(old, ignore_errors=True)
    return targets
