"""The centreline graph and its clean-up: short links inside one junction contracted, degree-2 nodes joined.

Thinning a thick vessel often splits one bifurcation into two or three junctions a voxel or
two apart, joined by short "branches", and leaves tiny loops around small cavities or where
two vessels touch. A link between branch points shorter than ``spur_factor`` times the radius
there lies inside the junction: its ends become one node and the link is dropped; a loop that
short is dropped too. Nodes left with two branches are then no branch points, and their two
branches become one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CentrelineGraph:
    """Centreline voxels, their radii, and the branches and nodes that connect them.

    Attributes
    ----------
    points : np.ndarray of int64, shape (n, 3)
        Voxel indices ``(z, y, x)`` of the centreline voxels.
    radii : np.ndarray of float64, shape (n,)
        Distance (mm) from each centreline voxel centre to the nearest background voxel centre.
    branches : list of np.ndarray of int64
        Per branch, indices into ``points`` from its first node to its last (both included).
    branch_nodes : np.ndarray of int64, shape (num_branches, 2)
        Node at the start and at the end of each branch (equal for a loop).
    branch_lengths : np.ndarray of float64, shape (num_branches,)
        Path length (mm) along the centreline voxels.
    node_positions : np.ndarray of float64, shape (num_nodes, 3)
        Voxel coordinates ``(z, y, x)`` of each node (mean of a junction's voxels).
    node_degrees : np.ndarray of int64, shape (num_nodes,)
        Branch ends at each node: 1 for an end point, 3 or more for a branch point; 0 for the
        node standing in for a closed loop without end or branch point.
    node_radii : np.ndarray of float64, shape (num_nodes,)
        Largest radius (mm) among the node's voxels.
    """

    points: np.ndarray
    radii: np.ndarray
    branches: list[np.ndarray]
    branch_nodes: np.ndarray
    branch_lengths: np.ndarray
    node_positions: np.ndarray
    node_degrees: np.ndarray
    node_radii: np.ndarray

    @property
    def num_branches(self) -> int:
        return len(self.branches)

    def shifted(self, offset_zyx: Sequence[int]) -> CentrelineGraph:
        """The same graph with voxel coordinates moved by ``offset_zyx`` (from a crop back to the image)."""
        offset = np.asarray(offset_zyx, np.int64)
        return CentrelineGraph(
            self.points + offset,
            self.radii,
            self.branches,
            self.branch_nodes,
            self.branch_lengths,
            self.node_positions + offset,
            self.node_degrees,
            self.node_radii,
        )


def simplify(graph: CentrelineGraph, spacing_zyx: Sequence[float], spur_factor: float) -> CentrelineGraph:
    """Contract short junction-to-junction links and join branches through nodes of degree 2."""
    spacing = np.asarray(spacing_zyx, float)
    num_nodes = len(graph.node_degrees)
    root = np.arange(num_nodes)

    def find(node: int) -> int:
        while root[node] != node:
            root[node] = root[root[node]]
            node = root[node]
        return node

    kept = []
    for index, (start, end) in enumerate(graph.branch_nodes):
        both_junctions = graph.node_degrees[start] >= 3 and graph.node_degrees[end] >= 3
        reach = spur_factor * max(graph.node_radii[start], graph.node_radii[end])
        if both_junctions and graph.branch_lengths[index] < reach:
            root[find(start)] = find(end)
            continue
        kept.append(index)
    groups = np.asarray([find(n) for n in range(num_nodes)], np.int64)
    branches = [graph.branches[i] for i in kept]
    ends = [[int(groups[graph.branch_nodes[i][0]]), int(groups[graph.branch_nodes[i][1]])] for i in kept]
    lengths = [float(graph.branch_lengths[i]) for i in kept]
    branches, ends, lengths = _join_through_degree_two(graph.points, spacing, branches, ends, lengths)

    used = sorted({n for pair in ends for n in pair})
    new_id = {old: new for new, old in enumerate(used)}
    positions = np.asarray([graph.node_positions[groups == g].mean(axis=0) for g in used]).reshape(-1, 3)
    radii = np.asarray([graph.node_radii[groups == g].max() for g in used], float)
    branch_nodes = np.asarray([[new_id[a], new_id[b]] for a, b in ends], np.int64).reshape(-1, 2)
    degrees = np.zeros(len(used), np.int64)
    np.add.at(degrees, branch_nodes.ravel(), 1)
    for start, end in branch_nodes:
        if start == end and degrees[start] == 2:
            degrees[start] = 0  # a closed loop on its own
    return CentrelineGraph(
        points=graph.points,
        radii=graph.radii,
        branches=branches,
        branch_nodes=branch_nodes,
        branch_lengths=np.asarray(lengths, float),
        node_positions=positions,
        node_degrees=degrees,
        node_radii=radii,
    )


def _join_through_degree_two(points, spacing, branches, ends, lengths):
    """Concatenate the two branches meeting at every node that has exactly two branch ends."""
    branches, ends, lengths = list(branches), [list(e) for e in ends], list(lengths)
    alive = [True] * len(branches)
    incident: dict[int, list[int]] = {}
    for index, (start, end) in enumerate(ends):
        incident.setdefault(start, []).append(index)
        incident.setdefault(end, []).append(index)
    for node in list(incident):
        members = [i for i in incident[node] if alive[i]]
        if len(members) != 2 or members[0] == members[1]:
            continue
        first, second = members
        path_a = branches[first] if ends[first][1] == node else branches[first][::-1]
        end_a = ends[first][0] if ends[first][1] == node else ends[first][1]
        path_b = branches[second] if ends[second][0] == node else branches[second][::-1]
        end_b = ends[second][1] if ends[second][0] == node else ends[second][0]
        gap = float(np.linalg.norm((points[path_a[-1]] - points[path_b[0]]) * spacing))
        joined = np.concatenate([path_a, path_b[1:] if path_a[-1] == path_b[0] else path_b])
        branches[first], ends[first] = joined, [end_a, end_b]
        lengths[first] += lengths[second] + gap
        alive[second] = False
        for other in (end_b,):
            incident[other] = [first if i == second else i for i in incident[other]]
        incident[node] = []
    keep = [i for i in range(len(branches)) if alive[i]]
    return [branches[i] for i in keep], [ends[i] for i in keep], [lengths[i] for i in keep]
