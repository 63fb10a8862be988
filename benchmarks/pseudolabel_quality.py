"""Quality of the MIP pseudo-labels for 1, 2 and 3 projection axes: published and calibrated rules.

Prints, for synthetic vessel volumes, the real aorta MRA and the two real microscopy volumes with
dense labels (``octa_vessels``, ``lightsheet_vessels``) in ``../shared/data``, the precision,
recall and Dice of S_1 (label value "vessel") and S_0's error (fraction of true vessel voxels labelled
background) for the axis sets (0,), (0, 1), (0, 1, 2) and the settings in ``SETTINGS``: the published
rule (S_1 wins where the annotation contradicts it), mipseg's default (contradicted S_1 -> ignore), and
the lower thresholds the measurements favour for several axes, and the calibrated rule
(:mod:`mipseg.pseudolabel.calibrated`, the stage's default) at several ``--grow-factor`` values.

Annotations are simulated as the contract says: on the MIP along axis a, a pixel is annotated where
the brightest voxel of its ray is a true vessel voxel. For the aorta only the aorto-iliac bifurcation
is labelled, so annotations come from that label and scores are computed inside its bounding box.

Usage::

    .venv/bin/python benchmarks/pseudolabel_quality.py [--cases 3] [--shape 48 96 96] [--aorta PATH]

Synthetic volumes come from ``mipseg.synthetic.make_vessel_volume`` ("synthetic") and from the small
tube phantom below ("tubes", with bright non-vessel blobs), each with an exact annotation and with the
imperfect drawing of ``mipseg.synthetic.simulate_mip_annotation(annotator_noise=True)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from scipy import ndimage

from mipseg import io
from mipseg.planning.mip import maximum_intensity_projection
from mipseg.pseudolabel.mip_backprojection import agreement_with_truth, pseudo_label_volume

AXIS_SETS = ((0,), (0, 1), (0, 1, 2))
SETTINGS = {
    "published": {"overlap": "vessel", "rule": "published"},
    "published+ignore": {"rule": "published"},
    "fg0.8 bright0.6": {"fg_factor": 0.8, "bright_factor": 0.6, "rule": "published"},
    "floor0.7 fg0.8 bright0.6": {
        "seed_floor": 0.7,
        "fg_factor": 0.8,
        "bright_factor": 0.6,
        "rule": "published",
    },
    "calibrated grow0.5": {"grow_factor": 0.5},
    "calibrated grow0.6": {"grow_factor": 0.6},
    "calibrated grow0.7": {"grow_factor": 0.7},
    "calibrated ray grow0.6": {"grow_factor": 0.6, "reference": "ray"},
    "calibrated floor0.7": {"seed_floor": 0.7},
    "calibrated bg0.2": {"background_factor": 0.2},
    "calibrated bg0.35": {"background_factor": 0.35},
    "calibrated bg0": {"background_factor": 0.0},
    "calibrated edge off": {"edge_radius": 0.0},
    "calibrated edge6": {"edge_sigmas": 6.0},
    "calibrated edge r1.8": {"edge_radius": 1.8},
    "calibrated (default)": {},
}
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_AORTA = DATA / "aorta_cemra.nii.gz"
REAL_DENSE = ("octa_vessels", "lightsheet_vessels")


def tube_phantom(shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A branching tube tree in noisy tissue with bright non-vessel blobs.

    Returns
    -------
    image : np.ndarray of float32, shape ``shape`` (arbitrary MR-like units)
    truth : np.ndarray of bool, shape ``shape`` (vessel voxels)
    """
    grid = np.stack(np.indices(shape), axis=-1).astype(np.float32)
    distance = np.full(shape, np.inf, dtype=np.float32)
    radius_at = np.zeros(shape, dtype=np.float32)
    extent = np.array(shape, dtype=np.float32)
    starts = [rng.uniform(0.1, 0.9, 3) * extent for _ in range(3)]
    for start in starts:
        points = [start]
        for _ in range(4):  # a wandering polyline per tree, with side branches
            step = rng.normal(0, 1, 3)
            step *= rng.uniform(0.2, 0.4) * extent.min() / np.linalg.norm(step)
            points.append(np.clip(points[-1] + step, 2, extent - 3))
        branches = [(points[i], points[i + 1], rng.uniform(1.0, 2.5)) for i in range(len(points) - 1)]
        for a, _b, radius in list(branches):
            step = rng.normal(0, 1, 3)
            tip = np.clip(a + step * 0.25 * extent.min() / np.linalg.norm(step), 2, extent - 3)
            branches.append((a, tip, max(0.8, radius * 0.6)))
        for a, b, radius in branches:
            d = _segment_distance(grid, a, b)
            closer = d < distance
            distance[closer], radius_at[closer] = d[closer], radius
    truth = distance <= radius_at
    tissue = 0.25 + 0.08 * ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 3) * 8
    image = tissue.astype(np.float32)
    # Vessels: bright with a partial-volume rim and slow intensity changes along the tree.
    profile = np.clip(1.0 - (distance - radius_at + 0.5), 0.0, 1.0)
    image += profile * (0.65 + 0.1 * rng.standard_normal())
    blobs = np.zeros(shape, dtype=bool)
    for _ in range(2):  # bright non-vessel structures (e.g. fat or bowel) that can occlude vessels
        centre = rng.uniform(0.2, 0.8, 3) * extent
        blobs |= np.linalg.norm(grid - centre, axis=-1) < rng.uniform(3, 6)
    image[blobs & ~truth] = 0.75
    image += rng.normal(0, 0.04, shape).astype(np.float32)
    return np.clip(image, 0, None) * 1000.0, truth


