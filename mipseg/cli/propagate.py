"""mipseg_propagate: single-slice annotations -> label set "propagated" (or --suggest slices)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console

from mipseg.cli._common import DatasetOption, DebugOption, DeviceOption, SeedOption, make_app, reported_errors

app = make_app(
    "Propagate single-slice annotations (annotationsTr/{case}_slice{k}.png) through each volume with "
    "self-supervised inter-slice flows (trained on the dataset's images when it has no flow model), "
    "or with Demons registration or slice copy; --suggest N proposes N slices per case to annotate instead, "
    "--suggest-next N N more given the slices already drawn."
)


@app.command()
def propagate(
    dataset: DatasetOption,
    suggest: Annotated[
        int,
        typer.Option(
            "--suggest",
            help="Only suggest N slices per case to annotate (PNGs); bare --suggest = 1; 0 = propagate.",
        ),
    ] = 0,
    suggest_next: Annotated[
        int | None,
        typer.Option(
            "--suggest-next",
            help="Only suggest N more slices per case, spread over the extent its drawn slices propagate "
            "to (with the propagation flags given); cases without drawings get the --suggest choice.",
        ),
    ] = None,
    method: Annotated[
        str, typer.Option("--method", help="Mask transport: flow, registration or copy.")
    ] = "flow",
    name: Annotated[
        str, typer.Option("--name", help="Label set name (folder under labelsets/).")
    ] = "propagated",
    iterations: Annotated[
        int,
        typer.Option("--iters", "--epochs", help="Training iterations of the flow model (one volume each)."),
    ] = 300,
    similarity: Annotated[
        str, typer.Option("--similarity", help="Reconstruction similarity: mse or ncc.")
    ] = "mse",
    resume: Annotated[
        bool,
        typer.Option(
            "--continue",
            help="Resume an interrupted run: the flow model's training, and keep cases an earlier run "
            "with the same settings already propagated.",
        ),
    ] = False,
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="Skip the intensity verification of propagated masks.")
    ] = False,
    no_verify_between: Annotated[
        bool,
        typer.Option(
            "--no-verify-between",
            help="Skip the intensity verification between two drawn slices that both show the class "
            "(kept outside them and where the class ends between them).",
        ),
    ] = False,
    ignore_band: Annotated[
        int, typer.Option("--ignore-band", help="Pixels around propagated boundaries labelled ignore.")
    ] = 0,
    band_growth: Annotated[
        float,
        typer.Option(
            "--ignore-band-growth",
            help="Extra ignore-band pixels per slice of distance from the nearest drawn slice (0 = none).",
        ),
    ] = 0.0,
    refine_iters: Annotated[
        int,
        typer.Option(
            "--refine-iters",
            help="Label-free per-volume optimisation steps of the flows on the finer grid (0 = off).",
        ),
    ] = 50,
    coarse_iters: Annotated[
        int,
        typer.Option(
            "--coarse-iters",
            help="Optimisation steps on a half-size grid before --refine-iters (0 = none).",
        ),
    ] = 50,
    refine_size: Annotated[
        int, typer.Option("--refine-size", help="Largest in-plane size (pixels) of the per-volume flows.")
    ] = 128,
    reference_spacing: Annotated[
        float,
        typer.Option(
            "--reference-spacing",
            help="Slice spacing (mm) the flow smoothness weights are meant for; thinner slices get "
            "them scaled by (spacing / this)^2. 0 = never scale.",
        ),
    ] = 3.0,
    fusion: Annotated[
        str,
        typer.Option(
            "--fusion",
            help="Slices between two drawn slices: two_sided (fuse both by distance and verification) "
            "or nearer (the nearer drawn slice only).",
        ),
    ] = "two_sided",
    no_symmetric_flows: Annotated[
        bool,
        typer.Option(
            "--no-symmetric-flows",
            help="Move masks by the flows alone, not also by their inverse-consistent version.",
        ),
    ] = False,
    device: DeviceOption = "auto",
    seed: SeedOption = 0,
    debug: DebugOption = False,
) -> None:
    """Train flows if needed, then propagate every annotated case (or suggest slices)."""
    from mipseg.errors import InputError
    from mipseg.labelset import LabelSet
    from mipseg.propagation.instance_optimization import InstanceOptimization
    from mipseg.propagation.propagate_api import PropagationSettings, propagate_dataset
    from mipseg.propagation.suggest_api import suggest_next_slices, suggest_slices
    from mipseg.propagation.train_flow import FlowTrainingSettings

    with reported_errors(debug):
        flow_settings = FlowTrainingSettings(iterations=iterations, similarity=similarity, seed=seed)
        if suggest and suggest_next is not None:
            raise InputError(["--suggest and --suggest-next exclude each other: give one"])
        if suggest:
            path = suggest_slices(dataset, flow_settings, count=suggest, resume=resume, device=device)
            Console(soft_wrap=True).print(f"suggestions written to {path}")
            return
        refinement = InstanceOptimization(
            iterations=refine_iters,
            coarse_iterations=coarse_iters,
            max_size=refine_size,
            reference_spacing=reference_spacing,
            seed=seed,
        )
        settings = PropagationSettings(
            method=method,
            verify=not no_verify,
            verify_between=not no_verify_between,
            ignore_band=ignore_band,
            band_growth=band_growth,
            refinement=refinement,
            symmetric_flows=not no_symmetric_flows,
            fusion=fusion,
        )
        # An explicit --suggest-next 0 is refused by suggest_next_slices, rather than read as "propagate",
        # which would write (or replace) a label set the user did not ask for.
        if suggest_next is not None:
            path = suggest_next_slices(
                dataset,
                suggest_next,
                settings=settings,
                flow_settings=flow_settings,
                resume=resume,
                device=device,
            )
            Console(soft_wrap=True).print(f"suggestions written to {path}")
            return
        folder = propagate_dataset(
            dataset,
            name=name,
            settings=settings,
            flow_settings=flow_settings,
            resume=resume,
            device=device,
        )
        report = LabelSet.of(dataset, name).read_report()
    console = Console(soft_wrap=True)  # paths stay on one line, whole, for copying
    console.print(f"label set written to {folder} ({len(report['cases'])} cases)")
    if report["unannotated_cases"]:
        console.print(f"no annotation, not propagated: {', '.join(report['unannotated_cases'])}")
    means = report["summary"].get("agreement_mean", {})
    foreground = {
        label: scores["dice"]
        for label, scores in means.items()
        if label != "background" and scores["dice"] is not None
    }
    if foreground:
        dice = ", ".join(f"{label} {value:.3f}" for label, value in foreground.items())
        console.print(f"mean Dice against labelsTr: {dice}")


def default_suggest_count(argv: list[str]) -> list[str]:
    """Read a bare ``--suggest`` (the spelling before ``--suggest N`` existed) as ``--suggest 1``."""
    expanded: list[str] = []
    for position, token in enumerate(argv):
        expanded.append(token)
        following = argv[position + 1] if position + 1 < len(argv) else None
        if token == "--suggest" and (following is None or not following.lstrip("-").isdigit()):
            expanded.append("1")
    return expanded


def main(argv: list[str] | None = None) -> None:
    app(
        args=default_suggest_count(sys.argv[1:] if argv is None else list(argv)), prog_name="mipseg_propagate"
    )
