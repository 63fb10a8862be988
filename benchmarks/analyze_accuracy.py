"""Accuracy and scale of ``mipseg_analyze`` (tables for documentation/analyze.md).

Three parts, each printed as a markdown table:

``synthetic``  vessel trees of :func:`mipseg.synthetic.make_vessel_volume_with_centrelines`, whose
               true centrelines and radii are known: mean centreline distance, true branches
               found, false branches, branch counts, and the error of the branch mean radius by
               class of true radius. Two labels per volume: the generator's label (all vessels,
               sub-voxel ones drawn one voxel wide) and the trees redrawn without segments
               thinner than one voxel ("resolved"); isotropic and anisotropic spacing.
``real``       the real volumes in ../shared/data with a dense label (OCTA, light-sheet): the
               analysis of the dense label next to that of two masks a user could get from
               mipseg without a trained model at hand: the MIP pseudo-label (vessel voxels of
               :func:`mipseg.pseudolabel.mip_backprojection.pseudo_label_volume` from the simulated
               z-MIP drawing) and the best global threshold of the image (oracle, chosen with the
               label). With ``--models WORKDIR`` (a ``benchmarks/real_vessels.py`` work folder) a
               second table analyses, on each volume's held-out test half, the dense label and
               the predictions of the models trained there (MIP-only ``pseudo mip``, ``dense``).
``scale``      ``mipseg_analyze`` as a subprocess on 512 x 512 x 300 masks: wall time, CPU time
               (user + sys) and peak resident memory of the process.

Usage::

    .venv/bin/python benchmarks/analyze_accuracy.py synthetic [--seeds 8] [--shape 64 96 96]
    .venv/bin/python benchmarks/analyze_accuracy.py real [--data ../shared/data] [--models WORKDIR]
    .venv/bin/python benchmarks/analyze_accuracy.py scale [--work /tmp/analyze_scale]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPOSITORY = Path(__file__).resolve().parents[1]


def synthetic(seeds: int, shape: tuple[int, int, int]) -> None:
    from mipseg.analysis.accuracy import clip_to_mask, compare_with_truth, drop_thin_segments, true_branches
    from mipseg.analysis.analyze_api import analyze_mask
    from mipseg.io import Geometry
    from mipseg.synthetic import make_vessel_volume_with_centrelines
    from mipseg.synthetic.vessels import draw_vessels

    rows, classes = [], {}
    for spacing in ((1.0, 1.0, 1.0), (2.0, 1.0, 1.0)):
        for variant in ("all vessels", "resolved (r >= 1 voxel)"):
            totals = {"true": 0, "measured": 0, "found": 0, "false": 0, "distance": [], "time": 0.0}
            for seed in range(seeds):
                _, label, trees = make_vessel_volume_with_centrelines(
                    shape, spacing, np.random.default_rng(seed)
                )
                if variant != "all vessels":
                    trees = drop_thin_segments(trees, min(spacing))
                    label = draw_vessels(trees, shape, spacing, min(spacing))[2]
                start = time.perf_counter()
                graph, _, _, _ = analyze_mask(label.astype(bool), Geometry.identity(spacing))
                totals["time"] += time.perf_counter() - start
                every = true_branches(trees)
                result = compare_with_truth(
                    graph, clip_to_mask(every, label, spacing), spacing, all_truth=every
                )
                totals["true"] += result["true_branches"]
                totals["measured"] += result["measured_branches"]
                totals["found"] += result["found_branches"]
                totals["false"] += result["false_branches"]
                totals["distance"].append(result["centreline_distance_voxels"])
                for row in result["radius_classes"]:
                    key = (spacing, variant, row["radius_voxels"])
                    entry = classes.setdefault(
                        key, {"n": 0, "signed": 0.0, "abs": 0.0, "rel": 0.0, "absrel": 0.0}
                    )
                    if row["branches"]:
                        n = row["branches"]
                        entry["n"] += n
                        entry["signed"] += n * row["mean_error_mm"]
                        entry["abs"] += n * row["mean_abs_error_mm"]
                        entry["rel"] += n * row["mean_relative_error"]
                        entry["absrel"] += n * row["mean_abs_relative_error"]
            rows.append((spacing, variant, totals))
    print(f"\n{seeds} synthetic volumes of {shape} per row (seeds 0..{seeds - 1})\n")
    print(
        "| spacing (z, y, x) mm | label | true branches | measured | found | false "
        "| centreline distance (voxels) | s/volume |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for spacing, variant, t in rows:
        print(
            f"| {spacing} | {variant} | {t['true']} | {t['measured']} "
            f"| {t['found'] / max(t['true'], 1):.1%} | {t['false']} | {np.mean(t['distance']):.2f} "
            f"| {t['time'] / seeds:.2f} |"
        )
    print("\nBranch mean radius error by class of true radius (voxels of the smallest spacing = 1 mm)\n")
    print(
        "| spacing | label | true radius (voxels) | branches | mean error (mm) | mean abs error (mm) "
        "| mean relative error | mean abs relative error |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for (spacing, variant, radius), e in classes.items():
        if e["n"]:
            n = e["n"]
            print(
                f"| {spacing} | {variant} | {radius} | {n} | {e['signed'] / n:+.3f} | {e['abs'] / n:.3f} | "
                f"{e['rel'] / n:+.1%} | {e['absrel'] / n:.1%} |"
            )


REAL_VOLUMES = ("octa_vessels", "lightsheet_vessels")
MODEL_ROWS = {"pseudo_mip": "model on MIP pseudo-labels (mip trainer)", "dense": "model on dense labels"}


def print_analysis_header() -> None:
    print(
        "\n| volume | mask | Dice vs dense | branches | branch points | total length (mm) | mean radius (mm) "
        "| components | centreline distance to dense (mm) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")


def print_analysis_rows(name: str, masks: dict[str, np.ndarray], geometry) -> None:
    """One table row per mask; the first mask is the dense label the others are compared with."""
    from scipy.spatial import cKDTree

    from mipseg.analysis.analyze_api import analyze_mask
    from mipseg.metrics import dice as dice_score

    dense = next(iter(masks.values()))
    reference = None
    for mask_name, mask in masks.items():
        graph, _, measures, _ = analyze_mask(mask, geometry)
        points = graph.points * np.asarray(geometry.spacing_zyx)
        if reference is None:
            reference, distance = points, "-"
        else:
            there = cKDTree(reference).query(points)[0].mean()
            back = cKDTree(points).query(reference)[0].mean()
            distance = f"{there:.2f} / {back:.2f}"
        print(
            f"| {name} | {mask_name} | {dice_score(dense, mask):.3f} | {measures['branches']} "
            f"| {measures['branch_points']} | {measures['total_length_mm']:.0f} "
            f"| {measures['mean_radius_mm']:.2f} | {measures['components']} | {distance} |"
        )


def real_models(workdir: Path) -> None:
    """The test halves of ``real_vessels.py``: dense label against the models' predictions."""
    from mipseg import io

    print_analysis_header()
    for raw in sorted((workdir / "raw").glob("Dataset*_*")):
        name = raw.name.split("_", 1)[1]
        dense, geometry = io.read_image(raw / "labelsTs" / f"{name}.nii.gz")
        masks = {"dense label (test half)": dense > 0}
        dataset_id = raw.name.split("_")[0].removeprefix("Dataset").lstrip("0")
        for tag, title in MODEL_ROWS.items():
            prediction = workdir / f"predictions_{dataset_id}_{tag}" / f"{name}.nii.gz"
            if prediction.is_file():
                masks[title] = io.read_image(prediction)[0] > 0
        print_analysis_rows(name, masks, geometry)


