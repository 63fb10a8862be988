"""Checkpoint files: written atomically, read back with clear errors, turned into networks.

A checkpoint (``fold_k/checkpoint_{best,latest,final}.pt``) is a ``torch.save`` of a dict:

=====================  ==================================================================
key                    value
=====================  ==================================================================
``network_weights``    ``state_dict`` of :class:`mipseg.training.network.UNet3D` (all heads)
``optimizer_state``    ``state_dict`` of the SGD optimizer
``grad_scaler_state``  AMP GradScaler state (``None`` on CPU)
``epoch``              number of *completed* epochs; training resumes at this epoch index
``trainer``            trainer name (``"plain"``; issue 6 adds ``"mip"``)
``labelset``           label set trained on (``"pseudo"``, ``"dense"``, ...)
``fold``               ``0..4`` or ``"all"``
``plans``              ``Plans.to_json()``
``dataset_json``       the raw dataset.json
``num_input_channels`` image channels; ``num_classes``: logits channels (ignore excluded)
``dropout``            Dropout3d probability the network was built with
``mirror_axes``        axes flipped during training (test-time augmentation may use them)
``config``             the :class:`mipseg.training.loop.TrainingConfig` as a dict
``logging``            per-epoch lists (losses, pseudo Dice, EMA, learning rate, times)
``best_ema``           best EMA pseudo Dice so far
``rng_state``          torch / numpy / python RNG states (exact resume)
=====================  ==================================================================
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from mipseg import io
from mipseg.errors import InputError
from mipseg.planning.plans import Plans
from mipseg.training.network import UNet3D, build_network

CHECKPOINT_KINDS = ("final", "latest", "best")
REQUIRED_KEYS = ("network_weights", "epoch", "trainer", "labelset", "plans", "dataset_json", "dropout")


def checkpoint_kind(name: str) -> str:
    """``final``/``latest``/``best`` from itself or nnU-Net's spelling (``-chk checkpoint_final.pth``)."""
    stem = name.removesuffix(".pth").removesuffix(".pt")
    return stem.removeprefix("checkpoint_") if stem.removeprefix("checkpoint_") in CHECKPOINT_KINDS else name


def checkpoint_path(fold_dir: str | Path, kind: str) -> Path:
    """``fold_dir/checkpoint_{kind}.pt`` for kind in ``final``, ``latest``, ``best``."""
    if kind not in CHECKPOINT_KINDS:
        raise ValueError(f"checkpoint kind must be one of {CHECKPOINT_KINDS}, got {kind!r}")
    return Path(fold_dir) / f"checkpoint_{kind}.pt"


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` to a temporary file next to ``path``, then rename: never half-written.

    An interruption (even Ctrl-C) during the write leaves the previous file untouched.
    """
    with io.atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises
    ------
    InputError
        If the file is missing, unreadable or lacks one of :data:`REQUIRED_KEYS`.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as error:
        raise InputError(f"{path}: not a readable checkpoint ({str(error).splitlines()[0]})") from None
    if not isinstance(checkpoint, dict):
        raise InputError(f"{path}: not a mipseg checkpoint (holds {type(checkpoint).__name__})")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise InputError(f"{path}: not a mipseg checkpoint (missing {', '.join(missing)})")
    return checkpoint


def network_from_checkpoint(
    checkpoint: dict[str, Any],
    *,
    deep_supervision: bool = False,
    dropout: float | None = None,
) -> UNet3D:
    """Rebuild the network of a checkpoint and load its weights (eval mode, on CPU).

    Parameters
    ----------
    checkpoint
        As returned by :func:`load_checkpoint`.
    deep_supervision
        False for inference (one full-resolution output).
    dropout
        Override the stored dropout (e.g. keep it for Monte-Carlo sampling); None = as trained.
    """
    plans = Plans.from_json(checkpoint["plans"])
    network = build_network(
        plans,
        num_input_channels=int(checkpoint.get("num_input_channels", plans.num_channels)),
        num_classes=int(checkpoint.get("num_classes", plans.num_classes)),
        deep_supervision=deep_supervision,
        dropout=float(checkpoint["dropout"] if dropout is None else dropout),
    )
    network.load_state_dict(checkpoint["network_weights"])
    network.eval()
    return network
