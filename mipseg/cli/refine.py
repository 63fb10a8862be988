"""mipseg_refine: out-of-fold models clean and extend a label set -> label set ``labelsets/{name}``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from mipseg.cli._common import DatasetOption, DebugOption, DeviceOption, SeedOption, make_app, reported_errors
from mipseg.refine import rules

app = make_app(
    "Refine a label set with the out-of-fold models of mipseg_train (Guo et al. 2024): confident learning "
    "flips labels the models confidently contradict, Monte-Carlo uncertainty adds confident labels to "
    "unlabelled voxels. Writes labelsets/{name}/ (label maps, seeds, labelset.json, report.json)."
)


@app.command()
def refine(
    dataset: DatasetOption,
    labels: Annotated[
        str, typer.Option("--labels", help="Label set to refine; its fold models must be trained.")
    ] = "pseudo",
    name: Annotated[str, typer.Option("--name", help="Name of the refined label set.")] = "refined",
    passes: Annotated[int, typer.Option("--passes", help="Stochastic passes T per case.")] = rules.PASSES,
    noise_std: Annotated[
        float, typer.Option("--noise-std", help="Std of the Gaussian input noise (normalized image).")
    ] = rules.NOISE_STD,
    noise_clamp: Annotated[
        float, typer.Option("--noise-clamp", help="Input noise clamped to +- this.")
    ] = rules.NOISE_CLAMP,
    fg_top: Annotated[
        float, typer.Option("--fg-top", help="Fraction of foreground candidates added, most certain first.")
    ] = rules.FG_TOP,
    bg_top: Annotated[
        float, typer.Option("--bg-top", help="Fraction of background candidates added, most certain first.")
    ] = rules.BG_TOP,
    max_distance: Annotated[
        float,
        typer.Option(
            "--max-distance", help="New foreground lies within this many voxels of its class (S_1)."
        ),
    ] = rules.MAX_DISTANCE,
    body_threshold: Annotated[
        float,
        typer.Option("--body-threshold", help="Confident learning only where min-max intensity >= this."),
    ] = rules.BODY_THRESHOLD,
    cl_method: Annotated[
        str,
        typer.Option(
            "--cl-method", help="confident_joint (vectorized, same result) or cleanlab (find_label_issues)."
        ),
    ] = "confident_joint",
    trainer: Annotated[
        str,
        typer.Option(
            "-tr",
            "--trainer",
            help="Trainer whose fold models are used; auto = mip for MIP-annotated datasets, else plain.",
        ),
    ] = "auto",
    checkpoint: Annotated[
        str, typer.Option("-chk", "--checkpoint", help="final (uses the exported validation) or best.")
    ] = "final",
    device: DeviceOption = "auto",
    seed: SeedOption = 0,
    resume: Annotated[
        bool, typer.Option("--continue", help="Keep cases finished by an earlier run with the same settings.")
    ] = False,
    debug: DebugOption = False,
) -> None:
    """Refine label set --labels of dataset -d into label set --name."""
    from mipseg.refine.refine_api import RefineSettings, refine_labelset

    with reported_errors(debug):
        settings = RefineSettings(
            passes=passes,
            noise_std=noise_std,
            noise_clamp=noise_clamp,
            fg_top=fg_top,
            bg_top=bg_top,
            max_distance=max_distance,
            body_threshold=body_threshold,
            cl_method=cl_method,
            trainer=trainer,
            checkpoint=checkpoint,
            seed=seed,
        )
        folder = refine_labelset(dataset, labels, name, settings=settings, device=device, resume=resume)
    Console().print(f"label set written to {folder}", highlight=False, soft_wrap=True)


def main() -> None:
    app()
