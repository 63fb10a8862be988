"""U-Net topology rules of nnU-Net: pooling per axis, kernel sizes, and the feature-map budget estimate.

``get_pool_and_conv_props`` follows nnU-Net's ``experiment_planning/experiment_planners/
network_topology.py``; ``estimate_feature_map_size`` follows ``compute_conv_feature_map_size`` of
dynamic-network-architectures' ``PlainConvUNet`` (the number nnU-Net compares with its GPU
reference value). Written from the documented rules; nnunetv2 is not imported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mipseg.planning.plans import NetworkTopology

MIN_FEATURE_MAP_EDGE = 4  # UNet_featuremap_min_edge_length
MAX_NUM_POOL = 999999


@dataclass
class PoolingPlan:
    """Result of :func:`get_pool_and_conv_props` (all lists per axis ``(z, y, x)``)."""

    num_pool_per_axis: list[int]
    strides: list[list[int]]
    kernel_sizes: list[list[int]]
    patch_size: list[int]
    divisibility: list[int]


def get_pool_and_conv_props(
    spacing: Sequence[float],
    patch_size: Sequence[float],
    min_feature_map_size: int = MIN_FEATURE_MAP_EDGE,
    max_numpool: int = MAX_NUM_POOL,
) -> PoolingPlan:
    """Pool every axis that is big enough and not much coarser than the finest one.

    An axis is pooled while its feature map is at least ``2 * min_feature_map_size`` and its
    current spacing is within 2x of the finest current spacing among poolable axes; if only one
    axis is poolable it needs ``3 * min_feature_map_size``. Kernels are 1 along an axis until its
    spacing comes within 2x of the finest, then 3. The bottleneck kernel is always 3. The patch
    is padded up to a multiple of ``2 ** num_pool_per_axis``.
    """
    dim = len(spacing)
    current_spacing = [float(s) for s in spacing]
    current_size = [float(s) for s in patch_size]  # may be fractional (a median), as in nnU-Net
    strides = [[1] * dim]
    kernels: list[list[int]] = []
    num_pool = [0] * dim
    kernel = [1] * dim
    while True:
        valid = [i for i in range(dim) if current_size[i] >= 2 * min_feature_map_size]
        if not valid:
            break
        finest = min(current_spacing[i] for i in valid)
        valid = [i for i in valid if current_spacing[i] / finest < 2 and num_pool[i] < max_numpool]
        if not valid or (len(valid) == 1 and current_size[valid[0]] < 3 * min_feature_map_size):
            break
        for d in range(dim):
            if kernel[d] != 3 and current_spacing[d] / min(current_spacing) < 2:
                kernel[d] = 3
        stride = [1] * dim
        for v in valid:
            stride[v] = 2
            num_pool[v] += 1
            current_spacing[v] *= 2
            current_size[v] = float(np.ceil(current_size[v] / 2))
        strides.append(stride)
        kernels.append(list(kernel))
    kernels.append([3] * dim)
    divisibility = [2**n for n in num_pool]
    padded = [int(np.ceil(p / d) * d) for p, d in zip(patch_size, divisibility)]
    return PoolingPlan(num_pool, strides, kernels, padded, divisibility)


def features_per_stage(num_stages: int, base_features: int, max_features: int) -> list[int]:
    """nnU-Net's ``min(max_features, base * 2**i)`` per stage."""
    return [min(max_features, base_features * 2**i) for i in range(num_stages)]


def make_topology(pooling: PoolingPlan, base_features: int, max_features: int) -> NetworkTopology:
    """A :class:`NetworkTopology` (2 convs per stage, as nnU-Net's plain U-Net) from a pooling plan."""
    return NetworkTopology(
        features_per_stage=features_per_stage(len(pooling.strides), base_features, max_features),
        kernel_sizes=[list(k) for k in pooling.kernel_sizes],
        strides=[list(s) for s in pooling.strides],
    )


def estimate_feature_map_size(
    patch_size: Sequence[int],
    topology: NetworkTopology,
    num_classes: int,
    deep_supervision: bool = True,
) -> int:
    """Sum of the element counts of every conv, transposed-conv and segmentation-head output.

    This is ``PlainConvUNet.compute_conv_feature_map_size`` for one sample: nnU-Net's proxy for
    both GPU memory and (here) CPU compute.
    """
    sizes = []
    size = [int(p) for p in patch_size]
    for stride in topology.strides:
        size = [s // st for s, st in zip(size, stride)]
        sizes.append(int(np.prod(size, dtype=np.int64)))
    features = topology.features_per_stage
    total = sum(topology.n_conv_per_stage * f * s for f, s in zip(features, sizes))
    for level in range(topology.num_stages - 2, -1, -1):
        total += features[level] * sizes[level]  # transposed conv
        total += topology.n_conv_per_stage_decoder * features[level] * sizes[level]
        if deep_supervision or level == 0:
            total += num_classes * sizes[level]
    return int(total)
