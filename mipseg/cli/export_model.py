"""mipseg_export_model: one zip with everything a trained model needs to predict elsewhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mipseg.cli._common import DatasetOption, DebugOption, console, make_app, reported_errors
from mipseg.cli.predict import expand_multi_value_options

app = make_app(
    "Export a trained model to one zip: plans, dataset.json, the chosen checkpoints, the postprocessing "
    "decision, the mipseg version and a manifest of checksums. mipseg_install_model or "
    "mipseg_predict -m read it on another machine."
)


@app.command()
def export_model(
    dataset: DatasetOption,
    output: Annotated[Path, typer.Option("-o", "--output", help="The zip to write.")],
    trainer: Annotated[
        str | None,
        typer.Option("--trainer", help="Trainer; default: the best configuration, else mipseg_predict's."),
    ] = None,
    labels: Annotated[
        str | None, typer.Option("--labels", help="Label set the model was trained on; default as --trainer.")
    ] = None,
    folds: Annotated[
        list[str] | None, typer.Option("-f", "--folds", help="Folds to include; default: every trained fold.")
    ] = None,
    checkpoint: Annotated[
        str, typer.Option("--checkpoint", help="Which checkpoint: best, final or latest.")
    ] = "final",
    debug: DebugOption = False,
) -> None:
    """Write OUTPUT (a zip) with the model of dataset D."""
    from mipseg.ship.ship_api import export_model as export

    with reported_errors(debug):
        written = export(
            dataset,
            output,
            trainer=trainer,
            labels=labels,
            folds=tuple(folds) if folds else None,
            checkpoint=checkpoint,
        )
    console.print(f"model package {written} ({written.stat().st_size / 1e6:.1f} MB)", highlight=False)


def main(argv: list[str] | None = None) -> None:
    import sys

    app(
        args=expand_multi_value_options(sys.argv[1:] if argv is None else list(argv)),
        prog_name="mipseg_export_model",
    )
