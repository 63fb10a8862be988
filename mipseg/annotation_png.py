"""The one reader of 2D annotation PNGs, for every mode and every stage.

``mipseg_validate``, ``mipseg_pseudolabel``, ``mipseg_propagate``, the MIP trainer, the planner's
fingerprint and ``mipseg_annotate`` all read ``annotationsTr/*.png`` through this module, so a file
that one of them accepts means the same thing to all of them:

* a dataset with **one foreground class**: any nonzero pixel is that class (1, 255 -- the
  white-on-black that every editor saves --, any grey), in mip and slice mode alike;
* a dataset with **several foreground classes**: the pixel value is the class (0 = background);
  a value that is not a label of dataset.json is an error;
* an **indexed (palette) PNG**: the palette index is the pixel value (napari, some editors);
* 8- and 16-bit grey PNGs are read as they are; an RGB PNG whose pixels are all grey (R = G = B)
  is grey; an alpha channel is allowed only if every pixel is opaque;
* a **colour** drawing (R, G, B differ somewhere) or one with transparent pixels is rejected with
  one line that says how to save it instead: a colour has no class number, and a transparent
  layer's hidden pixels carry whatever colour the editor left there.

This module sits beside :mod:`mipseg.io` (below every stage): :mod:`mipseg.dataset` uses its checks
(:func:`check_annotation_png`, :func:`check_some_slice_drawn`) to validate, the stages read with it,
:mod:`mipseg.annotate` shows, checks and writes with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from mipseg.errors import InputError

if TYPE_CHECKING:
    from mipseg.dataset import DatasetSpec

HOW_TO_SAVE = (
    "save the drawing as a greyscale PNG on black (pixel value = class, any nonzero value for a "
    "single class), e.g. GIMP: Image > Flatten Image, Image > Mode > Grayscale, File > Export As; "
    "or draw it with mipseg_annotate"
)


def read_annotation_values(path: str | Path) -> np.ndarray:
    """Pixel values of an annotation PNG as drawn: grey value or palette index.

    Parameters
    ----------
    path
        A PNG file.

    Returns
    -------
    np.ndarray of uint8 or uint16, shape (rows, columns)

    Raises
    ------
    InputError
        Missing, unreadable or truncated file; not a PNG; colour or transparent pixels (the
        message says how to save the drawing instead).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise InputError(f"{path}: not a PNG file (found {image.format}); {HOW_TO_SAVE}")
            image.load()
            return _values_of(image, path)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise InputError(f"{path}: unreadable or truncated PNG ({error})") from None


def _values_of(image: Image.Image, path: Path) -> np.ndarray:
    mode = image.mode
    if mode == "P":
        # the index is the class; a palette with transparency is still just indices
        return np.asarray(image, dtype=np.uint8)
    if mode == "1":
        return np.asarray(image, dtype=np.uint8)
    if mode in ("L", "I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image)
        if array.dtype.kind in "iu" and array.min(initial=0) >= 0 and array.max(initial=0) < 2**16:
            return array.astype(np.uint16 if array.max(initial=0) > 255 else np.uint8)
        raise InputError(f"{path}: pixel values outside 0..65535; {HOW_TO_SAVE}")
    if mode in ("LA", "La", "RGB", "RGBA", "RGBa", "RGBX"):
        array = np.asarray(image.convert("RGBA" if "A" in mode or "a" in mode else "RGB"))
        if array.shape[-1] == 4 and np.any(array[..., 3] != 255):
            raise InputError(f"{path}: PNG with transparent pixels; {HOW_TO_SAVE}")
        colour = array[..., :3]
        if np.any(colour != colour[..., :1]):
            raise InputError(f"{path}: colour (RGB) PNG, a colour has no class number; {HOW_TO_SAVE}")
        return np.ascontiguousarray(colour[..., 0])
    raise InputError(f"{path}: PNG mode {mode!r} is not a drawing mipseg reads; {HOW_TO_SAVE}")


def values_to_classes(values: np.ndarray, class_values: Sequence[int], source: str | Path) -> np.ndarray:
    """Apply the class rules to drawn pixel values.

    Parameters
    ----------
    values : np.ndarray, shape (rows, columns)
        As :func:`read_annotation_values` returns them.
    class_values
        dataset.json's label values without ``ignore`` (background 0 included).
    source
        File (or request) named in the error message.

    Returns
    -------
    np.ndarray of uint8 (uint16 with more than 255 classes), shape (rows, columns)
        Class of every pixel: with one foreground class, 1 wherever ``values`` is nonzero.

    Raises
    ------
    InputError
        With several foreground classes: a value that is not a label.
    """
    foreground = sorted(v for v in class_values if v != 0)
    dtype = np.uint8 if max(class_values, default=0) < 256 else np.uint16
    if len(foreground) <= 1:
        return (values != 0).astype(dtype) * dtype(foreground[0] if foreground else 1)
    unknown = sorted(set(np.unique(values).tolist()) - set(int(v) for v in class_values))
    if unknown:
        listed = ", ".join(str(v) for v in unknown[:10])
        raise InputError(
            f"{source}: pixel values [{listed}] are not labels in dataset.json "
            f"{sorted(int(v) for v in class_values)}; with several classes the pixel value is the class"
        )
    return values.astype(dtype, copy=False)


def read_annotation(path: str | Path, spec: DatasetSpec) -> np.ndarray:
    """Classes of an annotation PNG under the rules of ``spec`` (see the module docstring).

    Returns
    -------
    np.ndarray of uint8 (uint16 with more than 255 classes), shape (rows, columns)
    """
    return values_to_classes(read_annotation_values(path), list(spec.class_labels.values()), path)


def check_annotation_png(path: Path, spec: DatasetSpec, image_shape: tuple[int, ...], key: int) -> list[str]:
    """Problems of one annotation PNG: unreadable, colour, wrong grid, empty MIP, unknown label values.

    ``key`` is the MIP axis (mip mode) or slice index along axis 0 (slice mode). Values follow
    :mod:`mipseg.annotation_png` (one foreground class: any nonzero pixel is it).
    """
    try:
        array = read_annotation_values(path)
    except InputError as error:
        return error.problems
    if spec.annotation == "slice":
        if not 0 <= key < image_shape[0]:
            return [f"{path}: slice {key} is outside the image's {image_shape[0]} slices along axis 0"]
        expected = tuple(image_shape[1:])
        grid = f"slice grid {expected} (y, x)"
    else:
        expected = tuple(s for axis, s in enumerate(image_shape) if axis != key)
        grid = f"MIP grid {expected} of the image along axis {key}"
    if array.shape != expected:
        return [f"{path}: size {array.shape} (rows, columns) does not match the {grid}"]
    # An empty slice is a drawing in slice mode ("no organ here", e.g. a suggested slice past the
    # organ's end); an empty MIP would mean no vessel at all, which is a mistake.
    if not np.any(array) and spec.annotation != "slice":
        return [f"{path}: empty annotation (no nonzero pixel)"]
    try:
        values_to_classes(array, list(spec.class_labels.values()), path)
    except InputError as error:
        return error.problems
    return []


def check_some_slice_drawn(case_id: str, annotations: dict[int, Path]) -> list[str]:
    """Slice mode: a case whose every drawn slice is empty says nothing about where its organs are.

    ``annotations`` maps slice index -> PNG (each already passed :func:`check_annotation_png`).
    """
    if any(np.any(read_annotation_values(png)) for png in annotations.values()):
        return []
    files = ", ".join(png.name for _, png in sorted(annotations.items()))
    return [f"{files}: every drawn slice of case {case_id} is empty; draw the organs on at least one"]
