"""Compare a centreline graph with the true centrelines of a synthetic vessel tree.

The synthetic generator (:mod:`mipseg.synthetic.vessels`) grows every tree as segments of
constant radius between bifurcations, so it knows the true centreline points and radii. A
true branch is what a perfect skeleton of the drawn label would show as one branch: a chain of
segments from a root or bifurcation to the next bifurcation or end (a segment whose second
child was never grown continues into its only child).

Matching, all in mm: a centreline voxel is *on* the truth when it lies within
``max(true radius, one voxel)`` of the true centreline (polyline sampled every tenth of a voxel).
A true branch is *found* when at least half of its length is within that distance of the
measured centreline; a measured branch is *false* when more than half of its voxels are off
the truth. A measured branch is matched to the true branch nearest to most of its voxels, and
its mean radius (over the voxels :func:`~mipseg.analysis.measures.radius_voxels` keeps, as in
the branch table) is compared with the true radius at those voxels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from mipseg.analysis.graph import CentrelineGraph
from mipseg.analysis.measures import radius_voxels
from mipseg.synthetic.vessels import Centreline

RADIUS_CLASSES_VOXELS = ((0.0, 1.0), (1.0, 1.5), (1.5, 2.0), (2.0, np.inf))


@dataclass(frozen=True)
class TrueBranch:
    """One true branch: polyline points ``(z, y, x)`` in mm (voxel 0 at 0) and radius (mm) per point."""

    points: np.ndarray
    radii: np.ndarray


def true_branches(trees: Sequence[Centreline]) -> list[TrueBranch]:
    """True branches of the generator's trees (segment chains between bifurcations)."""
    branches = []
    for tree in trees:
        if tree.segment is None or tree.parent is None:
            raise ValueError("true_branches needs centrelines with segment structure")
        num_segments = len(tree.parent)
        children = [np.flatnonzero(tree.parent == s) for s in range(num_segments)]
        points = [tree.positions[tree.segment == s] for s in range(num_segments)]
        radii = [tree.radii[tree.segment == s] for s in range(num_segments)]
        starts = [s for s in range(num_segments) if tree.parent[s] < 0 or len(children[tree.parent[s]]) != 1]
        for start in starts:
            chain = [start]
            while len(children[chain[-1]]) == 1:
                chain.append(int(children[chain[-1]][0]))
            parent = tree.parent[start]
            head = [points[parent][-1:]] if parent >= 0 else []
            head_radius = [radii[start][:1]] if parent >= 0 else []
            branches.append(
                TrueBranch(
                    np.concatenate(head + [points[s] for s in chain]).astype(float),
                    np.concatenate(head_radius + [radii[s] for s in chain]).astype(float),
                )
            )
    return branches


def drop_thin_segments(trees: Sequence[Centreline], min_radius: float) -> list[Centreline]:
    """The trees without their segments thinner than ``min_radius`` (mm).

    Children are never thicker than their parent (Murray's law), so what is left of a tree is
    still one tree. Redraw it with :func:`mipseg.synthetic.vessels.draw_vessels` for a label
    whose every vessel is resolved (sub-voxel vessels come out as broken voxel chains).
    """
    kept_trees = []
    for tree in trees:
        segment_radius = np.asarray([tree.radii[tree.segment == s][0] for s in range(len(tree.parent))])
        keep = segment_radius >= min_radius
        if not keep.any():
            continue
        new_id = np.cumsum(keep) - 1
        parent = np.asarray([new_id[p] if p >= 0 else -1 for p in tree.parent[keep]], np.int32)
        points = keep[tree.segment]
        kept_trees.append(
            Centreline(
                tree.positions[points],
                tree.radii[points],
                tree.brightness[points],
                new_id[tree.segment[points]].astype(np.int32),
                parent,
            )
        )
    return kept_trees


def clip_to_mask(branches: Sequence[TrueBranch], mask: np.ndarray, spacing_zyx: Sequence[float]):
    """Drop true branches whose centreline lies mostly outside ``mask`` (cut off by the body edge)."""
    spacing = np.asarray(spacing_zyx, float)
    kept = []
    for branch in branches:
        index = np.round(branch.points / spacing).astype(int)
        inside = np.all((index >= 0) & (index < mask.shape), axis=1)
        hit = np.zeros(len(index), bool)
        hit[inside] = mask[tuple(index[inside].T)]
        if hit.mean() >= 0.5:
            kept.append(branch)
    return kept


