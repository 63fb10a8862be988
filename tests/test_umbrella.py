"""`mipseg <command>`: every script as a subcommand, in pipeline order, with --version."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mipseg import __version__
from mipseg.cli.umbrella import STAGES, main

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _run(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out + captured.err


def test_help_lists_every_script_in_pipeline_order(capsys) -> None:
    code, text = _run(["-h"], capsys)
    assert code == 0
    listed = [name for name, _, _ in STAGES]
    positions = [re.search(rf"^\W*{name}\s", text, re.MULTILINE) for name in listed]
    assert all(positions), text
    assert [p.start() for p in positions] == sorted(p.start() for p in positions)
    assert listed.index("plan") < listed.index("train") < listed.index("find_best_configuration")
    assert listed.index("find_best_configuration") < listed.index("predict") < listed.index("export_model")
    section = PYPROJECT.read_text().split("[project.scripts]")[1].split("\n[")[0]  # no tomllib on 3.10
    scripts = dict(re.findall(r'^(\w+) = "([\w.:]+)"', section, re.MULTILINE))
    assert scripts["mipseg"] == "mipseg.cli.umbrella:main"
    assert {f"mipseg_{name}" for name in listed} == set(scripts) - {"mipseg"}


def test_version_and_subcommands_behave_as_their_scripts(capsys, tmp_path: Path) -> None:
    code, text = _run(["--version"], capsys)
    assert code == 0 and text.strip() == f"mipseg {__version__}"
    code, text = _run(["install_model", str(tmp_path / "missing.zip")], capsys)
    assert code == 2 and "no such model package" in text
    # predict keeps nnU-Net's space-separated lists
    code, text = _run(["predict", "-i", str(tmp_path), "-o", str(tmp_path / "o"), "-m", "a", "b"], capsys)
    assert code == 2 and "-m a" in text