def real(data: Path, models: Path | None) -> None:
    from mipseg import io
    from mipseg.planning.mip import maximum_intensity_projection
    from mipseg.pseudolabel.mip_backprojection import pseudo_label_volume
    from mipseg.synthetic import best_threshold_dice

    print_analysis_header()
    for name in REAL_VOLUMES:
        image, geometry = io.read_image(data / f"{name}.nii.gz", np.float32)
        dense = io.read_image(data / f"{name}_label.nii.gz")[0] > 0
        _, depth = maximum_intensity_projection(image, 0)
        drawing = np.take_along_axis(dense, np.expand_dims(depth, 0).astype(np.intp), 0)[0]
        pseudo = pseudo_label_volume(image, {0: drawing}, {0: depth}, ignore_value=2)[0] == 1
        _, threshold = best_threshold_dice([image], [dense.astype(np.uint8)])
        masks = {
            "dense label": dense,
            "MIP pseudo-label (vessel voxels)": pseudo,
            "best global threshold": image > threshold,
        }
        print_analysis_rows(name, masks, geometry)
    if models is not None:
        real_models(models)


def scale(work: Path, data: Path, synthetic_mask: Path | None) -> None:
    from mipseg import io

    masks = {}
    dense = io.read_image(data / "lightsheet_vessels_label.nii.gz")[0]
    mirrored = np.pad(
        dense, [(0, 300 - dense.shape[0]), (0, 512 - dense.shape[1]), (0, 512 - dense.shape[2])], "symmetric"
    )
    masks["light-sheet label mirrored to 300 x 512 x 512"] = io.write_image(
        (mirrored > 0).astype(np.uint8),
        io.Geometry.identity((1.0, 0.8, 0.8)),
        work / "lightsheet" / "mirrored.nii.gz",
    )
    if synthetic_mask is None:
        from mipseg.synthetic import make_vessel_volume

        _, label = make_vessel_volume((300, 512, 512), (0.6, 0.4, 0.4), np.random.default_rng(0))
        synthetic_mask = io.write_image(
            label, io.Geometry.identity((0.6, 0.4, 0.4)), work / "synthetic" / "synthetic.nii.gz"
        )
    masks["synthetic vessel label 300 x 512 x 512"] = synthetic_mask
    print("\n| mask | vessel voxels | outputs | wall (s) | CPU user+sys (s) | peak RSS (GB) | load average |")
    print("|---|---|---|---|---|---|---|")
    for title, path in masks.items():
        fraction = float(io.read_image(path)[0].mean())
        for flags in ([], ["--no-mesh"]):
            output = work / "out" / path.parent.name / ("mesh" if not flags else "no_mesh")
            command = [
                str(Path(sys.executable).parent / "mipseg_analyze"),
                "-i",
                str(path.parent),
                "-o",
                str(output),
                *flags,
            ]
            print(f"{title}: {' '.join(command)}", file=sys.stderr)
            load = os.getloadavg()[0]
            wall, cpu, peak = _measured_run(command)
            print(
                f"| {title} | {fraction:.2%} | {'all' if not flags else 'all but the STL'} "
                f"| {wall:.0f} | {cpu:.0f} | {peak:.2f} | {load:.1f} |"
            )


