"""A challenge container's prediction: every image under an input folder -> a label map of the same name.

Challenge platforms (grand-challenge.org) mount the images to segment under ``/input/images/...``
(one file per case, usually ``.mha``) and collect results from ``/output/images/...``. This
predicts each image file found under ``input_dir`` (recursively; one channel per file) with a
model package or model folder and writes its label map to the same relative path under
``output_dir``, same file name, same ending, same geometry.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from mipseg import io
from mipseg.errors import InputError
from mipseg.inference.model_package import read_manifest
from mipseg.inference.postprocessing import DECISION_FILE
from mipseg.inference.predict_api import PredictionSettings, predict_folder

# what a challenge image can be; the metadata-header formats (.mhd, .nhdr) need their data files
CHALLENGE_ENDINGS = (".mha", ".nii.gz", ".nii", ".nrrd")


def challenge_images(input_dir: Path) -> list[Path]:
    """Image files under ``input_dir`` (recursively), sorted by path."""
    if not input_dir.is_dir():
        raise InputError(f"{input_dir}: no such input folder")
    found = sorted(
        p
        for p in input_dir.rglob("*")
        if p.is_file() and not p.name.startswith(".") and io.compound_suffix(p) in CHALLENGE_ENDINGS
    )
    if not found:
        raise InputError(f"{input_dir}: no image ({', '.join(CHALLENGE_ENDINGS)}) to segment")
    return found


def carries_decision(model: Path) -> bool:
    """Whether a package or model folder holds ``postprocessing.json`` (checked fully later, by predict)."""
    if model.is_file():
        return any(name.endswith(f"/{DECISION_FILE}") for name in read_manifest(model)["files"])
    return (model / DECISION_FILE).is_file()


def predict_challenge(
    input_dir: str | Path,
    output_dir: str | Path,
    model: str | Path,
    *,
    settings: PredictionSettings | None = None,
    device: str = "auto",
) -> list[Path]:
    """Segment every image of ``input_dir`` into ``output_dir`` (see the module docstring).

    Parameters
    ----------
    model
        A model package (``.zip`` from ``mipseg_export_model``) or a model folder.
    settings
        Prediction settings (``None``: the defaults, with ``--postprocess`` when the model
        carries a postprocessing decision, as :func:`carries_decision` says).

    Returns
    -------
    The label maps written.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    images = challenge_images(input_dir)
    settings = settings or PredictionSettings(postprocess=carries_decision(Path(model)))
    written = []
    with tempfile.TemporaryDirectory(prefix="mipseg-challenge-") as scratch:
        # neutral case names: challenge files are uuids in any folders, possibly with equal names
        staged = []
        for index, image in enumerate(images):
            link = Path(scratch) / "in" / f"case{index:05d}{io.compound_suffix(image)}"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(image.resolve())
            staged.append(link)
        predicted = Path(scratch) / "out"
        predict_folder(
            staged, predicted, models=[model], settings=settings, device=device, show_progress=False
        )
        for index, image in enumerate(images):
            label_map, geometry = io.read_image(predicted / f"case{index:05d}.nii.gz")
            target = output_dir / image.relative_to(input_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            written.append(io.write_image(label_map, geometry, target))
    return written
