"""Speed of the pseudo-label rule on a CT-sized volume (target: 512x512x300 in under 10 s on 2 cores).

Builds a noisy volume of the requested shape with bright tubes, simulates a one-axis MIP annotation
(and optionally more axes), then times :func:`mipseg.pseudolabel.mip_backprojection.pseudo_label_volume`
(seeds, S_1, S_0 and the label map; file I/O excluded), best of ``--repeats`` runs.

Usage::

    .venv/bin/python benchmarks/pseudolabel_speed.py [--shape 300 512 512] [--axes 0] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), help="(z, y, x)")
    parser.add_argument("--axes", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(args.threads)  # before numpy is imported

    import numpy as np

    from mipseg.planning.mip import maximum_intensity_projection
    from mipseg.pseudolabel.mip_backprojection import pseudo_label_volume

    volume, truth = tube_volume(tuple(args.shape), np.random.default_rng(args.seed))
    annotations, depths = {}, {}
    for axis in args.axes:
        _, depth = maximum_intensity_projection(volume, axis)
        annotations[axis] = np.take_along_axis(
            truth, np.expand_dims(depth, axis).astype(np.intp), axis
        ).squeeze(axis)
        depths[axis] = depth
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        labels, _, counts = pseudo_label_volume(volume, annotations, depths, ignore_value=2)
        times.append(time.perf_counter() - start)
    print(
        f"shape {tuple(args.shape)} axes {args.axes} threads {args.threads}: "
        f"best {min(times):.2f} s, runs {', '.join(f'{t:.2f}' for t in times)} s "
        f"(load average {os.getloadavg()[0]:.1f}); counts {counts}"
    )


def tube_volume(shape: tuple[int, int, int], rng):
    """Noisy float32 volume with 24 random straight bright tubes (radius 1-4 voxels) and their truth.

    Tubes are drawn inside their bounding boxes only, so building a CT-sized volume stays fast.
    """
    import numpy as np

    volume = rng.normal(100.0, 20.0, size=shape).astype(np.float32)
    truth = np.zeros(shape, dtype=bool)
    extent = np.array(shape, dtype=float)
    for _ in range(24):
        a, b = rng.uniform(0.05, 0.95, 3) * extent, rng.uniform(0.05, 0.95, 3) * extent
        radius = rng.uniform(1.0, 4.0)
        low = np.maximum(np.floor(np.minimum(a, b) - radius - 1), 0).astype(int)
        high = np.minimum(np.ceil(np.maximum(a, b) + radius + 2), extent).astype(int)
        box = tuple(slice(lo, hi) for lo, hi in zip(low, high))
        grid = np.stack(np.mgrid[box], axis=-1).astype(np.float32)
        direction = b - a
        t = np.clip(((grid - a) @ direction) / float(direction @ direction), 0.0, 1.0)
        inside = np.linalg.norm(grid - (a + t[..., None] * direction), axis=-1) <= radius
        truth[box] |= inside
    volume[truth] += 300.0
    return volume, truth


if __name__ == "__main__":
    main()
