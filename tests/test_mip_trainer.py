"""The MIP trainer: gather at depth, patch-cut rays, augmentation consistency, inference unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _training_helpers import tiny_plans, write_tiny_dataset
from batchgenerators.transforms.abstract_transforms import Compose
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform

from mipseg import io
from mipseg.errors import InputError
from mipseg.training import data as data_module
from mipseg.training.checkpoint import load_checkpoint
from mipseg.training.loop import TrainingConfig, to_device
from mipseg.training.losses import PartialDiceCELoss
from mipseg.training.mip_branch import MipTrainingNetwork, build_mip_network
from mipseg.training.mip_data import compute_mip_targets, ray_channels
from mipseg.training.mip_losses import (
    MipProjectionLoss,
    MipSettings,
    gather_at_depth,
    project_foreground,
    ray_targets,
)
from mipseg.training.network import build_network
from mipseg.training.train_api import train_fold

IGNORE = 2


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_gather_at_depth_matches_numpy(axis):
    rng = np.random.default_rng(axis)
    volume = rng.normal(size=(2, 3, 5, 6, 7)).astype(np.float32)
    plane = [s for d, s in enumerate(volume.shape[2:]) if d != axis]
    depth = rng.integers(0, volume.shape[2 + axis], size=(2, *plane))
    reference = np.take_along_axis(volume, np.expand_dims(depth[:, None], 2 + axis), axis=2 + axis)
    result = gather_at_depth(torch.from_numpy(volume), torch.from_numpy(depth), axis)
    assert result.shape == (2, 3, *plane)
    np.testing.assert_array_equal(result.numpy(), reference.squeeze(2 + axis))


def _targets_for_crop(depth_plane: np.ndarray, annotation: np.ndarray, bbox, shape):
    targets = {"annotation0": annotation, "depth0": depth_plane.astype(np.int16)}
    return torch.from_numpy(ray_channels(targets, (0,), bbox, shape, IGNORE).astype(np.int64))[None]


def test_vessel_ray_with_brightest_voxel_outside_patch_gets_no_foreground_loss():
    shape = (20, 4, 4)
    annotation = np.zeros((4, 4), dtype=np.uint8)
    annotation[1, 1] = annotation[2, 2] = 1  # two vessel rays
    depth = np.full((4, 4), 5)
    depth[1, 1] = 15  # brightest voxel below the patch (z 0..10)
    depth[2, 2] = 3  # inside the patch
    channels = _targets_for_crop(depth, annotation, [[0, 10], [0, 4], [0, 4]], shape)
    target, supervised, marker_depth, has_marker = ray_targets(channels[:, 0], channels[:, 1], 0, IGNORE)
    assert not supervised[0, 1, 1] and supervised[0, 2, 2] and supervised[0, 0, 0]
    assert not has_marker[0, 1, 1] and int(marker_depth[0, 2, 2]) == 3
    for projection in ("gather", "max"):
        logits = torch.zeros(1, 2, 10, 4, 4, requires_grad=True)
        no_base = lambda outputs, batch: (outputs[0].sum() * 0.0, {})  # noqa: E731
        loss_fn = MipProjectionLoss(no_base, (0,), MipSettings(projection=projection), IGNORE)
        batch = {"data": torch.randn(1, 1, 10, 4, 4), "mip": channels}
        loss, parts = loss_fn([logits], batch)
        loss.backward()
        column_grad = logits.grad.abs().sum(dim=(0, 1, 2))
        assert column_grad[1, 1] == 0, projection  # vessel ray cut by the patch: unsupervised
        assert column_grad[2, 2] > 0 and column_grad[0, 0] > 0  # inside vessel ray, background ray
        assert parts["l_3d_mip"] > 0


def test_max_projection_sees_every_voxel_of_a_background_ray():
    foreground = torch.zeros(1, 6, 3, 3)
    foreground[0, 4, 1, 1] = 0.9  # a false positive away from the MIP voxel
    depth = torch.zeros(1, 3, 3, dtype=torch.long)
    has_marker = torch.ones(1, 3, 3, dtype=torch.bool)
    image = torch.zeros(1, 6, 3, 3)
    maximum = project_foreground(foreground, depth, has_marker, image, 0, "max")
    gathered = project_foreground(foreground, depth, has_marker, image, 0, "gather")
    assert float(maximum[0, 1, 1]) == pytest.approx(0.9) and float(gathered[0, 1, 1]) == 0.0


def _sheet_image(shape, rng):
    """One smooth bright sheet across z: each z-ray has a clear, smoothly varying brightest voxel."""
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    surface = shape[0] / 2 + 0.3 * shape[0] * np.sin(x / 7.0) * np.cos(y / 9.0)
    image = 5 * np.exp(-((z - surface) ** 2) / (2 * 1.5**2)) + rng.normal(0, 0.05, shape)
    return image.astype(np.float32)[None]


def test_augmentation_keeps_depth_marker_on_brightest_voxel(tmp_path):
    rng = np.random.default_rng(0)
    shape, patch = (24, 48, 48), (16, 24, 24)
    image = _sheet_image(shape, rng)
    annotation = (image[0].max(0) > 4).astype(np.uint8)  # anything: only the depth is checked
    np.save(tmp_path / "c.npy", image)
    np.save(tmp_path / "l.npy", np.zeros((1, *shape), dtype=np.int16))
    properties = {"bbox": [[0, s] for s in shape], "shape_before_cropping": list(shape)}
    properties["shape_after_resampling"] = list(shape)
    np.savez(tmp_path / "t.npz", **compute_mip_targets(image, {0: annotation}, properties))
    case = data_module.TrainingCase(
        "c", tmp_path / "c.npy", tmp_path / "l.npy", mip_targets=tmp_path / "t.npz"
    )
    settings = data_module.augmentation_settings(patch, [0])
    loader = data_module.PatchLoader(
        [case],
        patch_size=data_module.initial_patch_size(patch, settings),
        batch_size=4,
        foreground_labels=[1],
        ignore_label=IGNORE,
        mip_axes=(0,),
        seed=0,
    )
    # every sample rotated about z, scaled and possibly mirrored: the strongest test of consistency
    forced = Compose(
        [
            SpatialTransform(
                list(patch),
                patch_center_dist_from_border=None,
                do_elastic_deform=False,
                angle_x=(-np.pi, np.pi),
                angle_y=(0, 0),
                angle_z=(0, 0),
                p_rot_per_axis=1,
                scale=data_module.SCALE_RANGE,
                border_mode_seg="constant",
                border_cval_seg=IGNORE,
                order_seg=1,
                order_data=3,
                random_crop=False,
                p_rot_per_sample=1,
                p_scale_per_sample=1,
            ),
            data_module.CastSegTransform(),
            MirrorTransform((0, 1, 2)),
        ]
    )
    transforms = [forced, data_module.training_transforms(patch, settings, IGNORE)]
    np.random.seed(0)
    for transform in transforms:
        batch = transform(**loader.generate_train_batch())
        tensors = to_device(batch, torch.device("cpu"), has_seeds=False)
        _, _, depth, has_marker = ray_targets(tensors["mip"][:, 0], tensors["mip"][:, 1], 0, IGNORE)
        brightest = tensors["data"][:, 0].argmax(dim=1)
        # rays whose sheet voxel (the brightest of the whole volume) is inside the patch need a depth
        sheet_in_patch = tensors["data"][:, 0].amax(dim=1) > 2.5
        interior = sheet_in_patch & (brightest > 0) & (brightest < patch[0] - 1)
        assert interior.float().mean() > 0.2
        assert has_marker[interior].float().mean() > 0.9
        close = (depth - brightest).abs() <= 1
        assert close[has_marker].float().mean() > 0.95


def _tiny_mip_dataset(roots) -> str:
    name = write_tiny_dataset(roots, num_cases=3, plans=tiny_plans(patch_size=(16, 32, 32), mip_axes=[0]))
    raw = roots["raw"] / name
    for label_path in sorted((raw / "labelsTr").glob("*.nii.gz")):
        label, _ = io.read_image(label_path)
        case = label_path.name.removesuffix(".nii.gz")
        io.write_png((label.max(0) * 255).astype(np.uint8), raw / "annotationsTr" / f"{case}_mip0.png")
    return name


def test_mip_trainer_checkpoint_loads_into_plain_network_and_resumes(data_roots):
    torch.set_num_threads(1)
    name = _tiny_mip_dataset(data_roots)
    config = TrainingConfig(epochs=1, iters_per_epoch=2, val_iters=1, num_workers=0, device="cpu")
    fold_dir = train_fold(name, 0, trainer="auto", config=config, show_progress=False)  # auto -> mip
    assert fold_dir.parent.name.startswith("mip__pseudo")
    checkpoint = load_checkpoint(fold_dir / "checkpoint_final.pt")
    assert checkpoint["trainer"] == "mip" and checkpoint["mip_settings"] == MipSettings().to_json()
    assert checkpoint["mip_branch_weights"] and all(
        "branches" not in k for k in checkpoint["network_weights"]
    )
    plans = tiny_plans(patch_size=(16, 32, 32), mip_axes=[0])
    plain = build_network(plans, num_input_channels=1, num_classes=2, deep_supervision=False)
    plain.load_state_dict(checkpoint["network_weights"])  # strict: what mipseg_predict does
    assert (fold_dir / "validation").is_dir()
    resumed = train_fold(
        name,
        0,
        trainer="mip",
        config=TrainingConfig(epochs=2, iters_per_epoch=2, val_iters=1, num_workers=0, device="cpu"),
        resume=True,
        show_progress=False,
    )
    again = load_checkpoint(resumed / "checkpoint_final.pt")
    assert again["epoch"] == 2
    changed = [
        not torch.equal(again["mip_branch_weights"][k], checkpoint["mip_branch_weights"][k])
        for k in checkpoint["mip_branch_weights"]
    ]
    assert any(changed)  # the branch kept training from its stored weights


def test_prediction_is_the_3d_network_alone():
    torch.manual_seed(0)
    plans = tiny_plans(patch_size=(16, 32, 32), mip_axes=[0])
    wrapper = build_mip_network(plans, num_input_channels=1, num_classes=2, axes=(0,))
    assert isinstance(wrapper, MipTrainingNetwork)
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        training_outputs = wrapper(x)  # with the MIP branch
    assert 0 in training_outputs.branch_logits
    weights, branch = wrapper.split_weights(wrapper.state_dict())
    plain = build_network(plans, num_input_channels=1, num_classes=2, deep_supervision=False)
    plain.load_state_dict(weights)
    wrapper.eval(), plain.eval()
    wrapper.deep_supervision = False
    with torch.no_grad():
        without_branch = wrapper(x)
        standalone = plain(x)
    assert torch.equal(without_branch, standalone)
    torch.testing.assert_close(training_outputs[0], standalone, rtol=0, atol=1e-5)
    assert set(wrapper.join_weights(weights, branch)) == set(wrapper.state_dict())


def test_loss_without_mip_channels_is_the_plain_loss():
    torch.manual_seed(0)
    logits = [torch.randn(1, 2, 8, 8, 8), torch.randn(1, 2, 4, 4, 4)]
    batch = {"data": torch.randn(1, 1, 8, 8, 8), "target": torch.randint(0, 3, (1, 1, 8, 8, 8))}
    base = PartialDiceCELoss(ignore_label=IGNORE)
    loss, _ = MipProjectionLoss(base, (0,), MipSettings(), IGNORE)(logits, batch)
    assert torch.equal(loss, base(logits, batch)[0])


def test_auto_picks_mip_only_when_every_case_has_its_mip_annotation(data_roots):
    from mipseg.training.trainer_registry import resolve_trainer_name

    name = write_tiny_dataset(data_roots, num_cases=2)  # annotation "mip" but no PNGs
    assert resolve_trainer_name(name, "auto") == "plain"
    raw = data_roots["raw"] / name
    annotation = np.zeros((40, 40), dtype=np.uint8)
    annotation[20, 5:30] = 255
    for case in ("case_000", "case_001"):
        io.write_png(annotation, raw / "annotationsTr" / f"{case}_mip0.png")
    assert resolve_trainer_name(name, "auto") == "mip"
    assert resolve_trainer_name(name, "plain") == "plain"
    with pytest.raises(InputError, match="--mip-projection"):
        train_fold(name, 0, trainer="mip", mip_settings=MipSettings(projection="mean"), show_progress=False)


def test_two_mip_axes_train_one_branch_each():
    torch.manual_seed(0)
    plans = tiny_plans(patch_size=(16, 32, 32), mip_axes=[0, 2])
    network = build_mip_network(plans, num_input_channels=1, num_classes=2, axes=(0, 2))
    x = torch.randn(1, 1, 16, 32, 32)
    outputs = network(x)
    assert outputs.branch_logits[0].shape == (1, 2, 32, 32) and outputs.branch_logits[2].shape == (
        1,
        2,
        16,
        32,
    )
    image = np.zeros((1, 16, 32, 32), dtype=np.float32)
    image[0, 5:9, 10:12, 4:20] = 3.0
    properties = {"bbox": [[0, 16], [0, 32], [0, 32]], "shape_before_cropping": [16, 32, 32]}
    properties["shape_after_resampling"] = [16, 32, 32]
    annotations = {0: (image[0].max(0) > 1).astype(np.uint8), 2: (image[0].max(2) > 1).astype(np.uint8)}
    targets = compute_mip_targets(image, annotations, properties)
    channels = ray_channels(targets, (0, 2), [[0, 16], [0, 32], [0, 32]], (16, 32, 32), IGNORE)
    batch = {
        "data": torch.from_numpy(image)[None],
        "target": torch.zeros(1, 1, 16, 32, 32, dtype=torch.long),
        "mip": torch.from_numpy(channels.astype(np.int64))[None],
    }
    loss, parts = MipProjectionLoss(PartialDiceCELoss(ignore_label=IGNORE), (0, 2), MipSettings(), IGNORE)(
        outputs, batch
    )
    loss.backward()
    assert np.isfinite(float(loss.detach())) and parts["l_mip"] > 0 and parts["l_3d_mip"] > 0
    for key in ("0", "2"):
        head = network.branches[key].head.weight
        assert head.grad is not None and float(head.grad.abs().sum()) > 0
