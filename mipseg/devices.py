"""The ``--device`` flag every command shares: ``auto``, ``cpu`` or ``cuda`` (``cuda:N`` too)."""

from __future__ import annotations

import torch

from mipseg.errors import InputError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device a ``--device`` value names.

    ``auto`` is CUDA when a GPU is there and the CPU otherwise; asking for CUDA without a GPU, or
    for anything else than auto/cpu/cuda[:N], is an input error (one line, exit status 2).
    """
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not (name == "cuda" or name.startswith("cuda:")):
        raise InputError(f"--device {name!r}: expected auto, cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA device is available (use --device cpu or auto)")
    return torch.device(name)
