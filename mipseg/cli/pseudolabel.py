"""mipseg_pseudolabel: MIP annotations of a dataset -> the 3D label set ``labelsets/{name}``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from mipseg.cli._common import DatasetOption, DebugOption, make_app, reported_errors
from mipseg.pseudolabel import calibrated
from mipseg.pseudolabel import mip_backprojection as bp

app = make_app(
    "Back-project the MIP annotations (annotationsTr/{case}_mip{a}.png) into 3D pseudo-labels: "
    "background 0, vessel 1, ignore; seeds in {case}_seeds.nii.gz; report.json and QC pictures."
)


@app.command()
def pseudolabel(
    dataset: DatasetOption,
    name: Annotated[str, typer.Option("--name", help="Label set name (folder under labelsets/).")] = "pseudo",
    fg_factor: Annotated[
        float, typer.Option("--fg-factor", help="S_1 threshold = this x mean seed intensity (clipped scale).")
    ] = bp.FG_FACTOR,
    min_size: Annotated[
        int, typer.Option("--min-size", help="Smallest seeded bright component kept in S_1 (voxels).")
    ] = bp.MIN_SIZE,
    bright_factor: Annotated[
        float,
        typer.Option(
            "--bright-factor", help="Voxels brighter than this x mean seed intensity are never S_0."
        ),
    ] = bp.BRIGHT_FACTOR,
    dark_factor: Annotated[
        float, typer.Option("--dark-factor", help="Voxels darker than this x mean seed intensity are S_0.")
    ] = bp.DARK_FACTOR,
    clip_fraction: Annotated[
        float, typer.Option("--clip-fraction", help="Fraction of the intensity range cut at each end.")
    ] = bp.CLIP_FRACTION,
    overlap: Annotated[
        str,
        typer.Option(
            "--overlap",
            help="Label of S_1 voxels the annotation contradicts (in S_0 or on an unannotated ray): "
            "vessel (published), background or ignore.",
        ),
    ] = bp.DEFAULT_OVERLAP,
    seed_floor: Annotated[
        float,
        typer.Option(
            "--seed-floor", help="Drop seeds darker than this x the median seed intensity (0: keep all)."
        ),
    ] = bp.SEED_FLOOR,
    rule: Annotated[
        str,
        typer.Option(
            "--rule",
            help="calibrated (default: thresholds between the measured background and seed levels, "
            "--grow-factor/--background-factor/--reference) or published (--fg-factor/--bright-factor/"
            "--dark-factor).",
        ),
    ] = bp.DEFAULT_RULE,
    grow_factor: Annotated[
        float,
        typer.Option("--grow-factor", help="calibrated: S_1 above background + this x (seed - background)."),
    ] = calibrated.GROW_FACTOR,
    background_factor: Annotated[
        float,
        typer.Option(
            "--background-factor",
            help="calibrated: S_0 = unannotated-ray voxels below background + this x (seed - background).",
        ),
    ] = calibrated.BACKGROUND_FACTOR,
    reference: Annotated[
        str,
        typer.Option(
            "--reference", help="calibrated: seed level = mean seed (global) or each ray's own seed (ray)."
        ),
    ] = calibrated.REFERENCE,
    edge_sigmas: Annotated[
        float,
        typer.Option(
            "--edge-sigmas",
            help="calibrated: S_1 edge growth takes hull voxels this many background noise levels "
            "above the background.",
        ),
    ] = calibrated.EDGE_SIGMAS,
    edge_radius: Annotated[
        float,
        typer.Option(
            "--edge-radius", help="calibrated: S_1 edge growth reaches this far in voxels (0: off)."
        ),
    ] = calibrated.EDGE_RADIUS,
    axes: Annotated[
        list[int] | None,
        typer.Option(
            "--axes", help="Use only these MIP axes (repeat the flag); default: all in dataset.json."
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--continue", help="Keep cases finished by an earlier run with the same settings.")
    ] = False,
    num_processes: Annotated[int, typer.Option("-np", "--num-processes", help="Cases in parallel.")] = 1,
    debug: DebugOption = False,
) -> None:
    """Make the pseudo-label set of a MIP-annotated dataset."""
    from mipseg.pseudolabel.pseudolabel_api import PseudoLabelSettings, make_pseudo_labels

    with reported_errors(debug):
        settings = PseudoLabelSettings(
            fg_factor=fg_factor,
            min_size=min_size,
            bright_factor=bright_factor,
            dark_factor=dark_factor,
            clip_fraction=clip_fraction,
            overlap=overlap,
            seed_floor=seed_floor,
            axes=tuple(axes) if axes else None,
            rule=rule,
            grow_factor=grow_factor,
            background_factor=background_factor,
            reference=reference,
            edge_sigmas=edge_sigmas,
            edge_radius=edge_radius,
        )
        folder = make_pseudo_labels(
            dataset, name, settings=settings, resume=resume, num_processes=num_processes
        )
    Console().print(f"label set written to {folder}", highlight=False, soft_wrap=True)


def main() -> None:
    app()
