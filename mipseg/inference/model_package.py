"""Model packages: one zip with everything prediction needs, checked before anything is used.

Layout of ``model.zip`` (written by ``mipseg_export_model``, read by ``mipseg_install_model`` and
``mipseg_predict -m``)::

    manifest.json                            format, mipseg version, dataset, models, checksums
    {Dataset}/{trainer}__{labels}__3d_fullres/
        plans.json  dataset.json             the contract the networks were trained with
        postprocessing.json                  the postprocessing decision (when one was made)
        fold_{k}/checkpoint_{kind}.pt        the chosen checkpoint of each chosen fold

Several model folders in one package form an ensemble (their folds are averaged together).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from mipseg import __version__, io
from mipseg.errors import InputError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1  # bump when the layout changes; a package of another format is refused


def version_problem(package_version: str, current: str = __version__) -> str | None:
    """Why a package written by mipseg ``package_version`` cannot be used by ``current``, or None.

    Same major and minor version required (0.x: every minor release may change checkpoints).
    """
    try:
        wanted = tuple(int(part) for part in str(package_version).split(".")[:2])
        have = tuple(int(part) for part in current.split(".")[:2])
    except ValueError:
        return f"mipseg version {package_version!r} is not a version number"
    if wanted != have:
        return f"made by mipseg {package_version}, this is mipseg {current} (needs {wanted[0]}.{wanted[1]}.x)"
    return None


def _safe_member(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return bool(parts) and not PurePosixPath(name).is_absolute() and ".." not in parts


def read_manifest(package: Path) -> dict[str, Any]:
    """Open a package and check it completely; returns its manifest.

    Raises
    ------
    InputError
        One line: not a zip or corrupted, no manifest, another format or mipseg version, a file
        missing (a checkpoint, plans.json, ...), or a checksum mismatch.
    """
    package = Path(package)
    if not package.is_file():
        raise InputError(f"{package}: no such model package")
    try:
        with zipfile.ZipFile(package) as archive:
            names = set(archive.namelist())
            if MANIFEST not in names:
                raise InputError(f"{package}: no {MANIFEST}, not a mipseg model package")
            try:
                manifest = json.loads(archive.read(MANIFEST))
            except ValueError:
                raise InputError(f"{package}: {MANIFEST} is not valid JSON") from None
            problem = _manifest_problem(manifest)
            if problem:
                raise InputError(f"{package}: {problem}")
            for name, entry in manifest["files"].items():
                if not _safe_member(name):
                    raise InputError(f"{package}: unsafe path {name!r} in the manifest")
                if name not in names:
                    what = "checkpoint" if name.endswith(".pt") else "file"
                    raise InputError(f"{package}: {what} {name} is listed in the manifest but missing")
                digest = hashlib.sha256(archive.read(name)).hexdigest()
                if digest != entry["sha256"]:
                    raise InputError(f"{package}: {name} is corrupted (checksum differs from the manifest)")
    except zipfile.BadZipFile as error:
        raise InputError(f"{package}: not a readable zip file (corrupted?): {error}") from None
    return manifest


def _manifest_problem(manifest: Any) -> str | None:
    if not isinstance(manifest, dict) or not {"format_version", "mipseg_version", "models", "files"} <= set(
        manifest
    ):
        return f"{MANIFEST} lacks format_version, mipseg_version, models or files"
    if manifest["format_version"] != FORMAT_VERSION:
        return f"package format {manifest['format_version']}, this mipseg reads format {FORMAT_VERSION}"
    problem = version_problem(manifest["mipseg_version"])
    if problem:
        return problem
    for model in manifest["models"]:
        needed = [f"{model}/plans.json", f"{model}/dataset.json"]
        needed += [
            f"{model}/fold_{fold}/checkpoint_{manifest['checkpoint']}.pt" for fold in manifest["folds"]
        ]
        missing = [name for name in needed if name not in manifest["files"]]
        if missing:
            return f"{missing[0]} is missing from the manifest"
    return None


def extract(package: Path, destination: Path) -> tuple[dict[str, Any], list[Path]]:
    """Check a package, then unpack its model folders under ``destination``.

    Returns
    -------
    manifest, and the model folders (``destination/{Dataset}/{model}``) in manifest order.
    """
    manifest = read_manifest(package)
    with zipfile.ZipFile(package) as archive:
        for name in manifest["files"]:
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(name) as source, io.atomic_path(target) as tmp:
                Path(tmp).write_bytes(source.read())
    return manifest, [destination / model for model in manifest["models"]]


@contextlib.contextmanager
def opened_models(model: str | Path) -> Iterator[list[Path]]:
    """Model folders of ``-m MODEL``: a package (unpacked to a temporary folder) or a model folder.

    A model folder is ``{trainer}__{labels}__3d_fullres`` holding ``plans.json`` and
    ``dataset.json`` (a results-tree folder or an installed package's).
    """
    model = Path(model)
    if model.is_file():
        with tempfile.TemporaryDirectory(prefix="mipseg-model-") as folder:
            yield extract(model, Path(folder))[1]
    elif (model / "plans.json").is_file() and (model / "dataset.json").is_file():
        yield [model]
    else:
        raise InputError(f"-m {model}: neither a model package (.zip) nor a model folder with plans.json")
