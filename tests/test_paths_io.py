"""Roots, dataset name resolution, geometry round-trips and atomic writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mipseg import io, paths
from mipseg.errors import InputError


def test_roots_default_under_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("MIPSEG_RAW", "MIPSEG_PREPROCESSED", "MIPSEG_RESULTS"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(tmp_path)
    assert paths.raw_root() == tmp_path / "mipseg_data" / "raw"
    assert paths.preprocessed_root() == tmp_path / "mipseg_data" / "preprocessed"
    assert paths.results_root() == tmp_path / "mipseg_data" / "results"


def test_roots_follow_environment(data_roots: dict[str, Path]) -> None:
    assert paths.raw_root() == data_roots["raw"]
    assert paths.results_root() == data_roots["results"]


def test_id_and_name_resolve_to_same_folder(data_roots: dict[str, Path]) -> None:
    (data_roots["raw"] / "Dataset900_Vessels").mkdir()
    (data_roots["preprocessed"] / "Dataset900_Vessels").mkdir()
    assert paths.resolve_dataset(900) == "Dataset900_Vessels"
    assert paths.resolve_dataset("900") == "Dataset900_Vessels"
    assert paths.raw_dataset_dir("Dataset900_Vessels") == paths.raw_dataset_dir(900)


def test_unknown_id_is_a_clear_error(data_roots: dict[str, Path]) -> None:
    with pytest.raises(InputError, match="no dataset with id 901"):
        paths.resolve_dataset(901)


def test_several_matches_are_a_clear_error(data_roots: dict[str, Path]) -> None:
    (data_roots["raw"] / "Dataset900_A").mkdir()
    (data_roots["results"] / "Dataset900_B").mkdir()
    with pytest.raises(InputError, match="several datasets have id 900: Dataset900_A, Dataset900_B"):
        paths.resolve_dataset(900)


def test_malformed_identifier(data_roots: dict[str, Path]) -> None:
    with pytest.raises(InputError, match="neither an id"):
        paths.resolve_dataset("vessels")


def test_geometry_round_trip_non_trivial(tmp_path: Path) -> None:
    angle = np.deg2rad(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    flip = np.diag([1, -1, 1])
    direction = tuple((rotation @ flip).ravel())
    geometry = io.Geometry((0.7, 0.45, 2.5), (-120.25, 33.5, 7.125), direction)
    array = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    path = io.write_image(array, geometry, tmp_path / "case.nii.gz")
    read, read_geometry = io.read_image(path)
    np.testing.assert_array_equal(read, array)
    np.testing.assert_allclose(read_geometry.spacing, geometry.spacing, rtol=1e-6)
    np.testing.assert_allclose(read_geometry.origin, geometry.origin, rtol=1e-6)
    np.testing.assert_allclose(read_geometry.direction, geometry.direction, atol=1e-6)
    assert read_geometry.spacing_zyx == pytest.approx((2.5, 0.45, 0.7))
    header_shape, header_geometry = io.read_image_header(path)
    assert header_shape == (5, 6, 7) and header_geometry.matches(geometry)


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.nii.gz"
    io.write_image(np.zeros((2, 2, 2), np.uint8), io.Geometry.identity(), target)
    before = target.read_bytes()
    with pytest.raises(KeyboardInterrupt), io.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]


def test_stale_partials_of_the_named_files_only_are_removed(tmp_path: Path) -> None:
    # what SIGKILL leaves: atomic_path's temporary, named after the file it was writing
    with pytest.raises(KeyboardInterrupt), io.atomic_path(tmp_path / "case_1.nii.gz") as tmp:
        stale_name = tmp.name
        raise KeyboardInterrupt
    stale = tmp_path / stale_name
    others = [tmp_path / ".case_10.partial-0000beef.nii.gz", tmp_path / ".case_1_x.partial-0000beef.json"]
    for path in (stale, *others):
        path.write_bytes(b"half")
    (tmp_path / "case_1.nii.gz").write_bytes(b"done")
    assert io.file_stem(tmp_path / "case_1.nii.gz") == "case_1" and stale_name.startswith(".case_1.partial-")
    assert io.remove_stale_partials(tmp_path, ["case_1"]) == 1
    assert not stale.exists() and all(path.exists() for path in others)  # another writer's files stay
    assert (tmp_path / "case_1.nii.gz").read_bytes() == b"done"
    assert io.remove_stale_partials(tmp_path / "missing", ["case_1"]) == 0


def test_png_round_trip_and_rgb_reduction(tmp_path: Path) -> None:
    mask = np.zeros((4, 5), np.uint8)
    mask[1, 2] = 255
    assert np.array_equal(io.read_png(io.write_png(mask, tmp_path / "m.png")), mask)
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[2, 3] = (255, 0, 0)
    assert np.array_equal(io.read_png(io.write_png(rgb, tmp_path / "c.png")) > 0, rgb[..., 0] > 0)


def test_truncated_and_missing_files(tmp_path: Path) -> None:
    path = io.write_image(np.ones((8, 8, 8), np.float32), io.Geometry.identity(), tmp_path / "a.nii.gz")
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(InputError, match="a.nii.gz: unreadable or truncated"):
        io.read_image(path)
    with pytest.raises(InputError, match="file not found"):
        io.read_image(tmp_path / "missing.nii.gz")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="bad.json: not valid JSON"):
        io.read_json(tmp_path / "bad.json")
