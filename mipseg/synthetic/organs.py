"""Synthetic organ volumes: one smooth, non-convex organ with touching neighbours of similar brightness.

The organ is a union of a main ellipsoid and two or three lobes, minus a notch, evaluated on
smoothly displaced coordinates, so it is smooth and clearly non-convex (like a liver or a
spleen with its hilum). Two or three neighbours are grown against its surface so that they
touch it with about the organ's brightness; only texture and a faint partial-volume edge
separate them, which is what makes organ boundaries hard in practice. The image is MR-like
(T1): fat about 600, organs about 400, other tissue about 250, 0 outside the body, with a
slice profile along z for thick slices, a bias field and Rician noise.

Multi-organ volumes (``organ_classes`` > 1) label some of the neighbours too (classes 2, 3, ...),
so one drawn slice holds several classes that touch each other at about the same brightness.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from mipseg.errors import InputError
from mipseg.synthetic.fields import (
    Shape3,
    Spacing3,
    bias_field,
    ellipsoid_level,
    elliptical_body,
    random_rotation,
    rician_noise,
    smooth_field,
    voxel_centres_mm,
)

ORGAN_INTENSITY = 400.0
TISSUE_INTENSITY = 250.0
FAT_INTENSITY = 600.0
MAX_ORGAN_CLASSES = 4  # the organ and up to three labelled neighbours
MAX_PLACEMENT_TRIES = 40  # neighbours tried before a multi-organ volume gives up (tiny shapes)
MIN_NEIGHBOUR_SHARE = 0.12  # a labelled neighbour's least volume, as a share of the organ's
LABELLED_SCALE = (0.6, 0.9)  # a labelled neighbour's semi-axes, times the organ's size (look-alikes 0.5-0.8)
LABELLED_CONTRAST = (0.8, 1.2, 0.7)  # brightness of labelled neighbour 1, 2, 3 relative to a look-alike
CROSSED_SHARE = 0.2  # a labelled neighbour covers the organ's middle slice +- this share of its slices


def _organ_shape(
    grid: tuple[np.ndarray, np.ndarray, np.ndarray], centre: np.ndarray, size: float, rng: np.random.Generator
) -> np.ndarray:
    """Boolean organ mask: main ellipsoid plus lobes, minus a notch (non-convex by construction).

    Parameters
    ----------
    grid
        Physical ``(z, y, x)`` coordinates of every voxel (already displaced for smooth deformation).
    centre : np.ndarray, shape (3,)
        Organ centre in mm.
    size
        Typical semi-axis in mm.
    """
    main_axes = size * rng.uniform([1.2, 0.7, 0.8], [1.6, 0.9, 1.1])
    main_rotation = random_rotation(rng)
    organ = ellipsoid_level(grid, centre, main_axes, main_rotation) < 1.0
    for _ in range(int(rng.integers(2, 4))):
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        lobe_centre = centre + direction * main_axes * rng.uniform(0.7, 0.9)
        lobe_axes = main_axes * rng.uniform(0.4, 0.6, 3)
        organ |= ellipsoid_level(grid, lobe_centre, lobe_axes, random_rotation(rng)) < 1.0
    # A notch cut into the surface (the hilum) keeps the organ non-convex even if the lobes overlap.
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    notch_centre = centre + direction * main_axes * 0.95
    notch_axes = main_axes * rng.uniform(0.3, 0.45, 3)
    organ &= ~(ellipsoid_level(grid, notch_centre, notch_axes, random_rotation(rng)) < 1.0)
    return organ


def _touching_neighbours(
    grid: tuple[np.ndarray, np.ndarray, np.ndarray],
    organ: np.ndarray,
    body: np.ndarray,
    spacing: Spacing3,
    size: float,
    rng: np.random.Generator,
    *,
    labelled: int = 0,
) -> list[np.ndarray]:
    """Two or three ellipsoids centred just outside the organ surface, cut by the organ so they touch it.

    ``labelled``: the first that many neighbours are to become classes of their own, so each is placed
    (up to ``MAX_PLACEMENT_TRIES`` tries) in-plane next to the organ's middle slice, somewhat larger
    than a look-alike (``LABELLED_SCALE``), and kept if it covers that slice and ``CROSSED_SHARE`` of
    the organ's slices on each side (at least one) with at least ``MIN_NEIGHBOUR_SHARE`` of the
    organ's volume: propagation can only follow a class that the drawn slice holds, and a drawn slice
    need not be the organ's middle one (in crowded volumes the second half of the tries relaxes both).
    Unlabelled look-alikes follow, up to the usual two or three neighbours in all.
    With the default 0 the random draws are those of the one-class volumes, so those stay unchanged.

    Returns a list of boolean ``(z, y, x)`` masks, disjoint from the organ and each other, inside the body
    (fewer than ``labelled`` only when the volume is too small to hold them).
    """
    surface = np.argwhere(ndimage.binary_erosion(organ) ^ organ)  # organ surface voxels (z, y, x)
    # Prefer the organ's middle slices so that neighbours show up where annotators look.
    z_low, z_high = np.percentile(surface[:, 0], [25, 75])
    band = surface[(surface[:, 0] >= z_low) & (surface[:, 0] <= z_high)]
    organ_centre = np.argwhere(organ).mean(axis=0) * np.asarray(spacing)
    neighbours: list[np.ndarray] = []
    taken = organ | ~body
    count = int(rng.integers(2, 4))
    if labelled:
        occupied = np.flatnonzero(organ.any(axis=(1, 2)))
        middle = int((occupied[0] + occupied[-1]) // 2)  # the "middle" slice of an organ-only drawing
        crossed = max(1, round(CROSSED_SHARE * len(occupied)))
        central = surface[np.abs(surface[:, 0] - middle) <= 1]
        min_voxels = MIN_NEIGHBOUR_SHARE * np.count_nonzero(organ)
        for attempt in range(MAX_PLACEMENT_TRIES):
            if len(neighbours) == labelled:
                break
            neighbour = _neighbour_at(
                grid, central, organ_centre, spacing, size, taken, rng, scale=LABELLED_SCALE, in_plane=True
            )
            # Crowded (small) volumes: the second half of the tries asks only for the middle slice and
            # a volume share that shrinks towards zero.
            strict = attempt < MAX_PLACEMENT_TRIES // 2
            reach = crossed if strict else 0
            around = neighbour[max(middle - reach, 0) : middle + reach + 1]
            least = min_voxels if strict else min_voxels * 2 * (1 - attempt / MAX_PLACEMENT_TRIES)
            if around.any(axis=(1, 2)).all() and np.count_nonzero(neighbour) >= max(least, 1):
                neighbours.append(neighbour)
                taken |= neighbour
        if len(neighbours) < labelled:
            return neighbours  # too few fit: the caller says so
    for _ in range(max(count - labelled, 0)):
        neighbour = _neighbour_at(grid, band, organ_centre, spacing, size, taken, rng)
        if neighbour.any():
            neighbours.append(neighbour)
            taken |= neighbour
    return neighbours


def _neighbour_at(
    grid: tuple[np.ndarray, np.ndarray, np.ndarray],
    surface: np.ndarray,
    organ_centre: np.ndarray,
    spacing: Spacing3,
    size: float,
    taken: np.ndarray,
    rng: np.random.Generator,
    *,
    scale: tuple[float, float] = (0.5, 0.8),
    in_plane: bool = False,
) -> np.ndarray:
    """One ellipsoid just outside a random point of ``surface`` (voxel indices), minus ``taken``.

    Semi-axes are ``size`` times a uniform draw from ``scale``; ``in_plane`` pushes the centre
    outwards within the point's slice only, so the neighbour stays centred on that slice.
    """
    surface_point = surface[rng.integers(len(surface))] * np.asarray(spacing)
    outward = surface_point - organ_centre
    if in_plane:
        outward[0] = 0.0
    outward /= np.linalg.norm(outward) + 1e-6
    axes = size * rng.uniform(*scale, 3)
    centre = surface_point + outward * axes.min() * 0.6
    return (ellipsoid_level(grid, centre, axes, random_rotation(rng)) < 1.0) & ~taken


def make_organ_volume(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
    *,
    organ_classes: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic abdominal MR-like volume with a dense organ label (optionally several organs).

    Parameters
    ----------
    shape : (z, y, x)
    spacing : (z, y, x) in mm
        Thick slices (e.g. 3 x 1 x 1 mm) are typical; the organ keeps its physical size.
    rng
        The only source of randomness.
    organ_classes
        1 (default): only the organ is labelled, its neighbours are unlabelled look-alikes (the
        volumes are identical to those made before this option existed). ``N`` in 2..4: the first
        ``N - 1`` neighbours are labelled too, ``2..N``; they are placed on the organ's central
        slices, and any further neighbour stays an unlabelled look-alike.

    Returns
    -------
    image : np.ndarray of float32, shape (z, y, x)
        MR-like intensities (organ and neighbours about 400, tissue 250, fat 600), 0 outside.
    label : np.ndarray of uint8, shape (z, y, x)
        1 = organ, ``2..organ_classes`` = labelled neighbours, 0 = everything else.

    Raises
    ------
    InputError
        ``organ_classes`` out of range, or fewer neighbours fit than are to be labelled (tiny shapes).
    """
    if not 1 <= organ_classes <= MAX_ORGAN_CLASSES:
        raise InputError(f"organ classes {organ_classes} must be 1..{MAX_ORGAN_CLASSES}")
    shape: Shape3 = tuple(int(s) for s in shape)
    spacing: Spacing3 = tuple(float(s) for s in spacing)
    extent = np.asarray(shape) * np.asarray(spacing)
    body, radial = elliptical_body(shape, spacing, rng)
    z, y, x = voxel_centres_mm(shape, spacing)
    # Smooth deformation: displace the coordinates by a smooth random field (a few mm).
    amplitude = 0.05 * extent[1:].min()
    grid = tuple(
        np.broadcast_to(axis_coordinates, shape) + amplitude * smooth_field(shape, spacing, 12.0, rng)
        for axis_coordinates in (z, y, x)
    )
    size = 0.27 * min(extent[1], extent[2], 1.6 * extent[0])
    centre = extent / 2 + rng.uniform(-0.08, 0.08, 3) * extent
    organ = _organ_shape(grid, centre, size, rng) & body
    neighbours = _touching_neighbours(grid, organ, body, spacing, size, rng, labelled=organ_classes - 1)
    if len(neighbours) < organ_classes - 1:
        raise InputError(
            f"only {len(neighbours)} neighbour organs fit at shape {list(shape)}, {organ_classes - 1} are "
            "to be labelled; use a larger --shape or fewer --organ-classes"
        )

    tissue = TISSUE_INTENSITY * (1.0 + 0.08 * smooth_field(shape, spacing, 6.0, rng))
    image = np.where(np.broadcast_to(radial > rng.uniform(0.85, 0.9), shape), FAT_INTENSITY, tissue)
    # Fat pockets between the viscera.
    fat = smooth_field(shape, spacing, 4.0, rng) > 2.3
    image = np.where(fat, FAT_INTENSITY, image).astype(np.float32)
    organ_texture = 1.0 + 0.06 * smooth_field(shape, spacing, 2.0, rng)
    image[organ] = (ORGAN_INTENSITY * organ_texture)[organ]
    for index, neighbour in enumerate(neighbours):
        # Similar brightness: within about 8% of the organ, with its own texture scale; a labelled
        # neighbour is an organ of another kind, with its own contrast (as spleen or kidney to liver).
        brightness = ORGAN_INTENSITY * rng.uniform(0.92, 1.08)
        if index < organ_classes - 1:
            brightness *= LABELLED_CONTRAST[index]
        texture = 1.0 + 0.06 * smooth_field(shape, spacing, rng.uniform(1.5, 4.0), rng)
        image[neighbour] = (brightness * texture)[neighbour]
    # Partial volume: soften every edge by about one voxel (slice profile along z, blur in-plane).
    image = ndimage.gaussian_filter(image, sigma=0.6)
    image *= bias_field(shape, rng, strength=rng.uniform(0.1, 0.25))
    image = rician_noise(image, sigma=rng.uniform(10.0, 18.0), rng=rng)
    image[~body] = 0.0
    label = organ.astype(np.uint8)
    for value, neighbour in enumerate(neighbours[: organ_classes - 1], start=2):
        label[neighbour] = value
    return image.astype(np.float32), label
