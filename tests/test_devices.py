"""The shared ``--device`` resolution."""

from __future__ import annotations

import pytest
import torch

from mipseg.devices import resolve_device
from mipseg.errors import InputError


def test_auto_and_cpu_resolve_to_a_usable_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_input_error() -> None:
    with pytest.raises(InputError, match="no CUDA device"):
        resolve_device("cuda:0")


def test_unknown_device_names_the_bad_value() -> None:
    with pytest.raises(InputError, match="'tpu'"):
        resolve_device("tpu")
