"""The three data roots and dataset name resolution.

Roots come from environment variables, read lazily at each call so that tests and users can
change them at run time, with defaults under the current directory so a first run needs no setup:

=====================  ===========================
variable               default
=====================  ===========================
``MIPSEG_RAW``          ``./mipseg_data/raw``
``MIPSEG_PREPROCESSED`` ``./mipseg_data/preprocessed``
``MIPSEG_RESULTS``      ``./mipseg_data/results``
=====================  ===========================
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mipseg.errors import InputError

_ROOT_DEFAULTS = {
    "MIPSEG_RAW": Path("mipseg_data") / "raw",
    "MIPSEG_PREPROCESSED": Path("mipseg_data") / "preprocessed",
    "MIPSEG_RESULTS": Path("mipseg_data") / "results",
}
_DATASET_FOLDER = re.compile(r"^Dataset(\d{3})_(\w[\w.-]*)$")


def _root(variable: str) -> Path:
    value = os.environ.get(variable)
    return Path(value) if value else Path.cwd() / _ROOT_DEFAULTS[variable]


def raw_root() -> Path:
    """Folder holding raw datasets (``$MIPSEG_RAW`` or ``./mipseg_data/raw``)."""
    return _root("MIPSEG_RAW")


def preprocessed_root() -> Path:
    """Folder holding plans, label sets and preprocessed data (``$MIPSEG_PREPROCESSED``)."""
    return _root("MIPSEG_PREPROCESSED")


def results_root() -> Path:
    """Folder holding trained models (``$MIPSEG_RESULTS``)."""
    return _root("MIPSEG_RESULTS")


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """Folder name of a dataset in nnU-Net's convention, e.g. ``Dataset900_Vessels``.

    >>> dataset_folder_name(900, "Vessels")
    'Dataset900_Vessels'
    """
    if not 0 <= dataset_id <= 999:
        raise InputError(f"dataset id {dataset_id} is not in 0..999")
    if not re.fullmatch(r"\w[\w.-]*", name):
        raise InputError(f"dataset name {name!r} may only hold letters, digits, '_', '.' and '-'")
    return f"Dataset{dataset_id:03d}_{name}"


def resolve_dataset(identifier: str | int) -> str:
    """Full folder name of a dataset given ``900``, ``"900"`` or ``"Dataset900_Name"``.

    A numeric id is looked up in all three roots; exactly one folder name must match.

    Raises
    ------
    InputError
        If no dataset or several datasets carry that id, or the identifier is malformed.
    """
    text = str(identifier).strip()
    if _DATASET_FOLDER.match(text):
        return text
    if not text.isdigit():
        raise InputError(f"dataset {text!r} is neither an id like 900 nor a name like Dataset900_Name")
    prefix = f"Dataset{int(text):03d}_"
    roots = (raw_root(), preprocessed_root(), results_root())
    found = sorted(
        {
            p.name
            for root in roots
            if root.is_dir()
            for p in root.iterdir()
            if p.is_dir() and p.name.startswith(prefix)
        }
    )
    if not found:
        searched = ", ".join(str(r) for r in roots)
        raise InputError(f"no dataset with id {int(text)} (looked for {prefix}* in {searched})")
    if len(found) > 1:
        raise InputError(f"several datasets have id {int(text)}: {', '.join(found)}; pass the full name")
    return found[0]


def raw_dataset_dir(identifier: str | int) -> Path:
    """``raw/DatasetXXX_Name`` of a dataset."""
    return raw_root() / resolve_dataset(identifier)


def preprocessed_dataset_dir(identifier: str | int) -> Path:
    """``preprocessed/DatasetXXX_Name`` of a dataset."""
    return preprocessed_root() / resolve_dataset(identifier)


def results_dataset_dir(identifier: str | int) -> Path:
    """``results/DatasetXXX_Name`` of a dataset."""
    return results_root() / resolve_dataset(identifier)


def model_dir(identifier: str | int, trainer: str, labelset: str, configuration: str = "3d_fullres") -> Path:
    """``results/DatasetXXX_Name/{trainer}__{labelset}__{configuration}``."""
    return results_dataset_dir(identifier) / f"{trainer}__{labelset}__{configuration}"


def labelset_dir(identifier: str | int, name: str) -> Path:
    """``preprocessed/DatasetXXX_Name/labelsets/{name}``."""
    return preprocessed_dataset_dir(identifier) / "labelsets" / name
