"""The one annotation reader: editor files (255, palette, 16-bit, RGB) mean the same in every stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mipseg import io, paths
from mipseg.annotation_png import read_annotation, read_annotation_values, values_to_classes
from mipseg.cli.validate import app as validate_app
from mipseg.dataset import load_dataset, parse_dataset_json
from mipseg.errors import InputError


def spec_with(labels: dict[str, int], annotation: str = "slice"):
    spec, problems = parse_dataset_json(
        {
            "channel_names": {"0": "CT"},
            "labels": labels,
            "numTraining": 1,
            "file_ending": ".nii.gz",
            "annotation": annotation,
        }
    )
    assert not problems
    return spec


ONE_CLASS = spec_with({"background": 0, "organ": 1})
TWO_CLASSES = spec_with({"background": 0, "liver": 1, "kidney": 2})


def drawing() -> np.ndarray:
    values = np.zeros((6, 7), np.uint8)
    values[1:3, 2:5] = 1
    values[4, 1:3] = 2
    return values


def test_single_class_any_nonzero_is_the_class(tmp_path: Path) -> None:
    for value in (1, 7, 255):
        Image.fromarray((drawing() > 0).astype(np.uint8) * value).save(tmp_path / "a.png")
        classes = read_annotation(tmp_path / "a.png", ONE_CLASS)
        assert classes.dtype == np.uint8
        np.testing.assert_array_equal(classes, drawing() > 0)


def test_several_classes_take_the_pixel_value_or_palette_index(tmp_path: Path) -> None:
    Image.fromarray(drawing()).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(read_annotation(tmp_path / "grey.png", TWO_CLASSES), drawing())
    palette = Image.fromarray(drawing(), mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))  # index 1 red, 2 green
    palette.save(tmp_path / "palette.png")
    assert Image.open(tmp_path / "palette.png").mode == "P"
    np.testing.assert_array_equal(read_annotation(tmp_path / "palette.png", TWO_CLASSES), drawing())
    sixteen = Image.fromarray(drawing().astype(np.uint16))
    sixteen.save(tmp_path / "sixteen.png")
    np.testing.assert_array_equal(read_annotation(tmp_path / "sixteen.png", TWO_CLASSES), drawing())
    Image.fromarray((drawing() > 0).astype(np.uint8) * 255).save(tmp_path / "white.png")
    with pytest.raises(InputError, match=r"pixel values \[255\] are not labels"):
        read_annotation(tmp_path / "white.png", TWO_CLASSES)
    with pytest.raises(InputError, match=r"\[3\] are not labels"):
        values_to_classes(np.full((2, 2), 3, np.uint8), [0, 1, 2], "request")


def test_colour_and_transparency_are_refused_with_how_to_save(tmp_path: Path) -> None:
    rgb = np.zeros((6, 7, 3), np.uint8)
    rgb[drawing() > 0] = (255, 0, 0)
    Image.fromarray(rgb).save(tmp_path / "red.png")
    with pytest.raises(InputError, match="colour.*greyscale PNG") as error:
        read_annotation_values(tmp_path / "red.png")
    assert len(error.value.problems) == 1 and "red.png" in error.value.problems[0]
    grey_rgb = np.repeat(drawing()[..., None], 3, axis=-1)
    Image.fromarray(grey_rgb).save(tmp_path / "grey_rgb.png")
    np.testing.assert_array_equal(read_annotation(tmp_path / "grey_rgb.png", TWO_CLASSES), drawing())
    rgba = np.concatenate([grey_rgb, np.full((6, 7, 1), 255, np.uint8)], axis=-1)
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    np.testing.assert_array_equal(read_annotation_values(tmp_path / "opaque.png"), drawing())
    rgba[0, 0, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "layer.png")
    with pytest.raises(InputError, match="transparent pixels"):
        read_annotation_values(tmp_path / "layer.png")


def test_unreadable_files_name_themselves(tmp_path: Path) -> None:
    Image.fromarray(drawing()).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    for name, message in (("cut.png", "unreadable or truncated"), ("gone.png", "file not found")):
        with pytest.raises(InputError, match=message):
            read_annotation_values(tmp_path / name)
    Image.fromarray(drawing()).save(tmp_path / "jpeg.png", format="JPEG")
    with pytest.raises(InputError, match="not a PNG"):
        read_annotation_values(tmp_path / "jpeg.png")


@pytest.fixture
def organs(data_roots: dict[str, Path]) -> Path:
    from mipseg.synthetic import synthesize_dataset

    return synthesize_dataset(
        992, "organs", num_cases=2, num_test_cases=0, shape=(12, 24, 24), show_progress=False
    )


def _rewrite_annotations(folder: Path, transform) -> None:
    for png in sorted((folder / "annotationsTr").glob("*.png")):
        Image.fromarray(transform(read_annotation_values(png))).save(png)


def test_white_slice_annotations_validate_and_propagate_like_ones(organs: Path) -> None:
    from mipseg.propagation.propagate_api import PropagationSettings, propagate_dataset

    settings = PropagationSettings(method="copy")
    propagate_dataset(992, name="ones", settings=settings, show_progress=False)
    _rewrite_annotations(organs, lambda values: (values > 0).astype(np.uint8) * 255)
    result = CliRunner().invoke(validate_app, ["-d", "992", "--require-annotations"])
    assert result.exit_code == 0, result.output
    propagate_dataset(992, name="whites", settings=settings, show_progress=False)
    for case in load_dataset(992).case_ids:
        ones, _ = io.read_image(paths.labelset_dir(992, "ones") / f"{case}.nii.gz")
        whites, _ = io.read_image(paths.labelset_dir(992, "whites") / f"{case}.nii.gz")
        assert (ones == 1).any()
        np.testing.assert_array_equal(ones, whites)


def test_multi_class_and_colour_files_fail_validation_with_one_line_each(organs: Path) -> None:
    spec = io.read_json(organs / "dataset.json")
    spec["labels"] = {"background": 0, "organ": 1, "tumour": 2}
    io.write_json(spec, organs / "dataset.json")
    first, second = sorted((organs / "annotationsTr").glob("*.png"))
    Image.fromarray((read_annotation_values(first) > 0).astype(np.uint8) * 255).save(first)
    colour = np.zeros((*read_annotation_values(second).shape, 3), np.uint8)
    colour[read_annotation_values(second) > 0] = (255, 0, 0)
    Image.fromarray(colour).save(second)
    result = CliRunner().invoke(validate_app, ["-d", "992"])
    assert result.exit_code == 2
    assert f"{first.name}: pixel values [255] are not labels" in result.output.replace("\n", "")
    assert "colour (RGB) PNG" in result.output
    # values 1 and 2 are both classes now
    Image.fromarray(read_annotation_values(first) // 255 * 2).save(first)
    Image.fromarray((colour[..., 0] > 0).astype(np.uint8)).save(second)
    assert CliRunner().invoke(validate_app, ["-d", "992"]).exit_code == 0
    dataset = load_dataset(992)
    assert set(np.unique(read_annotation(first, dataset.spec)).tolist()) == {0, 2}
