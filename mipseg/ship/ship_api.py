"""The ship stage behind ``mipseg_export_model`` and ``mipseg_install_model``.

Export packs a trained model (plans, dataset.json, the chosen checkpoint of the chosen folds, the
postprocessing decision) into one zip with a manifest of checksums
(:mod:`mipseg.inference.model_package` describes the layout and does the checking); install
checks a package and unpacks it under ``MIPSEG_RESULTS``, where ``mipseg_predict -d`` finds it.
"""

from __future__ import annotations

import datetime
import json
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from mipseg import __version__, io, paths
from mipseg.errors import InputError
from mipseg.inference.model_package import FORMAT_VERSION, MANIFEST, extract, read_manifest, sha256_of
from mipseg.inference.postprocessing import DECISION_FILE
from mipseg.inference.predictor import find_folds, resolve_model_dir
from mipseg.selection.selection_api import BEST_CONFIGURATION_FILE


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
    manifest = {
        "format_version": FORMAT_VERSION,
        "mipseg_version": __version__,
        "dataset": paths.resolve_dataset(dataset),
        "models": [model_dir.relative_to(root).as_posix() for model_dir in model_dirs],
        "folds": fold_names,
        "checkpoint": checkpoint,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "files": {
            f.relative_to(root).as_posix(): {"sha256": sha256_of(f), "bytes": f.stat().st_size} for f in files
        },
    }
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(output) as tmp:
        # checkpoints barely compress; storing them keeps export and install fast
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(MANIFEST, json.dumps(manifest, indent=2))
            for f in files:
                kind = zipfile.ZIP_STORED if f.suffix == ".pt" else zipfile.ZIP_DEFLATED
                archive.write(f, f.relative_to(root).as_posix(), compress_type=kind)
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
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            source.rename(target)
    return targets
