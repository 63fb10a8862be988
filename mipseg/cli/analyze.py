"""mipseg_analyze: centrelines, branch graph, radii, lengths and a surface mesh of vessel masks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mipseg.analysis import DEFAULT_SPUR_FACTOR
from mipseg.cli._common import DebugOption, make_app, reported_errors

app = make_app(
    "Analyse vessel masks (e.g. mipseg_predict output): centreline graph, per-branch length, radii and "
    "tortuosity, totals per case, a surface mesh and a QC picture, in mm and world coordinates."
)


@app.command()
def analyze(
    input_path: Annotated[
        Path, typer.Option("-i", "--input", help="Folder of masks / label maps (or one file).")
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")],
    label: Annotated[
        int | None,
        typer.Option(
            "--label", help="Class to analyse in a multi-label map (default: masks must be binary)."
        ),
    ] = None,
    spur_factor: Annotated[
        float,
        typer.Option(
            "--spur-factor", help="Remove end branches shorter than this many radii at their branch point."
        ),
    ] = DEFAULT_SPUR_FACTOR,
    no_mesh: Annotated[bool, typer.Option("--no-mesh", help="Do not write {case}.stl.")] = False,
    qc_axis: Annotated[
        int, typer.Option("--qc-axis", help="Projection axis of the QC picture (numpy axis, 0 = z).")
    ] = 0,
    continue_: Annotated[
        bool, typer.Option("--continue", help="Skip cases whose outputs already exist.")
    ] = False,
    num_processes: Annotated[
        int, typer.Option("-np", "--num-processes", help="Cases analysed at once (memory grows with it).")
    ] = 1,
    debug: DebugOption = False,
) -> None:
    """Analyse every mask in -i into -o: {case}_branches.csv, _graph.json, _centreline.nii.gz, .stl, _qc.png.

    Prints one line per case (branches, length, mean radius) and writes summary.csv / summary.json.
    Bad cases are listed at the end (exit 2); the others are still analysed.
    """
    from mipseg.analysis.analyze_api import analyze_folder

    with reported_errors(debug):
        summary = analyze_folder(
            input_path,
            output,
            label=label,
            spur_factor=spur_factor,
            mesh=not no_mesh,
            qc_axis=qc_axis,
            resume=continue_,
            num_processes=num_processes,
        )
    for line in summary_lines(summary):
        typer.echo(line)
    typer.echo(f"{len(summary['cases'])} case(s) analysed; outputs and summary.csv in {output}")


def summary_lines(summary: dict) -> list[str]:
    """One line per case: branches, branch points, total length, mean radius, volume."""
    return [
        f"{case['case']}: {case['branches']} branches, {case['branch_points']} branch points, "
        f"total length {case['total_length_mm']:.1f} mm, mean radius {case['mean_radius_mm']:.2f} mm, "
        f"vessel volume {case['vessel_volume_mm3']:.1f} mm^3, {case['components']} component(s)"
        for case in summary["cases"]
    ]


def main() -> None:
    app(prog_name="mipseg_analyze")