def _measured_run(command: list[str]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + sys) and peak RSS (GB) of ``command``, in a fresh wrapper process.

    The wrapper keeps ``ru_maxrss`` of its children to this one command (a process's children
    maximum covers every child it ever had).
    """
    wrapper = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
        "r = resource.getrusage(resource.RUSAGE_CHILDREN); "
        "print(time.perf_counter() - t, r.ru_utime + r.ru_stime, r.ru_maxrss / 1e6)"
    )
    result = subprocess.run(
        [sys.executable, "-c", wrapper, *command],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    wall, cpu, peak = (float(v) for v in result.stdout.split())
    return wall, cpu, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=("synthetic", "real", "scale"))
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 96, 96))
    parser.add_argument("--data", type=Path, default=REPOSITORY.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, default=Path("/tmp/mipseg_analyze_scale"))
    parser.add_argument(
        "--models", type=Path, default=None, help="real: a real_vessels.py work folder with trained models"
    )
    parser.add_argument(
        "--synthetic-mask", type=Path, default=None, help="reuse a 300x512x512 synthetic label"
    )
    args = parser.parse_args()
    if args.part == "synthetic":
        synthetic(args.seeds, tuple(args.shape))
    elif args.part == "real":
        real(args.data, args.models)
    else:
        scale(args.work, args.data, args.synthetic_mask)


if __name__ == "__main__":
    main()
