"""mipseg_evaluate: score a folder of predictions against references and write summary.json."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from mipseg.cli._common import DebugOption, make_app, reported_errors, wide_console

app = make_app(
    "Dice, IoU, precision, recall, clDice, HD95 and ASSD (mm) per case and label; writes an "
    "nnU-Net-style summary.json and prints the mean per label."
)

TABLE_METRICS = ("Dice", "IoU", "precision", "recall", "clDice", "HD95", "ASSD")


@app.command(context_settings={"allow_extra_args": True, "help_option_names": ["-h", "--help"]})
def evaluate(
    context: typer.Context,
    gt_folder: Annotated[Path, typer.Argument(help="Folder of reference label maps.")],
    pred_folder: Annotated[Path, typer.Argument(help="Folder of predictions with the same file names.")],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Summary file (default: PRED_FOLDER/summary.json).")
    ] = None,
    labels: Annotated[
        list[int] | None,
        typer.Option(
            "-l",
            "--labels",
            help="Labels to score: -l 1 2 (or -l 1 -l 2) (default: every non-zero value in the GT).",
        ),
    ] = None,
    ignore_label: Annotated[
        int | None, typer.Option("--ignore-label", help="Reference value excluded from every metric.")
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(
            "-d", "--dataset", help="Take labels, ignore value and file ending from this raw dataset."
        ),
    ] = None,
    dataset_json: Annotated[
        Path | None,
        typer.Option("--dataset-json", help="Take labels, ignore value and file ending from this file."),
    ] = None,
    file_ending: Annotated[
        str | None, typer.Option("--file-ending", help="Ending of the files to pair (default: .nii.gz).")
    ] = None,
    num_processes: Annotated[
        int | None, typer.Option("-np", "--num-processes", help="Worker processes (default: up to 4).")
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Fail if a reference has no prediction (default: skip it).")
    ] = False,
    debug: DebugOption = False,
) -> None:
    """Evaluate every prediction in PRED_FOLDER against the file of the same name in GT_FOLDER."""
    from mipseg.errors import InputError
    from mipseg.evaluation.evaluate import dataset_json_of, evaluate_folders, label_names

    with reported_errors(debug):
        if dataset is not None and dataset_json is not None:
            raise InputError("give either -d/--dataset or --dataset-json, not both")
        labels = _labels_with_extra_arguments(labels, context.args)
        if dataset is not None:
            dataset_json = dataset_json_of(dataset)
        summary = evaluate_folders(
            gt_folder,
            pred_folder,
            labels=labels or None,
            ignore_label=ignore_label,
            output=output,
            num_processes=num_processes,
            file_ending=file_ending,
            dataset_json=dataset_json,
            strict=strict,
        )
    console = wide_console()
    console.print(summary_table(summary, label_names(dataset_json)))
    console.print(f"summary written to {summary['summary_file']}", highlight=False, soft_wrap=True)


def _labels_with_extra_arguments(labels: list[int] | None, extra: list[str]) -> list[int] | None:
    """Accept nnU-Net's ``-l 1 2 3``: click gives ``-l`` one value and leaves the rest as extra arguments."""
    from mipseg.errors import InputError

    if not extra:
        return labels
    if labels is None or not all(value.lstrip("-").isdigit() for value in extra):
        raise InputError(f"unexpected argument(s): {' '.join(extra)}")
    return [*labels, *(int(value) for value in extra)]


def summary_table(summary: dict[str, Any], names: dict[str, str] | None = None) -> Table:
    """Rich table: one row per label (mean over cases, named as in dataset.json) and the foreground mean."""
    cases = len(summary["metric_per_case"])
    table = Table(title=f"mean over {cases} case{'s' * (cases != 1)} (HD95, ASSD in mm)")
    table.add_column("label", no_wrap=True)
    for name in TABLE_METRICS:
        table.add_column(name, justify="right")
    for label, values in summary["mean"].items():
        row = f"{names[label]} ({label})" if names and label in names else label
        table.add_row(row, *(_format(values[name]) for name in TABLE_METRICS))
    if summary["foreground_mean"]:
        table.add_row(
            "foreground mean",
            *(_format(summary["foreground_mean"][name]) for name in TABLE_METRICS),
            style="bold",
        )
    return table


def _format(value: float) -> str:
    return "NaN" if value != value else f"{value:.4f}"


def main() -> None:
    app()
