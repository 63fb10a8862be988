"""mipseg_find_best_configuration: rank trained models and ensembles, decide postprocessing."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from mipseg.cli._common import DatasetOption, DebugOption, make_app, reported_errors
from mipseg.cli._common import console as error_console

app = make_app(
    "Compare every trained model of a dataset and every pair of them (ensembles) on their out-of-fold "
    "predictions, scored on the labelled voxels of a label set; decide connected-component "
    "postprocessing per class on the winner; write best_configuration.json, inference_instructions.txt "
    "and the decision (postprocessing.json) that mipseg_predict --postprocess and mipseg_export_model read."
)


@app.command()
def find_best_configuration(
    dataset: DatasetOption,
    labels: Annotated[
        str | None,
        typer.Option(
            "--labels", help="Label set to score on; default: the one trained on, else the annotator's."
        ),
    ] = None,
    trainers: Annotated[
        list[str] | None, typer.Option("--trainer", help="Only these trainers (repeat); default: all.")
    ] = None,
    disable_ensembling: Annotated[
        bool, typer.Option("--disable-ensembling", help="Do not try pairs of models.")
    ] = False,
    structure: Annotated[
        str,
        typer.Option(
            "--structure",
            help="Postprocessing rules: auto (vessel for MIP datasets, else organ), vessel, organ.",
        ),
    ] = "auto",
    debug: DebugOption = False,
) -> None:
    """Print the ranking and the exact predict command."""
    from mipseg.selection.selection_api import find_best_configuration as find

    with reported_errors(debug):
        result = find(
            dataset, labels=labels, trainers=trainers, ensembles=not disable_ensembling, structure=structure
        )
    table = Table(title=f"out-of-fold Dice on the labelled voxels of {result['reference_labelset']!r}")
    table.add_column("candidate")
    table.add_column("foreground Dice", justify="right")
    table.add_column("dense Dice (reported)", justify="right")
    for row in sorted(result["candidates"], key=lambda r: -r["foreground_dice"]):
        dense = row.get("dense_foreground_dice")
        table.add_row(row["name"], f"{row['foreground_dice']:.4f}", "-" if dense is None else f"{dense:.4f}")
    error_console.print(table)
    # the result goes to stdout, so that scripts can take the command from the last line
    typer.echo(f"best: {result['best']['name']}")
    typer.echo(f"postprocessing: {result['postprocessing']['rules'] or 'none'}")
    typer.echo(result["predict_command"])


def main(argv: list[str] | None = None) -> None:
    app(args=argv, prog_name="mipseg_find_best_configuration")