def compare_with_truth(
    graph: CentrelineGraph,
    truth: Sequence[TrueBranch],
    spacing_zyx: Sequence[float],
    *,
    all_truth: Sequence[TrueBranch] | None = None,
) -> dict[str, object]:
    """Centreline distance, radius error by class, true branches found and false branches.

    Parameters
    ----------
    graph
        Measured centreline graph in voxel coordinates of the image the truth was drawn in.
    truth
        True branches (:func:`true_branches`), points in mm with voxel 0 at 0.
    spacing_zyx
        Voxel spacing (mm), numpy order.
    all_truth
        Every true branch, also those :func:`clip_to_mask` left out of ``truth`` because the
        label barely holds them: the centreline distance, false branches and radius matching
        use these (a measured piece of a barely drawn vessel is not a false branch); default
        ``truth``.

    Returns
    -------
    dict
        ``centreline_distance_mm`` (mean over centreline voxels of the distance to the true
        centreline), ``centreline_distance_voxels`` (the same over the smallest spacing),
        ``true_branches``, ``found_branches``, ``found_fraction``, ``measured_branches``,
        ``false_branches``, and ``radius_classes``: per class of true radius (in voxels of the
        smallest spacing), the matched branches, mean signed and mean absolute error of the
        branch mean radius in mm and relative to the true radius.
    """
    spacing = np.asarray(spacing_zyx, float)
    voxel = float(spacing.min())
    dense = [_densify(branch, 0.1 * voxel) for branch in (truth if all_truth is None else all_truth)]
    truth_points = np.concatenate([points for points, _ in dense])
    truth_radii = np.concatenate([radii for _, radii in dense])
    truth_branch = np.concatenate([np.full(len(points), i) for i, (points, _) in enumerate(dense)])
    measured = graph.points * spacing
    distance, nearest = cKDTree(truth_points).query(measured)
    on_truth = distance <= np.maximum(truth_radii[nearest], float(spacing.max()))

    measured_tree = cKDTree(measured)
    found = 0
    for points, radii in (_densify(branch, 0.1 * voxel) for branch in truth):
        gap, _ = measured_tree.query(points)
        found += int(np.mean(gap <= np.maximum(radii, float(spacing.max()))) >= 0.5)

    false_branches = 0
    errors: list[tuple[float, float]] = []  # (true radius, measured mean radius)
    for index, branch in enumerate(graph.branches):
        if np.mean(on_truth[branch]) < 0.5:
            false_branches += 1
            continue
        matched = np.bincount(truth_branch[nearest[branch][on_truth[branch]]]).argmax()
        # the voxels the reported branch radius uses, where they lie on the matched true branch
        used = radius_voxels(graph, index, spacing)
        own = used[on_truth[used] & (truth_branch[nearest[used]] == matched)]
        if len(own) == 0:
            own = branch[on_truth[branch] & (truth_branch[nearest[branch]] == matched)]
        errors.append((float(np.mean(truth_radii[nearest[own]])), float(np.mean(graph.radii[own]))))
    return {
        "centreline_distance_mm": float(distance.mean()),
        "centreline_distance_voxels": float(distance.mean() / voxel),
        "true_branches": len(truth),
        "found_branches": found,
        "found_fraction": found / len(truth) if truth else float("nan"),
        "measured_branches": graph.num_branches,
        "false_branches": false_branches,
        "radius_classes": _radius_classes(errors, voxel),
    }


def _densify(branch: TrueBranch, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Polyline points every ``step`` mm (the generator samples every 0.4 voxel)."""
    points, radii = branch.points, branch.radii
    if len(points) < 2:
        return points, radii
    segment = np.linalg.norm(np.diff(points, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(segment)])
    samples = np.arange(0.0, arc[-1] + step / 2, step)
    dense = np.stack([np.interp(samples, arc, points[:, k]) for k in range(3)], axis=1)
    return dense, np.interp(samples, arc, radii)


def _radius_classes(errors: list[tuple[float, float]], voxel: float) -> list[dict[str, float]]:
    rows = []
    for low, high in RADIUS_CLASSES_VOXELS:
        pairs = np.asarray([(t, m) for t, m in errors if low <= t / voxel < high]).reshape(-1, 2)
        signed = pairs[:, 1] - pairs[:, 0]
        rows.append(
            {
                "radius_voxels": f"{low:g}-{high:g}" if np.isfinite(high) else f">= {low:g}",
                "branches": len(pairs),
                "mean_error_mm": float(signed.mean()) if len(pairs) else float("nan"),
                "mean_abs_error_mm": float(np.abs(signed).mean()) if len(pairs) else float("nan"),
                "mean_abs_error_voxels": float(np.abs(signed).mean() / voxel) if len(pairs) else float("nan"),
                "mean_relative_error": float(np.mean(signed / pairs[:, 0])) if len(pairs) else float("nan"),
                "mean_abs_relative_error": float(np.mean(np.abs(signed) / pairs[:, 0]))
                if len(pairs)
                else float("nan"),
            }
        )
    return rows
