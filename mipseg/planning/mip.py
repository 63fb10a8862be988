"""Maximum intensity projections and their depth (argmax) maps, in the raw voxel grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def maximum_intensity_projection(volume: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """MIP of a volume along one numpy axis, and the index of the brightest voxel on each ray.

    Parameters
    ----------
    volume : np.ndarray, shape (z, y, x)
    axis : int
        Numpy axis to project along (0 = z).

    Returns
    -------
    mip : np.ndarray
        ``volume.max(axis)``; shape is ``volume.shape`` without ``axis`` (rows = first remaining axis).
    depth : np.ndarray of int16/int32
        ``volume.argmax(axis)``: for each MIP pixel, the index along ``axis`` of its brightest
        voxel (the first one on ties, as numpy does).
    """
    if volume.ndim != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {volume.shape}")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    depth = np.argmax(volume, axis=axis)
    depth = depth.astype(np.int16 if volume.shape[axis] < 2**15 else np.int32)
    mip = np.take_along_axis(volume, np.expand_dims(depth, axis).astype(np.intp), axis=axis).squeeze(axis)
    return mip, depth


def ray_coordinates(depth: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full ``(z, y, x)`` index arrays of the voxels a depth map points at.

    ``volume[ray_coordinates(depth, axis)] == mip`` where
    ``mip, depth = maximum_intensity_projection(volume, axis)``.
    """
    rows, cols = np.indices(depth.shape)
    if axis == 0:
        return depth.astype(np.intp), rows, cols
    if axis == 1:
        return rows, depth.astype(np.intp), cols
    return rows, cols, depth.astype(np.intp)


def window_to_uint8(
    image: np.ndarray, low_percentile: float = 0.5, high_percentile: float = 99.5
) -> np.ndarray:
    """Map an image to 0..255 between two of its own percentiles (so bright vessels stay visible)."""
    image = np.asarray(image, dtype=np.float64)
    low, high = np.percentile(image, [low_percentile, high_percentile])
    if high <= low:
        high = low + 1.0
    return np.round(np.clip((image - low) / (high - low), 0.0, 1.0) * 255).astype(np.uint8)


def side_by_side(images: list[np.ndarray], gap: int = 4) -> np.ndarray:
    """2D uint8 images placed left to right, top-aligned, separated by ``gap`` black columns."""
    rows = max(image.shape[0] for image in images)
    padded = []
    for index, image in enumerate(images):
        canvas = np.zeros((rows, image.shape[1] + (gap if index < len(images) - 1 else 0)), np.uint8)
        canvas[: image.shape[0], : image.shape[1]] = image
        padded.append(canvas)
    return np.concatenate(padded, axis=1)


def to_physical_aspect(image: np.ndarray, spacing_rows_cols, finest: float) -> np.ndarray:
    """Stretch a 2D uint8 image so that a pixel is ``finest`` mm along both axes (display only)."""
    from skimage.transform import resize

    shape = [max(1, round(n * s / finest)) for n, s in zip(image.shape, spacing_rows_cols)]
    if list(image.shape) == shape:
        return image
    stretched = resize(image, shape, order=1, preserve_range=True, anti_aliasing=False)
    return np.round(stretched).astype(np.uint8)


def case_mip_paths(out_dir: str | Path, case_id: str, axes: list[int]) -> dict[str, Path]:
    """The files :func:`write_case_mips` writes for one case, by name.

    Per axis ``a``: ``mip{a}`` (``{case}_mip{a}.png``) and ``mip{a}_depth`` (``{case}_mip{a}_depth.npy``);
    ``mips``: ``{case}_mips.png``, the side-by-side review PNG. The one place these names are made,
    so that a resumed run can remove exactly the temporaries a killed one left.
    """
    out_dir = Path(out_dir)
    files = {}
    for axis in axes:
        files[f"mip{axis}"] = out_dir / f"{case_id}_mip{axis}.png"
        files[f"mip{axis}_depth"] = out_dir / f"{case_id}_mip{axis}_depth.npy"
    files["mips"] = out_dir / f"{case_id}_mips.png"
    return files


def write_case_mips(volume: np.ndarray, axes: list[int], out_dir, case_id: str, spacing_zyx=None) -> list:
    """Write what the annotator draws on, for one case, in the raw voxel grid.

    Files: ``{case}_mip{a}.png`` (8-bit, windowed at the MIP's 0.5/99.5 percentiles),
    ``{case}_mip{a}_depth.npy`` (argmax index along ``a``) per axis, and ``{case}_mips.png``
    with all MIPs side by side (written last: its presence marks the case as done).

    Parameters
    ----------
    volume : np.ndarray, shape (Z, Y, X)
        The channel to project (channel 0).
    spacing_zyx : optional
        Voxel spacing; the side-by-side review PNG (only) is stretched to square millimetres.
    """
    from mipseg import io

    files = case_mip_paths(out_dir, case_id, axes)
    written, pngs = [], []
    for axis in axes:
        mip, depth = maximum_intensity_projection(volume, axis)
        png = window_to_uint8(mip)
        if spacing_zyx is None:
            pngs.append(png)
        else:
            remaining = [float(s) for i, s in enumerate(spacing_zyx) if i != axis]
            pngs.append(to_physical_aspect(png, remaining, min(spacing_zyx)))
        written.append(io.write_png(png, files[f"mip{axis}"]))
        written.append(io.save_npy(depth, files[f"mip{axis}_depth"]))
    written.append(io.write_png(side_by_side(pngs), files["mips"]))
    return written
