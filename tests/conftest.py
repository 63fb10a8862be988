"""Shared fixtures: every test gets its own empty data roots."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def data_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Point MIPSEG_RAW / MIPSEG_PREPROCESSED / MIPSEG_RESULTS at fresh folders under tmp_path."""
    roots = {}
    for variable, name in (
        ("MIPSEG_RAW", "raw"),
        ("MIPSEG_PREPROCESSED", "preprocessed"),
        ("MIPSEG_RESULTS", "results"),
    ):
        roots[name] = tmp_path / name
        roots[name].mkdir()
        monkeypatch.setenv(variable, str(roots[name]))
    return roots
