"""How every command reports failures: input errors, interruption, running out of memory."""

from __future__ import annotations

import pytest
import torch

from mipseg.cli._common import reported_errors


@pytest.mark.parametrize(
    "error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), MemoryError()]
)
def test_out_of_memory_is_one_line_with_a_hint(error: BaseException, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info, reported_errors():
        raise error
    assert exit_info.value.code == 1
    output = capsys.readouterr().err
    assert "out of memory" in output and "--gpu-memory-gb" in output and "Traceback" not in output


def test_other_runtime_errors_are_not_hidden() -> None:
    with pytest.raises(RuntimeError, match="shape mismatch"), reported_errors():
        raise RuntimeError("shape mismatch")
