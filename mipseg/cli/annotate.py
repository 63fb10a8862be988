"""mipseg_annotate: draw the annotations in the browser, pre-filled by what mipseg already knows."""

from __future__ import annotations

from typing import Annotated

import typer

from mipseg.cli._common import DatasetOption, DebugOption, DeviceOption, make_app, reported_errors

app = make_app(
    "Serve a drawing page for the annotations of a dataset (MIPs or slices) on this machine and print "
    "its URL; saves go to raw/<Dataset>/annotationsTr exactly as mipseg_validate expects. Ctrl-C stops it."
)


@app.command()
def annotate(
    dataset: DatasetOption,
    host: Annotated[
        str,
        typer.Option(
            "--host",
            help="Address to listen on; any other than 127.0.0.1/localhost (e.g. 0.0.0.0) lets other "
            "machines in and always needs the token.",
        ),
    ] = "127.0.0.1",
    port: Annotated[
        int | None,
        typer.Option("--port", help="Port; default 8765, or the next free one. 0 = any free port."),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            help='Session token in the URL; default: a new random one. "" = none (loopback only).',
        ),
    ] = None,
    no_model: Annotated[
        bool, typer.Option("--no-model", help="Do not pre-fill from (or order cases by) a trained model.")
    ] = False,
    trainer: Annotated[
        str | None,
        typer.Option("--trainer", help="Model to pre-fill from: trainer name (default as mipseg_predict)."),
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option("--labels", help="Model to pre-fill from: label set it was trained on."),
    ] = None,
    folds: Annotated[
        list[str] | None,
        typer.Option("-f", "--folds", help="Model folds to ensemble; default: every trained fold."),
    ] = None,
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="best, final or latest.")] = "final",
    device: DeviceOption = "auto",
    debug: DebugOption = False,
) -> None:
    """Draw MIP or slice annotations in the browser; see documentation/annotate.md."""
    from mipseg.annotate.annotate_api import DEFAULT_PORT, open_session, serve

    with reported_errors(debug):
        session = open_session(
            dataset,
            use_model=not no_model,
            trainer=trainer,
            labels=labels,
            folds=folds,
            checkpoint=checkpoint,
            device=device,
        )
        serve(
            session,
            host=host,
            port=DEFAULT_PORT if port is None else port,
            explicit_port=port is not None,
            token=token,
            announce=lambda line: typer.echo(line),
        )


def main() -> None:
    app()
