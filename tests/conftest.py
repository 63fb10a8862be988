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


@pytest.fixture(autouse=True)
def _model_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Converted inference models (OpenVINO) go to one folder per test session, never to ~/.cache."""
    monkeypatch.setenv("MIPSEG_CACHE", str(tmp_path_factory.getbasetemp() / "mipseg_cache"))
