"""mipseg_validate: check a raw dataset against the contract and show what it holds."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mipseg.cli._common import DatasetOption, DebugOption, make_app, reported_errors

app = make_app("Validate a raw dataset completely and print a summary; exit 2 with one line per problem.")


@app.command()
def validate(
    dataset: DatasetOption,
    headers_only: Annotated[
        bool, typer.Option("--headers-only", help="Read image headers only (faster; skips label values).")
    ] = False,
    require_annotations: Annotated[
        bool, typer.Option("--require-annotations", help="Every training case must be annotated.")
    ] = False,
    debug: DebugOption = False,
) -> None:
    """Validate dataset.json, images, labels and annotations of one raw dataset."""
    from mipseg.dataset import load_dataset

    with reported_errors(debug):
        loaded = load_dataset(dataset, read_voxels=not headers_only, require_annotations=require_annotations)
    Console().print(dataset_summary_table(loaded))


def dataset_summary_table(dataset) -> Table:
    """A rich table describing a loaded :class:`mipseg.dataset.Dataset`."""
    spec = dataset.spec
    annotated = sum(bool(case.annotations) for case in dataset.cases)
    table = Table(title=f"{dataset.name}: valid", show_header=False)
    table.add_row("folder", str(dataset.folder))
    table.add_row("channels", ", ".join(f"{k}: {v}" for k, v in spec.channel_names.items()))
    table.add_row(
        "labels", ", ".join(f"{k}={v}" for k, v in spec.labels.items()) + f" (ignore={spec.ignore_label})"
    )
    table.add_row(
        "annotation",
        f"{spec.annotation or 'none (dense labels only)'}"
        + (f", MIP axes {list(spec.mip_axes)}" if spec.annotation == "mip" else ""),
    )
    table.add_row(
        "training cases",
        f"{len(dataset.cases)} ({annotated} annotated, "
        f"{sum(c.label is not None for c in dataset.cases)} with dense truth)",
    )
    table.add_row("test cases", str(len(dataset.test_cases)))
    return table


def main() -> None:
    app()
