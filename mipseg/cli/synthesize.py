"""mipseg_synthesize: write a synthetic raw dataset with dense truth and simulated 2D annotations."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.console import Console

from mipseg.cli._common import DebugOption, SeedOption, make_app, reported_errors
from mipseg.errors import InputError

app = make_app(
    "Make a synthetic raw dataset: vessel trees annotated on MIPs, or organs annotated on one slice."
)


@app.command()
def synthesize(
    dataset: Annotated[int, typer.Option("-d", "--dataset", help="Dataset id (0..999) to create.")],
    kind: Annotated[
        str, typer.Option("--kind", help="vessels (MIP annotations) or organs (slice annotations).")
    ],
    cases: Annotated[int, typer.Option("--cases", help="Number of training cases.")] = 12,
    shape: Annotated[
        tuple[int, int, int] | None,
        typer.Option(
            "--shape", help="Volume size Z Y X in voxels (default: vessels 64 96 96, organs 48 96 96)."
        ),
    ] = None,
    spacing: Annotated[
        tuple[float, float, float] | None,
        typer.Option("--spacing", help="Voxel spacing Z Y X in mm (default: vessels 1 1 1, organs 3 1 1)."),
    ] = None,
    seed: SeedOption = 0,
    name: Annotated[
        str | None,
        typer.Option("--name", help="Dataset name (default: SyntheticVessels or SyntheticOrgans)."),
    ] = None,
    mip_axes: Annotated[
        list[str] | None,
        typer.Option(
            "--mip-axes",
            help="Vessels: numpy axes of the annotated MIPs, e.g. --mip-axes 0,1,2 (or repeated); default 0.",
        ),
    ] = None,
    test_cases: Annotated[int, typer.Option("--test-cases", help="Extra cases in imagesTs/labelsTs.")] = 2,
    annotator_noise: Annotated[
        bool, typer.Option("--annotator-noise", help="Vessels: miss some faint branches, draw 1 pixel wider.")
    ] = False,
    slice_choice: Annotated[
        str, typer.Option("--slice", help="Organs: annotated slice, 'middle', 'largest' or an index K.")
    ] = "middle",
    organ_classes: Annotated[
        int,
        typer.Option(
            "--organ-classes",
            help="Organs: labelled classes 1..4; N > 1 also labels N-1 touching neighbours (neighbour_K).",
        ),
    ] = 1,
    vessel_density: Annotated[
        float,
        typer.Option(
            "--vessel-density", help="Vessels: multiply the number of vessel trees (crowded MIPs above 1)."
        ),
    ] = 1.0,
    noise_scale: Annotated[
        float,
        typer.Option("--noise-scale", help="Vessels: multiply the Rician noise level (sigma 12-22 at 1)."),
    ] = 1.0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing dataset.")] = False,
    debug: DebugOption = False,
) -> None:
    """Generate Dataset{ID}_{NAME} under $MIPSEG_RAW with imagesTr, labelsTr, annotationsTr, imagesTs."""
    from mipseg.synthetic import synthesize_dataset

    started = time.perf_counter()
    with reported_errors(debug):
        axes = parse_axes(mip_axes)
        folder = synthesize_dataset(
            dataset,
            kind,
            num_cases=cases,
            shape=shape,
            spacing=spacing,
            seed=seed,
            name=name,
            mip_axes=axes,
            num_test_cases=test_cases,
            annotator_noise=annotator_noise,
            slice_choice=slice_choice,
            organ_classes=organ_classes,
            vessel_density=vessel_density,
            noise_scale=noise_scale,
            overwrite=overwrite,
        )
    annotation = f"MIP axes {list(axes)}" if kind == "vessels" else f"slice '{slice_choice}'"
    if organ_classes > 1:
        annotation += f", {organ_classes} organ classes"
    if vessel_density != 1.0 or noise_scale != 1.0:
        annotation += f", vessel density x{vessel_density:g}, noise x{noise_scale:g}"
    console = Console()
    console.print(f"wrote {folder}", highlight=False, soft_wrap=True)
    console.print(
        f"{cases} training + {test_cases} test {kind} cases, annotation: {annotation}, seed {seed}, "
        f"{time.perf_counter() - started:.1f} s",
        highlight=False,
    )


def parse_axes(values: list[str] | None) -> tuple[int, ...]:
    """Axes from ``--mip-axes`` values, each holding one or more integers split by commas or spaces."""
    if not values:
        return (0,)
    tokens = [token for value in values for token in value.replace(",", " ").split()]
    if not all(token.isdigit() for token in tokens):
        raise InputError(f"--mip-axes {' '.join(values)}: expected integers 0, 1 or 2")
    return tuple(int(token) for token in tokens)


def main() -> None:
    app()
