"""Image, annotation and JSON I/O through SimpleITK, with exact geometry and atomic writes.

Arrays are numpy ``(z, y, x)`` as SimpleITK gives them. Geometry (spacing, origin, direction)
is kept in SimpleITK's ``(x, y, z)`` order so it can be copied back onto an image unchanged.
Every writer writes a temporary file next to the target and renames it, so an interrupted
run never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import struct
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from mipseg.errors import InputError

IMAGE_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".gipl", ".gipl.gz")


@dataclass(frozen=True)
class Geometry:
    """Physical placement of a 3D image, in SimpleITK ``(x, y, z)`` order.

    Attributes
    ----------
    spacing : tuple of 3 floats
        Voxel size along x, y, z (mm).
    origin : tuple of 3 floats
        Physical position of voxel (0, 0, 0).
    direction : tuple of 9 floats
        Row-major 3x3 direction cosine matrix.
    """

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        """Geometry of a SimpleITK image."""
        return cls(tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()))

    @classmethod
    def identity(cls, spacing_zyx: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Geometry:
        """Axis-aligned geometry at the origin with the given numpy-order spacing."""
        return cls(tuple(float(s) for s in spacing_zyx[::-1]), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Spacing in numpy ``(z, y, x)`` order."""
        return tuple(self.spacing[::-1])

    def apply(self, image: sitk.Image) -> sitk.Image:
        """Set this geometry on ``image`` (in place) and return it."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def matches(self, other: Geometry, tolerance: float = 1e-4) -> bool:
        """True if spacing, origin and direction agree within a relative ``tolerance``."""
        for mine, theirs in (
            (self.spacing, other.spacing),
            (self.origin, other.origin),
            (self.direction, other.direction),
        ):
            a, b = np.asarray(mine, float), np.asarray(theirs, float)
            if not np.allclose(a, b, rtol=tolerance, atol=tolerance * max(1.0, float(np.abs(a).max()))):
                return False
        return True

    def to_dict(self) -> dict[str, list[float]]:
        return {"spacing": list(self.spacing), "origin": list(self.origin), "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Geometry:
        return cls(tuple(data["spacing"]), tuple(data["origin"]), tuple(data["direction"]))


def compound_suffix(path: str | Path) -> str:
    """File ending including ``.gz``-style double suffixes, e.g. ``.nii.gz``."""
    name = Path(path).name.lower()
    for ending in IMAGE_ENDINGS + (".npy", ".npz", ".png", ".json", ".pt", ".txt"):
        if name.endswith(ending):
            return Path(path).name[-len(ending) :]
    return Path(path).suffix


def file_stem(path: str | Path) -> str:
    """The file name without its :func:`compound_suffix`: ``case_1.nii.gz`` -> ``case_1``."""
    name, ending = Path(path).name, compound_suffix(path)
    return name[: len(name) - len(ending)] if ending else name


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds.

    The temporary name keeps the file ending so that writers choosing a format by extension
    (SimpleITK, numpy) still work. On any exception, including KeyboardInterrupt, the
    temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{file_stem(path)}.partial-{uuid.uuid4().hex[:8]}{compound_suffix(path)}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_partials(folder: str | Path, stems: Iterable[str]) -> int:
    """Delete the temporary files a killed writer left in ``folder`` for files named ``stems``.

    :func:`atomic_path` cleans up after exceptions and Ctrl-C, but not after SIGKILL or a power
    cut: then ``.{stem}.partial-{id}{ending}`` stays. Callers pass the stems (file names without
    their ending) of the files *they* are about to write, so a concurrent run writing other files
    in the same folder (e.g. another ``--part`` of a prediction) keeps its temporaries.

    Returns
    -------
    int
        How many files were deleted.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    prefixes = tuple(f".{stem}.partial-" for stem in stems)
    if not prefixes:
        return 0
    removed = 0
    for path in folder.iterdir():
        if path.is_file() and path.name.startswith(prefixes):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def read_image(path: str | Path, dtype: np.dtype | type | None = None) -> tuple[np.ndarray, Geometry]:
    """Read a 3D image.

    Parameters
    ----------
    path
        Any format SimpleITK reads (NIfTI, MHA, NRRD, ...).
    dtype
        Cast the array to this type; ``None`` keeps the file's type.

    Returns
    -------
    array : np.ndarray, shape (z, y, x)
    geometry : Geometry

    Raises
    ------
    InputError
        The file is missing, unreadable, truncated, not 3D or has several components.
    """
    image = _read_sitk(path)
    if image.GetDimension() != 3:
        raise InputError(f"{path}: expected a 3D image, found {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{path}: expected one component per voxel, found {image.GetNumberOfComponentsPerPixel()}"
        )
    array = sitk.GetArrayFromImage(image)
    return (array if dtype is None else array.astype(dtype, copy=False)), Geometry.of(image)


