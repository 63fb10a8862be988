"""mipseg_install_model: check a model package and unpack it under MIPSEG_RESULTS."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mipseg.cli._common import DebugOption, console, make_app, reported_errors

app = make_app(
    "Install a model package written by mipseg_export_model under MIPSEG_RESULTS (checksums, format and "
    "mipseg version are checked first); mipseg_predict -d then finds it."
)


@app.command()
def install_model(
    package: Annotated[Path, typer.Argument(help="The model zip.")],
    force: Annotated[bool, typer.Option("--force", help="Replace model folders that already exist.")] = False,
    debug: DebugOption = False,
) -> None:
    """Unpack PACKAGE under MIPSEG_RESULTS/{Dataset}/."""
    from mipseg.ship.ship_api import install_model as install

    with reported_errors(debug):
        installed = install(package, force=force)
    for folder in installed:
        console.print(f"installed {folder}", highlight=False)


def main(argv: list[str] | None = None) -> None:
    app(args=argv, prog_name="mipseg_install_model")