def _segment_distance(grid: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    direction = b - a
    t = np.clip(((grid - a) @ direction) / max(float(direction @ direction), 1e-6), 0.0, 1.0)
    return np.linalg.norm(grid - (a + t[..., None] * direction), axis=-1).astype(np.float32)


def simulate_annotations(
    image: np.ndarray, truth: np.ndarray, axes: tuple[int, ...], rng: np.random.Generator | None = None
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Annotation per axis (pixel = truth at the ray's brightest voxel) and the depth maps.

    With ``rng`` the drawing is imperfect the way ``mipseg.synthetic.simulate_mip_annotation``
    makes it (faint pieces missed, strokes one pixel wider).
    """
    annotations, depths = {}, {}
    for axis in axes:
        _, depth = maximum_intensity_projection(image, axis)
        if rng is None:
            annotation = np.take_along_axis(truth, np.expand_dims(depth, axis).astype(np.intp), axis)
            annotations[axis] = annotation.squeeze(axis)
        else:
            from mipseg.synthetic import simulate_mip_annotation

            drawn = simulate_mip_annotation(
                image, truth.astype(np.uint8), axis, annotator_noise=True, rng=rng
            )
            annotations[axis] = drawn > 0
        depths[axis] = depth
    return annotations, depths


def synthetic_volumes(
    num_cases: int, shape: tuple[int, int, int], seed: int, source: str
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, truth) pairs from ``mipseg.synthetic.make_vessel_volume`` or :func:`tube_phantom`."""
    rng = np.random.default_rng(seed)
    if source == "tubes":
        return [tube_phantom(shape, rng) for _ in range(num_cases)]
    from mipseg.synthetic import make_vessel_volume

    volumes = []
    for _ in range(num_cases):
        image, truth = make_vessel_volume(shape, (1.0, 1.0, 1.0), rng)
        volumes.append((np.asarray(image, np.float32), np.asarray(truth) > 0))
    return volumes


def score(
    image: np.ndarray,
    truth: np.ndarray,
    axes: tuple[int, ...],
    setting: str,
    region: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
) -> dict[str, float]:
    """Agreement of the label map with the truth (inside ``region``), plus the background share."""
    annotations, depths = simulate_annotations(image, truth, axes, rng)
    labels, _, _ = pseudo_label_volume(image, annotations, depths, ignore_value=2, **SETTINGS[setting])
    inside = labels if region is None else labels[region]
    agreement = agreement_with_truth(labels, truth, region=region)
    return {**agreement, "background_fraction": float(np.mean(inside == 0))}


def table(title: str, rows: dict[tuple[tuple[int, ...], str], list[dict[str, float]]]) -> Table:
    out = Table(title=title)
    for column in ("axes", "setting", "precision", "recall", "Dice", "S_0 error", "S_0 share"):
        out.add_column(column, justify="right")
    for (axes, setting), scores in rows.items():
        mean = {k: float(np.nanmean([s[k] for s in scores])) for k in scores[0]}
        out.add_row(
            ",".join(map(str, axes)),
            setting,
            f"{mean['precision']:.3f}",
            f"{mean['recall']:.3f}",
            f"{mean['dice']:.3f}",
            f"{mean['background_error']:.4f}",
            f"{mean['background_fraction']:.3f}",
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--shape", type=int, nargs=3, default=(48, 96, 96))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--aorta", type=Path, default=DEFAULT_AORTA)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument(
        "--sources",
        nargs="+",
        default=["synthetic", "tubes", "aorta", *REAL_DENSE],
        choices=["synthetic", "tubes", "aorta", *REAL_DENSE],
    )
    parser.add_argument(
        "--drawings", nargs="+", default=["exact", "imperfect"], choices=["exact", "imperfect"]
    )
    args = parser.parse_args()
    console = Console()

    for source in [s for s in args.sources if s in ("synthetic", "tubes")]:
        volumes = synthetic_volumes(args.cases, tuple(args.shape), args.seed, source)
        for drawing in args.drawings:
            rows = {
                (axes, setting): [
                    score(
                        image,
                        truth,
                        axes,
                        setting,
                        rng=None if drawing == "exact" else np.random.default_rng(i),
                    )
                    for i, (image, truth) in enumerate(volumes)
                ]
                for axes in AXIS_SETS
                for setting in args.settings
            }
            title = f"{source} ({args.cases} cases, shape {tuple(args.shape)}), {drawing} annotation"
            console.print(table(title, rows))

    for name in [s for s in args.sources if s in REAL_DENSE]:
        image, _ = io.read_image(DATA / f"{name}.nii.gz", dtype=np.float32)
        truth = io.read_image(DATA / f"{name}_label.nii.gz")[0] > 0
        rows = {
            (axes, setting): [score(image, truth, axes, setting)]
            for axes in AXIS_SETS
            for setting in args.settings
        }
        console.print(table(f"{name} (dense label, exact annotation, whole volume)", rows))

    label_path = args.aorta.with_name(args.aorta.name.replace(".nii.gz", "_bifurcation_label.nii.gz"))
    if "aorta" not in args.sources:
        pass
    elif args.aorta.is_file() and label_path.is_file():
        image, _ = io.read_image(args.aorta, dtype=np.float32)
        truth = io.read_image(label_path)[0] > 0
        region = np.zeros_like(truth)
        region[ndimage.find_objects(truth.astype(np.uint8))[0]] = True
        rows = {
            (axes, setting): [score(image, truth, axes, setting, region)]
            for axes in AXIS_SETS
            for setting in args.settings
        }
        console.print(table("aorta_cemra (bifurcation label; scored inside its bounding box)", rows))
    else:
        console.print(f"[yellow]aorta data not found at {args.aorta}; skipped[/]")


if __name__ == "__main__":
    main()