def read_image_header(path: str | Path) -> tuple[tuple[int, int, int], Geometry]:
    """Shape ``(z, y, x)`` and geometry of an image without reading its voxels."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputError(f"{path}: unreadable image ({_first_line(error)})") from None
    size = reader.GetSize()
    if len(size) != 3:
        raise InputError(f"{path}: expected a 3D image, found {len(size)}D")
    geometry = Geometry(tuple(reader.GetSpacing()), tuple(reader.GetOrigin()), tuple(reader.GetDirection()))
    return tuple(size[::-1]), geometry


def write_image(array: np.ndarray, geometry: Geometry, path: str | Path, *, compress: bool = True) -> Path:
    """Write a ``(z, y, x)`` array with ``geometry`` atomically; returns ``path``."""
    if array.ndim != 3:
        raise ValueError(f"write_image expects a (z, y, x) array, got shape {array.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image = geometry.apply(sitk.GetImageFromArray(np.ascontiguousarray(array)))
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=compress)
    return Path(path)


def read_png(path: str | Path) -> np.ndarray:
    """Read a 2D PNG as an integer array of shape (rows, columns).

    RGB(A) PNGs, as image editors often save, are reduced to their first channel where the
    channels agree, and to "any channel nonzero" otherwise, so that a coloured drawing still
    reads as a mask.
    """
    image = _read_sitk(path)
    array = sitk.GetArrayFromImage(image)
    if image.GetNumberOfComponentsPerPixel() > 1:
        colour = array[..., :3]
        array = (
            colour[..., 0]
            if np.all(colour == colour[..., :1])
            else (colour.max(axis=-1) > 0).astype(np.uint8)
        )
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise InputError(f"{path}: expected a 2D PNG, found shape {array.shape}")
    return array


def write_png(array: np.ndarray, path: str | Path) -> Path:
    """Write a 2D ``(rows, columns)`` or RGB ``(rows, columns, 3)`` uint8 array as PNG, atomically."""
    if array.dtype != np.uint8:
        raise ValueError(f"write_png expects uint8, got {array.dtype}")
    if array.ndim not in (2, 3):
        raise ValueError(f"write_png expects (rows, columns[, 3]), got shape {array.shape}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=array.ndim == 3)
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp))
    return Path(path)


def read_json(path: str | Path) -> Any:
    """Parse a JSON file, naming the file and the position on a syntax error."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not valid JSON ({error})") from None


def write_json(data: Any, path: str | Path) -> Path:
    """Write JSON (indented, keys in insertion order) atomically."""
    text = json.dumps(data, indent=2, sort_keys=False, default=_json_default)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")
    return Path(path)


def json_round_trip(data: Any) -> Any:
    """``data`` as :func:`write_json` then :func:`read_json` give it back (tuples as lists), NaN as null.

    Lets settings compare equal to what a file holds, and keeps NaN (not valid JSON) out of reports.
    """
    return json.loads(json.dumps(data, default=_json_default), parse_constant=lambda _: None)


def save_npy(array: np.ndarray, path: str | Path) -> Path:
    """``np.save`` atomically."""
    with atomic_path(path) as tmp:
        np.save(tmp, array)
    return Path(path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _read_sitk(path: str | Path) -> sitk.Image:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputError(f"{path}: unreadable or truncated ({_first_line(error)})") from None
    if path.name.lower().endswith(".gz") and not _gzip_is_complete(path, image):
        raise InputError(f"{path}: unreadable or truncated (compressed data ends early)")
    return image


def _gzip_is_complete(path: Path, image: sitk.Image) -> bool:
    """True if a gzip file holds its whole stream.

    ITK fills a truncated gzip stream with zeros instead of failing, so a cut download would
    otherwise read as a valid image. For NIfTI the gzip trailer's size field must equal the
    header offset plus the voxel bytes (cheap); other formats are decompressed once.
    """
    if path.name.lower().endswith(".nii.gz"):
        with gzip.open(path, "rb") as stream:
            header = stream.read(112)
        if len(header) < 112:
            return False
        endian = "<" if struct.unpack("<i", header[:4])[0] == 348 else ">"
        offset = int(struct.unpack(endian + "f", header[108:112])[0])
        voxels = image.GetNumberOfPixels() * image.GetNumberOfComponentsPerPixel()
        expected = offset + voxels * image.GetSizeOfPixelComponent()
        with open(path, "rb") as raw:
            raw.seek(-4, os.SEEK_END)
            stored = struct.unpack("<I", raw.read(4))[0]
        return stored == expected % 2**32
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 24):
                pass
    except (EOFError, OSError):
        return False
    return True


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # SimpleITK puts the useful sentence last, after file/line noise.
    return lines[-1] if lines else type(error).__name__
