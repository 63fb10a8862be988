"""Patch loading and augmentation: oversampling, ignore value kept, rays intact in MIP mode, seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mipseg.planning.preprocessing import preprocess_seeds
from mipseg.training import data as D

IGNORE = 2


def _write_case(folder: Path, shape=(12, 24, 24)) -> D.TrainingCase:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, *shape)).astype(np.float32)
    label = np.full((1, *shape), IGNORE, dtype=np.int16)
    label[0, :, :4] = 0
    label[0, shape[0] // 2, -4, -4] = 1  # a single labelled foreground voxel
    np.save(folder / "c.npy", image)
    np.save(folder / "c_label.npy", label)
    return D.TrainingCase("c", folder / "c.npy", folder / "c_label.npy")


def test_oversampled_samples_contain_the_labelled_foreground(tmp_path: Path) -> None:
    case = _write_case(tmp_path)
    loader = D.PatchLoader(
        [case],
        patch_size=(8, 8, 8),
        batch_size=3,
        foreground_labels=[1],
        ignore_label=IGNORE,
        oversample_foreground=0.34,
    )
    np.random.seed(0)
    for _ in range(5):
        batch = next(loader)
        assert batch["data"].shape == (3, 1, 8, 8, 8) and batch["seg"].shape == (3, 1, 8, 8, 8)
        assert (batch["seg"][2] == 1).any()  # the last sample of 3 is forced onto foreground
        # padding beyond the image is unknown: ignore value, never background
        assert set(np.unique(batch["seg"])) <= {0, 1, IGNORE}


def test_padding_outside_the_image_is_ignore(tmp_path: Path) -> None:
    case = _write_case(tmp_path, shape=(4, 6, 6))
    loader = D.PatchLoader(
        [case], patch_size=(8, 8, 8), batch_size=1, foreground_labels=[1], ignore_label=IGNORE
    )
    np.random.seed(1)
    batch = next(loader)
    outside = batch["data"][0, 0] == 0
    assert outside.sum() >= 8**3 - 4 * 6 * 6
    assert np.all(batch["seg"][0, 0][outside] == IGNORE)


def test_mip_mode_rotates_only_about_the_projection_axis() -> None:
    assert D.augmentation_settings((16, 32, 32), [0]).rotation_axes == (0,)
    assert D.augmentation_settings((16, 32, 32), [0, 1]).rotation_axes == ()
    assert D.augmentation_settings((32, 32, 32), []).rotation_axes == (0, 1, 2)
    # a label constant along z (each ray one value) stays constant along z after augmentation
    settings = D.augmentation_settings((8, 16, 16), [0])
    crop = D.initial_patch_size((8, 16, 16), settings)
    assert crop[0] >= 8 and crop[1] > 16 and crop[2] > 16
    rng = np.random.default_rng(0)
    column = rng.integers(0, 3, size=(1, 1, 1, *crop[1:])).astype(np.int16)
    seg = np.repeat(column, crop[0], axis=2)
    data = np.repeat(rng.normal(size=(1, 1, 1, *crop[1:])).astype(np.float32), crop[0], axis=2)
    transform = D.training_transforms((8, 16, 16), settings, IGNORE)
    np.random.seed(3)
    for _ in range(10):
        out = transform(data=data.copy(), seg=seg.copy())
        assert out["seg"].shape == (1, 1, 8, 16, 16) and out["seg"].dtype == np.int16
        assert np.all(out["seg"] == out["seg"][:, :, :1])


def test_initial_patch_size_grows_with_rotation() -> None:
    no_rotation = D.initial_patch_size((16, 32, 32), D.AugmentationSettings((), 0.0))
    rotated = D.initial_patch_size((16, 32, 32), D.AugmentationSettings((0,), np.pi))
    assert no_rotation[0] >= 16 and rotated[1] > no_rotation[1]


def test_seeds_survive_preprocessing_to_a_coarser_grid() -> None:
    seeds = np.zeros((10, 20, 20), dtype=np.uint8)
    seeds[3, 4, 5] = 1
    seeds[9, 19, 19] = 1
    seeds[0, 0, 0] = 1  # outside the crop box
    properties = {"bbox": [[1, 10], [0, 20], [0, 20]], "shape_after_resampling": [9, 10, 10]}
    out = preprocess_seeds(seeds, properties, IGNORE)
    assert out.shape == (1, 9, 10, 10)
    assert sorted(map(tuple, np.argwhere(out[0] == 1))) == [(2, 2, 2), (8, 9, 9)]
    assert (out == IGNORE).sum() == 9 * 10 * 10 - 2


def test_loader_stacks_seeds_as_second_seg_channel(tmp_path: Path) -> None:
    case = _write_case(tmp_path)
    seeds = np.full((1, 12, 24, 24), IGNORE, dtype=np.int16)
    seeds[0, 6, 20, 20] = 1
    np.save(tmp_path / "c_seeds.npy", seeds)
    case = D.TrainingCase("c", case.data, case.label, tmp_path / "c_seeds.npy")
    loader = D.PatchLoader(
        [case],
        patch_size=(8, 8, 8),
        batch_size=1,
        foreground_labels=[1],
        ignore_label=IGNORE,
        oversample_foreground=1.0,
        load_seeds=True,
    )
    batch = next(loader)
    assert batch["seg"].shape == (1, 2, 8, 8, 8)
    assert (batch["seg"][0, 1] == 1).sum() == 1


def test_planner_locations_centre_unforced_patches_on_annotated_voxels(tmp_path: Path) -> None:
    case = _write_case(tmp_path)
    np.savez(
        tmp_path / "c_locations.npz", **{"1": np.array([[6, 20, 20]]), "annotated": np.array([[2, 1, 1]])}
    )
    case = D.TrainingCase("c", case.data, case.label, locations=tmp_path / "c_locations.npz")
    loader = D.PatchLoader(
        [case], patch_size=(4, 4, 4), batch_size=2, foreground_labels=[1], ignore_label=IGNORE,
        oversample_foreground=0.5,
    )  # fmt: skip
    np.random.seed(0)
    batch = next(loader)
    assert batch["seg"][0, 0, 2, 2, 2] == 0  # centred on the annotated voxel (2, 1, 1)
    assert batch["seg"][1, 0, 2, 2, 2] == 1  # forced: centred on the stored foreground voxel


def test_batches_carry_the_classes_each_case_left_undrawn(tmp_path: Path) -> None:
    """PatchLoader -> augmenter -> tensors: ``undrawn`` (B, K) per sample's case, for the marginal loss."""
    import torch

    from mipseg.training.loop import to_device

    drawn = _write_case(tmp_path)
    partial = D.TrainingCase("p", drawn.data, drawn.label, undrawn=(2,))
    loader = D.PatchLoader(
        [drawn, partial],
        patch_size=(8, 8, 8),
        batch_size=2,
        foreground_labels=[1, 2],
        ignore_label=IGNORE + 1,
    )
    augmenter = D.make_augmenter(
        loader,
        D.training_transforms((8, 8, 8), D.augmentation_settings((8, 8, 8), ()), IGNORE + 1),
        num_workers=0,
        seed=0,
    )
    batch = next(augmenter)
    expected = np.array([[False, False, case == "p"] for case in batch["keys"]])
    assert batch["undrawn"].shape == (2, 3) and np.array_equal(batch["undrawn"], expected)
    tensors = to_device(batch, torch.device("cpu"), has_seeds=False)
    assert torch.equal(tensors["undrawn"], torch.as_tensor(expected))
    # no case left anything undrawn: no tensor, so the loss takes its plain path
    only_drawn = D.PatchLoader(
        [drawn], patch_size=(8, 8, 8), batch_size=2, foreground_labels=[1], ignore_label=IGNORE
    )
    assert "undrawn" not in to_device(next(only_drawn), torch.device("cpu"), has_seeds=False)
