"""Experiment planning: target spacing, patch and batch size, topology, normalization (nnU-Net's rules).

What nnU-Net's default ``ExperimentPlanner`` does for ``3d_fullres``, with two additions:

* **The budget is explicit.** On a GPU it is nnU-Net's VRAM proxy (560e6 feature-map elements
  for 8 GB, batch 2, scaled linearly with ``gpu_memory_gb``). On CPU it is a compute budget in
  the same unit, calibrated so that one training step (forward + backward, batch 2) takes about
  one second on 2 cores (see :data:`CPU_BUDGET` and ``benchmarks/plan_vs_nnunet.py``).
* **MIP mode keeps rays whole.** The patch spans the whole volume along the first projection
  axis; only the other axes shrink to meet the budget. If they would fall below
  :data:`MIN_INPLANE_PATCH_EDGE`, the planner falls back to nnU-Net's patch and says so in
  ``plans.notes`` (the trainer then sees partial rays).

Arrays stay ``(z, y, x)``: unlike nnU-Net there is no transpose putting the coarse axis first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mipseg.planning.plans import NetworkTopology, Plans
from mipseg.planning.resampling import ANISOTROPY_THRESHOLD, compute_new_shape
from mipseg.planning.topology import estimate_feature_map_size, get_pool_and_conv_props, make_topology

INITIAL_PATCH_VOLUME = 256**3  # nnU-Net's starting patch volume for 3D
MAX_DATASET_COVERED = 0.05  # one batch covers at most 5 % of the dataset's voxels
MIN_BATCH_SIZE = 2
REFERENCE_BATCH_SIZE = 2
MIN_INPLANE_PATCH_EDGE = 32  # MIP mode: in-plane patch edges may not shrink below this to keep rays whole


@dataclass(frozen=True)
class Budget:
    """What patch and batch size are planned against.

    ``reference_value`` is the number of conv feature-map elements (see
    :func:`~mipseg.planning.topology.estimate_feature_map_size`) allowed per
    ``reference_batch_size`` samples.
    """

    kind: str
    reference_value: float
    base_features: int
    max_features: int
    description: str
    gpu_memory_gb: float | None = None
    measured_seconds_per_step: float | None = None

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "reference_value": self.reference_value,
            "reference_batch_size": REFERENCE_BATCH_SIZE,
            "base_features": self.base_features,
            "max_features": self.max_features,
            "gpu_memory_gb": self.gpu_memory_gb,
            "measured_seconds_per_step": self.measured_seconds_per_step,
            "description": self.description,
        }


def gpu_budget(gpu_memory_gb: float = 8.0) -> Budget:
    """nnU-Net's reference: 560e6 elements at 8 GB with batch 2, 32..320 features."""
    return Budget(
        kind="gpu",
        reference_value=560_000_000 * gpu_memory_gb / 8.0,
        base_features=32,
        max_features=320,
        description=f"nnU-Net VRAM proxy for {gpu_memory_gb:g} GB (560e6 at 8 GB, batch 2)",
        gpu_memory_gb=gpu_memory_gb,
    )


# Calibrated with ``benchmarks/plan_vs_nnunet.py --calibrate`` (torch threads = 2, the project's plain
# conv-IN-LeakyReLU U-Net, forward + backward + SGD, batch 2, deep supervision; CPU time / 2 threads
# because the machine was shared): estimate 3.5e6 -> 0.87 s, 7.1e6 -> 1.22 s, 8.0e6 -> 1.16 s,
# 2.1e7 -> 2.63 s, and nnU-Net's default plan for 64x96x96 -> 16.0 s (16.5 s measured unshared).
CPU_REFERENCE_VALUE = 7_500_000
CPU_MEASURED_SECONDS_PER_STEP = 1.2
CPU_BUDGET = Budget(
    kind="cpu",
    reference_value=CPU_REFERENCE_VALUE,
    base_features=16,
    max_features=160,
    description="compute budget: about 1 s per training step (batch 2) on 2 CPU cores",
    measured_seconds_per_step=CPU_MEASURED_SECONDS_PER_STEP,
)


