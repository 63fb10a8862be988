"""mipseg_plan: fingerprint, plans, splits, MIPs to annotate and preprocessed data for one dataset."""

from __future__ import annotations

from typing import Annotated

import typer

from mipseg.cli._common import DatasetOption, DebugOption, make_app, reported_errors, wide_console

app = make_app(
    "Plan and preprocess a raw dataset (as nnUNetv2_plan_and_preprocess) and write the MIPs to annotate."
)


@app.command()
def plan(
    dataset: DatasetOption,
    num_processes: Annotated[int, typer.Option("-np", "--num-processes", help="Worker processes.")] = 2,
    resume: Annotated[
        bool, typer.Option("--continue", help="Keep existing fingerprint/plans; skip cases already done.")
    ] = False,
    device: Annotated[
        str, typer.Option("--device", help="auto | cpu | cuda: which budget sizes patch and batch.")
    ] = "auto",
    gpu_memory_gb: Annotated[
        float, typer.Option("--gpu-memory-gb", help="GPU memory the GPU budget plans for.")
    ] = 8.0,
    no_preprocess: Annotated[
        bool, typer.Option("--no-preprocess", help="Stop after fingerprint, plans, splits and MIPs.")
    ] = False,
    foreground: Annotated[
        str,
        typer.Option(
            "--foreground", help="Intensity statistics from: auto | labels | annotations | nonzero."
        ),
    ] = "auto",
    debug: DebugOption = False,
) -> None:
    """Fingerprint -> plans.json -> splits.json -> mips/ -> data/ for dataset -d."""
    from mipseg.errors import InputError
    from mipseg.planning.fingerprint import FOREGROUND_SOURCES
    from mipseg.planning.plan_api import plan_and_preprocess
    from mipseg.planning.planner import plans_table

    with reported_errors(debug):
        if foreground not in FOREGROUND_SOURCES:
            raise InputError(
                f"--foreground must be one of {', '.join(FOREGROUND_SOURCES)}, got {foreground!r}"
            )
        plans = plan_and_preprocess(
            dataset,
            num_processes=num_processes,
            resume=resume,
            device=device,
            gpu_memory_gb=gpu_memory_gb,
            preprocess=not no_preprocess,
            foreground=foreground,
        )
    wide_console().print(plans_table(plans))


def main() -> None:
    app()
