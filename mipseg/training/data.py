"""Patch loading and augmentation (batchgenerators), nnU-Net style, safe for partial labels.

Cases are read from the preprocessed folder: ``data/{case}.npy`` float32 ``(C, z, y, x)``,
``data/labelsets/{name}/{case}.npy`` int16 ``(1, z, y, x)`` (labels or the ignore value) and,
when the label set has seeds, ``data/labelsets/{name}/{case}_seeds.npy`` of the same layout
(the seed's class at seed voxels, the ignore value elsewhere). Seeds travel as a second ``seg``
channel so every spatial transform moves them with the labels.

Everything outside the image (padding, rotated-in corners) gets the ignore value, never
background: it is unknown. In MIP mode the spatial transforms keep projection rays intact:
rotation only about the single projection axis, isotropic scaling, mirroring; no elastic
deformation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgenerators.dataloading.data_loader import DataLoader
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgenerators.transforms.abstract_transforms import AbstractTransform, Compose
from batchgenerators.transforms.color_transforms import (
    BrightnessMultiplicativeTransform,
    ContrastAugmentationTransform,
    GammaTransform,
)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform

from mipseg.training.mip_data import ray_channels

SCALE_RANGE = (0.7, 1.4)
MAX_LOCATIONS_PER_CLASS = 10000


@dataclass(frozen=True)
class TrainingCase:
    """Where one preprocessed training case lives.

    Attributes
    ----------
    case_id
        Case identifier.
    data
        ``(C, z, y, x)`` float32 ``.npy``.
    label
        ``(1, z, y, x)`` int16 ``.npy`` of the label set.
    seeds
        Optional ``(1, z, y, x)`` int16 ``.npy`` of seed voxels (ignore value elsewhere).
    locations
        Optional ``{case}_locations.npz`` of the planner (``str(label)`` and ``"annotated"`` ->
        ``(N, 3)`` voxels); computed from the label when absent.
    mip_targets
        Optional ``data/mip_targets/{case}.npz`` of the MIP trainer (:mod:`mipseg.training.mip_data`).
    undrawn
        Class values the label set did not draw in this case (its background may hold them;
        :meth:`mipseg.labelset.LabelSet.undrawn_classes`).
    """

    case_id: str
    data: Path
    label: Path
    seeds: Path | None = None
    locations: Path | None = None
    mip_targets: Path | None = None
    undrawn: tuple[int, ...] = ()


@dataclass(frozen=True)
class AugmentationSettings:
    """What the spatial augmentation may do.

    Attributes
    ----------
    rotation_axes
        Numpy spatial axes (0 = z) rotated about; ``()`` = no rotation.
    max_angle
        Rotation range ``[-max_angle, max_angle]`` in radians.
    mirror_axes
        Spatial axes that may be flipped.
    """

    rotation_axes: tuple[int, ...]
    max_angle: float
    mirror_axes: tuple[int, ...] = (0, 1, 2)


def augmentation_settings(patch_size: Sequence[int], mip_axes: Sequence[int]) -> AugmentationSettings:
    """nnU-Net's rotation choice, restricted to the projection axis in MIP mode.

    * one MIP axis: in-plane rotation about it, +-180 degrees (rays stay rays);
    * several MIP axes: no rotation (any rotation tilts the rays of one of them);
    * no MIP, anisotropic patch (``max/patch[0] > 3``): nnU-Net's dummy-2D in-plane +-180 degrees;
    * otherwise +-30 degrees about every axis.
    """
    if len(mip_axes) == 1:
        return AugmentationSettings((int(mip_axes[0]),), np.pi)
    if len(mip_axes) > 1:
        return AugmentationSettings((), 0.0)
    if max(patch_size) / patch_size[0] > 3:
        return AugmentationSettings((0,), np.pi)
    return AugmentationSettings((0, 1, 2), np.pi / 6)


def initial_patch_size(patch_size: Sequence[int], settings: AugmentationSettings) -> list[int]:
    """Patch to crop before the spatial transform so rotation and down-scaling find real voxels.

    As nnU-Net's ``get_patch_size``: the bounding box of the rotated patch corners over the
    rotation range, divided by the smallest scale (0.85 there; here the scale range minimum).
    """
    size = np.array(patch_size, dtype=float)
    corners = np.array(np.meshgrid(*[[-s / 2, s / 2] for s in size], indexing="ij")).reshape(3, -1)
    extent = np.abs(corners).max(axis=1)
    angles = np.linspace(-settings.max_angle, settings.max_angle, 37) if settings.rotation_axes else [0.0]
    for axis in settings.rotation_axes:
        a, b = [d for d in range(3) if d != axis]
        for angle in angles:
            c, s = np.cos(angle), np.sin(angle)
            rotated_a = c * corners[a] - s * corners[b]
            rotated_b = s * corners[a] + c * corners[b]
            extent[a] = max(extent[a], np.abs(rotated_a).max())
            extent[b] = max(extent[b], np.abs(rotated_b).max())
    enlarged = np.ceil(2 * extent / min(SCALE_RANGE[0], 0.85)).astype(int)
    return [int(max(e, p)) for e, p in zip(enlarged, patch_size)]


def foreground_locations(
    label: np.ndarray, foreground_labels: Sequence[int], rng: np.random.Generator
) -> dict[int, np.ndarray]:
    """Coordinates of labelled foreground voxels per class (at most 10,000 each, random subset).

    Parameters
    ----------
    label
        ``(1, z, y, x)`` or ``(z, y, x)``.

    Returns
    -------
    ``{class: (N, 3) int array of (z, y, x)}`` for classes present.
    """
    label = np.asarray(label).reshape(label.shape[-3:])
    locations = {}
    for value in foreground_labels:
        coords = np.argwhere(label == value)
        if len(coords) > MAX_LOCATIONS_PER_CLASS:
            coords = coords[rng.choice(len(coords), MAX_LOCATIONS_PER_CLASS, replace=False)]
        if len(coords):
            locations[int(value)] = coords
    return locations


class PatchLoader(DataLoader):
    """Infinite random patches with foreground oversampling on labelled foreground voxels.

    Each batch is ``{"data": (B, C, *crop), "seg": (B, S, *crop), "undrawn": (B, K) bool, "keys": [...]}``
    (``undrawn``: the classes each sample's case did not draw, :attr:`TrainingCase.undrawn`) with
    ``crop = initial patch size`` (the spatial transform cuts the final patch); ``S`` is 1, or 2
    when seeds are loaded, plus two per axis of ``mip_axes`` (ray annotation, brightest-voxel
    marker: :func:`mipseg.training.mip_data.ray_channels`). Sample ``j`` of a batch is forced onto
    a foreground voxel iff
    ``j >= round(B * (1 - oversample_foreground))`` (nnU-Net). Other samples are centred on a
    random labelled voxel when the case has unlabelled voxels (nnU-Net's ignore-label rule),
    else placed uniformly. All randomness comes from ``np.random`` so augmenter worker seeds
    make the stream reproducible.
    """

    def __init__(
        self,
        cases: Sequence[TrainingCase],
        *,
        patch_size: Sequence[int],
        batch_size: int,
        foreground_labels: Sequence[int],
        ignore_label: int,
        oversample_foreground: float = 0.33,
        load_seeds: bool = False,
        seed: int = 0,
        mip_axes: Sequence[int] = (),
    ) -> None:
        super().__init__(list(cases), batch_size, 1, None, infinite=True, shuffle=False)
        self.patch_size = [int(p) for p in patch_size]
        self.foreground_labels = [int(v) for v in foreground_labels]
        self.ignore_label = int(ignore_label)
        self.oversample_foreground = oversample_foreground
        self.load_seeds = load_seeds
        self.mip_axes = tuple(int(a) for a in mip_axes)
        self.indices = list(range(len(cases)))
        rng = np.random.default_rng(seed)
        self.locations = [self._load_locations(case, rng) for case in cases]

    def _load_locations(self, case: TrainingCase, rng: np.random.Generator) -> dict[int | str, np.ndarray]:
        """Foreground voxels per class, plus ``"annotated"`` (labelled voxels) if the planner stored them."""
        if case.locations is not None and case.locations.is_file():
            with np.load(case.locations) as stored:
                return {
                    (int(k) if k.isdigit() else k): stored[k]
                    for k in stored.files
                    if k == "annotated" or (k.isdigit() and int(k) in self.foreground_labels)
                }
        return foreground_locations(np.load(case.label, mmap_mode="r"), self.foreground_labels, rng)

    def _force_foreground(self, sample_index: int) -> bool:
        return sample_index >= round(self.batch_size * (1 - self.oversample_foreground))

    def _centre(self, case_index: int, label: np.ndarray, force_foreground: bool) -> np.ndarray | None:
        locations = self.locations[case_index]
        foreground = {k: v for k, v in locations.items() if k != "annotated"}
        if force_foreground and foreground:
            classes = sorted(foreground)
            coords = foreground[classes[np.random.randint(len(classes))]]
            return coords[np.random.randint(len(coords))]
        if "annotated" in locations:  # nnU-Net: centre on a random labelled voxel
            coords = locations["annotated"]
            return coords[np.random.randint(len(coords))]
        # rejection sampling of a labelled voxel: cheap, no per-case index of the (large) labelled set
        shape = label.shape[1:]
        for _ in range(50):
            voxel = np.array([np.random.randint(s) for s in shape])
            if label[(0, *voxel)] != self.ignore_label:
                return voxel
        if foreground:  # sparse labels: fall back to a stored foreground voxel
            return self._centre(case_index, label, True)
        return None

    def _bbox(self, shape: Sequence[int], centre: np.ndarray | None) -> list[list[int]]:
        bbox = []
        for axis, (size, patch) in enumerate(zip(shape, self.patch_size)):
            if centre is None:
                # uniform over positions that keep at least half the patch inside the image
                low, high = -patch // 2, max(size - patch // 2 - patch % 2, -patch // 2)
                start = np.random.randint(low, high + 1)
            else:
                start = int(centre[axis]) - patch // 2
            bbox.append([start, start + patch])
        return bbox

    def generate_train_batch(self) -> dict[str, object]:
        data, seg, keys = [], [], []
        undrawn = np.zeros((self.batch_size, max(self.foreground_labels, default=0) + 1), dtype=bool)
        for j, index in enumerate(self.get_indices()):
            case = self._data[index]
            undrawn[j, list(case.undrawn)] = True
            image = np.load(case.data, mmap_mode="r")
            label = np.load(case.label, mmap_mode="r")
            bbox = self._bbox(image.shape[1:], self._centre(index, label, self._force_foreground(j)))
            data.append(crop_and_pad_nd(image, bbox, pad_value=0))
            channels = [crop_and_pad_nd(label, bbox, pad_value=self.ignore_label)]
            if self.load_seeds:
                if case.seeds is not None:
                    channels.append(
                        crop_and_pad_nd(np.load(case.seeds, mmap_mode="r"), bbox, self.ignore_label)
                    )
                else:
                    channels.append(np.full_like(channels[0], self.ignore_label))
            if self.mip_axes:
                with np.load(case.mip_targets) as targets:
                    channels.append(
                        ray_channels(targets, self.mip_axes, bbox, image.shape[1:], self.ignore_label)
                    )
            seg.append(np.concatenate(channels, axis=0))
            keys.append(case.case_id)
        return {
            "data": np.stack(data).astype(np.float32),
            "seg": np.stack(seg).astype(np.int16),
            "undrawn": undrawn,
            "keys": keys,
        }


class CastSegTransform(AbstractTransform):
    """Round the (float) seg of the spatial transform back to int16 labels."""

    def __call__(self, **data_dict):
        data_dict["seg"] = np.rint(data_dict["seg"]).astype(np.int16)
        return data_dict


def training_transforms(
    patch_size: Sequence[int], settings: AugmentationSettings, ignore_label: int
) -> Compose:
    """nnU-Net's batchgenerators-v1 pipeline, with the ignore value as the seg border.

    Probabilities as nnU-Net: rotation 0.2, scaling 0.2 (0.7-1.4), noise 0.1, blur 0.2,
    brightness 0.15, contrast 0.15, low resolution 0.25, inverted gamma 0.1, gamma 0.3,
    mirror 0.5 per axis. No elastic deformation.
    """
    angles = [(0.0, 0.0)] * 3
    for axis in settings.rotation_axes:
        angles[axis] = (-settings.max_angle, settings.max_angle)
    return Compose(
        [
            SpatialTransform(
                list(patch_size),
                patch_center_dist_from_border=None,
                do_elastic_deform=False,
                do_rotation=bool(settings.rotation_axes),
                angle_x=angles[0],
                angle_y=angles[1],
                angle_z=angles[2],
                p_rot_per_axis=1,
                do_scale=True,
                scale=SCALE_RANGE,
                border_mode_data="constant",
                border_cval_data=0,
                order_data=3,
                border_mode_seg="constant",
                border_cval_seg=ignore_label,
                order_seg=1,
                random_crop=False,
                p_el_per_sample=0,
                p_scale_per_sample=0.2,
                p_rot_per_sample=0.2,
                independent_scale_for_each_axis=False,
            ),
            CastSegTransform(),
            GaussianNoiseTransform(p_per_sample=0.1),
            GaussianBlurTransform(
                (0.5, 1.0), different_sigma_per_channel=True, p_per_sample=0.2, p_per_channel=0.5
            ),
            BrightnessMultiplicativeTransform(multiplier_range=(0.75, 1.25), p_per_sample=0.15),
            ContrastAugmentationTransform(p_per_sample=0.15),
            SimulateLowResolutionTransform(
                zoom_range=(0.5, 1),
                per_channel=True,
                p_per_channel=0.5,
                order_downsample=0,
                order_upsample=3,
                p_per_sample=0.25,
            ),
            GammaTransform(
                (0.7, 1.5), invert_image=True, per_channel=True, retain_stats=True, p_per_sample=0.1
            ),
            GammaTransform(
                (0.7, 1.5), invert_image=False, per_channel=True, retain_stats=True, p_per_sample=0.3
            ),
            MirrorTransform(settings.mirror_axes),
        ]
    )


class CentreCropTransform(AbstractTransform):
    """Cut the centred final patch out of the enlarged crop (validation: no augmentation)."""

    def __init__(self, patch_size: Sequence[int]) -> None:
        self.patch_size = [int(p) for p in patch_size]

    def __call__(self, **data_dict):
        shape = data_dict["data"].shape[2:]
        slices = tuple(slice((s - p) // 2, (s - p) // 2 + p) for s, p in zip(shape, self.patch_size))
        data_dict["data"] = np.ascontiguousarray(data_dict["data"][(slice(None), slice(None), *slices)])
        data_dict["seg"] = np.ascontiguousarray(data_dict["seg"][(slice(None), slice(None), *slices)])
        return data_dict


def make_augmenter(
    loader: PatchLoader,
    transform: AbstractTransform,
    *,
    num_workers: int,
    seed: int,
    pin_memory: bool = False,
):
    """Background workers (deterministic round-robin order given ``seed``) or one thread if 0 workers.

    batchgenerators' :class:`MultiThreadedAugmenter` is used rather than the non-deterministic one
    so that ``--seed`` reproduces a run exactly; each worker's numpy RNG gets its own seed.
    """
    if num_workers <= 0:
        np.random.seed(seed % 2**32)
        return SingleThreadedAugmenter(loader, transform)
    seeds = [int((seed * 1000 + i) % 2**32) for i in range(num_workers)]
    return MultiThreadedAugmenter(
        loader, transform, num_workers, num_cached_per_queue=2, seeds=seeds, pin_memory=pin_memory
    )