def target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> tuple[list[float], bool]:
    """Median spacing, with nnU-Net's anisotropy rule.

    Parameters
    ----------
    spacings, shapes : np.ndarray, shape (num_cases, 3)
        Per case spacing and shape after cropping, ``(z, y, x)``.

    Returns
    -------
    spacing : list of 3 floats
    anisotropic : bool
        True if the coarse axis is > 3x the others in spacing and has < 1/3 of their voxels; its
        target then becomes the 10th percentile of its spacings (not below the other axes).
    """
    target = np.percentile(spacings, 50, axis=0)
    size = np.percentile(shapes, 50, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    anisotropic = bool(
        target[worst] > ANISOTROPY_THRESHOLD * max(target[others])
        and size[worst] * ANISOTROPY_THRESHOLD < min(size[others])
    )
    if anisotropic:
        value = np.percentile(spacings[:, worst], 10)
        if value < max(target[others]):
            value = max(max(target[others]), value) + 1e-5
        target[worst] = value
    return [float(s) for s in target], anisotropic


def initial_patch_size(spacing: Sequence[float], median_shape: Sequence[float]) -> list[float]:
    """Patch with the aspect of ``1/spacing`` and 256^3 voxels, clipped to the median shape.

    The median may be fractional (as in nnU-Net); the pooling plan pads the patch up to integers.
    """
    aspect = 1.0 / np.asarray(spacing, float)
    patch = np.round(aspect * (INITIAL_PATCH_VOLUME / np.prod(aspect)) ** (1 / 3)).astype(int)
    return [float(v) for v in np.minimum(patch, np.asarray(median_shape, float))]


def fit_patch_to_budget(
    spacing: Sequence[float],
    patch: Sequence[float],
    median_shape: Sequence[float],
    budget: Budget,
    num_classes: int,
    shrinkable_axes: Sequence[int] = (0, 1, 2),
    min_edge: Sequence[int] = (0, 0, 0),
) -> tuple[list[int], NetworkTopology, int] | None:
    """nnU-Net's shrink loop: cut the axis with the largest patch/median ratio until the estimate fits.

    Only ``shrinkable_axes`` are cut, never below ``min_edge``. Returns ``None`` if the budget
    cannot be met that way.

    Returns
    -------
    (patch_size, topology, estimate) or None
    """
    median = np.asarray(median_shape, float)
    pooling = get_pool_and_conv_props(spacing, patch)
    topology = make_topology(pooling, budget.base_features, budget.max_features)
    estimate = estimate_feature_map_size(pooling.patch_size, topology, num_classes)
    patch = list(pooling.patch_size)
    while estimate / REFERENCE_BATCH_SIZE * 2 > budget.reference_value:
        ratios = np.asarray(patch, float) / median
        candidates = [a for a in shrinkable_axes if patch[a] - pooling.divisibility[a] >= max(min_edge[a], 1)]
        if not candidates:
            return None
        # nnU-Net: argsort(ratios)[-1], i.e. the last axis among ties
        axis = [int(a) for a in np.argsort(ratios, kind="stable") if a in candidates][-1]
        trial = list(patch)
        trial[axis] -= pooling.divisibility[axis]
        # divisibility of the reduced shape, so that e.g. 256 -> 224 is not skipped (as nnU-Net)
        step = get_pool_and_conv_props(spacing, trial).divisibility[axis]
        patch[axis] -= step
        if patch[axis] < max(min_edge[axis], 1):
            return None
        pooling = get_pool_and_conv_props(spacing, patch)
        patch = list(pooling.patch_size)
        topology = make_topology(pooling, budget.base_features, budget.max_features)
        estimate = estimate_feature_map_size(patch, topology, num_classes)
    return patch, topology, estimate


def batch_size_for(
    estimate: int, patch: Sequence[int], median_shape: Sequence[float], num_cases: int, budget: Budget
) -> int:
    """nnU-Net's batch size: fill the budget, at most 5 % of the dataset per batch, at least 2."""
    batch = round(budget.reference_value / estimate * REFERENCE_BATCH_SIZE)
    dataset_voxels = float(np.prod(median_shape, dtype=np.float64)) * num_cases
    cap = round(dataset_voxels * MAX_DATASET_COVERED / float(np.prod(patch, dtype=np.float64)))
    return int(max(min(batch, cap), MIN_BATCH_SIZE))


def normalization_schemes(
    channel_names: dict[str, str], median_relative_size: float
) -> tuple[list[str], list[bool]]:
    """``"CT"`` for channels named CT (any case), ``"ZScore"`` otherwise; masks as nnU-Net."""
    schemes, masks = [], []
    for key in sorted(channel_names, key=int):
        scheme = "CT" if channel_names[key].strip().lower() == "ct" else "ZScore"
        schemes.append(scheme)
        # only z-score leaves the outside of the mask at 0, and only pays off if cropping removed a lot
        masks.append(scheme == "ZScore" and median_relative_size < 0.75)
    return schemes, masks


def default_resampling() -> dict:
    """nnU-Net's orders: data 3, labels 1 (one-hot), probabilities 1, coarse axis 0."""
    return {
        "data_order": 3,
        "data_order_z": 0,
        "seg_order": 1,
        "seg_order_z": 0,
        "probabilities_order": 1,
        "probabilities_order_z": 0,
        "separate_z_anisotropy_threshold": ANISOTROPY_THRESHOLD,
    }


def plan_experiment(fingerprint: dict, spec, dataset_name: str, budget: Budget) -> Plans:
    """Plans for one dataset from its fingerprint and :class:`~mipseg.dataset.DatasetSpec`."""
    spacings = np.asarray(fingerprint["spacings"], float)
    shapes = np.asarray(fingerprint["shapes_after_crop"], float)
    spacing, anisotropic = target_spacing(spacings, shapes)
    new_shapes = np.asarray([compute_new_shape(s, sp, spacing) for s, sp in zip(shapes, spacings)])
    median_shape = [float(v) for v in np.median(new_shapes, axis=0)]
    num_classes = spec.num_classes
    notes = [f"anisotropic: coarse axis {int(np.argmax(spacing))} planned separately"] if anisotropic else []

    mip_axes = list(spec.mip_axes) if spec.annotation == "mip" else []
    fitted = None
    if mip_axes:
        fitted, note = _fit_whole_rays(spacing, median_shape, new_shapes, mip_axes[0], budget, num_classes)
        notes.append(note)
    if fitted is None:
        patch = initial_patch_size(spacing, median_shape)
        fitted = fit_patch_to_budget(spacing, patch, median_shape, budget, num_classes)
    if fitted is None:
        raise RuntimeError("no patch fits the budget; raise --gpu-memory-gb")
    patch, topology, estimate = fitted
    batch = batch_size_for(estimate, patch, median_shape, len(spacings), budget)
    schemes, masks = normalization_schemes(
        spec.channel_names, fingerprint["median_relative_size_after_cropping"]
    )
    budget_json = budget.to_json() | {"estimate": estimate, "estimate_times_batch": estimate * batch / 2}
    return Plans(
        dataset_name=dataset_name,
        spacing=spacing,
        original_median_spacing=[float(v) for v in np.median(spacings, axis=0)],
        median_shape=[int(round(v)) for v in median_shape],
        patch_size=[int(p) for p in patch],
        batch_size=batch,
        network=topology,
        normalization=schemes,
        use_mask_for_norm=masks,
        intensity_properties=fingerprint["foreground_intensity_properties_per_channel"],
        resampling=default_resampling(),
        labels=dict(spec.labels) | {"ignore": spec.ignore_label},
        ignore_label=spec.ignore_label,
        annotation=spec.annotation,
        mip_axes=mip_axes,
        budget=budget_json,
        notes=notes,
    )


def _fit_whole_rays(
    spacing: list[float],
    median_shape: list[float],
    new_shapes: np.ndarray,
    axis: int,
    budget: Budget,
    num_classes: int,
) -> tuple[tuple[list[int], NetworkTopology, int] | None, str]:
    """Patch spanning the largest resampled extent along ``axis``; other axes shrink to the budget."""
    full = int(new_shapes[:, axis].max())
    patch = initial_patch_size(spacing, median_shape)
    patch[axis] = full
    others = [a for a in range(3) if a != axis]
    min_edge = [0, 0, 0]
    for a in others:
        min_edge[a] = min(MIN_INPLANE_PATCH_EDGE, median_shape[a])
    fitted = fit_patch_to_budget(spacing, patch, median_shape, budget, num_classes, others, min_edge)
    if fitted is None:
        return None, (
            f"MIP axis {axis}: a patch spanning all {full} voxels does not fit the budget with in-plane "
            f"edges >= {MIN_INPLANE_PATCH_EDGE}; fell back to nnU-Net's patch (rays are split across patches)"
        )
    return fitted, f"MIP axis {axis}: patch spans the whole extent ({full} voxels, padded to divisibility)"


def plans_table(plans: Plans):
    """A rich table of the plan, for the terminal."""
    from rich.table import Table

    table = Table(title=f"{plans.dataset_name}: plans (3d_fullres)", show_header=False)
    topology = plans.network
    rows = [
        ("budget", f"{plans.budget.get('kind')}: {plans.budget.get('description')}"),
        ("target spacing (z,y,x)", _fmt(plans.spacing)),
        ("median spacing (z,y,x)", _fmt(plans.original_median_spacing)),
        ("median shape after resampling", _fmt(plans.median_shape)),
        ("patch size", _fmt(plans.patch_size)),
        ("batch size", str(plans.batch_size)),
        ("stages / features", f"{topology.num_stages}: {topology.features_per_stage}"),
        ("strides", " ".join(_fmt(s) for s in topology.strides)),
        ("kernels", " ".join(_fmt(k) for k in topology.kernel_sizes)),
        (
            "normalization",
            ", ".join(
                f"{s}{' (mask)' if m else ''}" for s, m in zip(plans.normalization, plans.use_mask_for_norm)
            ),
        ),
        (
            "budget estimate",
            f"{plans.budget.get('estimate', 0):.3g} per sample, "
            f"{plans.budget.get('reference_value', 0):.3g} allowed per 2 samples",
        ),
        ("MIP axes", _fmt(plans.mip_axes) if plans.mip_axes else "-"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    for note in plans.notes:
        table.add_row("note", note)
    return table


def _fmt(values: Sequence) -> str:
    return "x".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in values)
