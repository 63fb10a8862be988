"""The plans: the typed contract between planning, training and prediction.

``preprocessed/DatasetXXX/plans.json`` is :meth:`Plans.to_json` of this dataclass; every later
stage reads it back with :func:`load_plans` and never re-derives what is planned here.
Spatial lists are in numpy ``(z, y, x)`` order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mipseg import io
from mipseg.errors import InputError


@dataclass
class NetworkTopology:
    """A plain 3D U-Net as nnU-Net plans it.

    Attributes
    ----------
    features_per_stage
        Output channels of each encoder stage, e.g. ``[32, 64, 128, 256, 320]``.
    kernel_sizes
        Per stage, the conv kernel per axis (3, or 1 along an axis too coarse to convolve).
    strides
        Per stage, the downsampling stride per axis of its first conv; stage 0 is ``[1, 1, 1]``.
    """

    features_per_stage: list[int]
    kernel_sizes: list[list[int]]
    strides: list[list[int]]
    n_conv_per_stage: int = 2
    n_conv_per_stage_decoder: int = 2

    @property
    def num_stages(self) -> int:
        return len(self.features_per_stage)

    @property
    def divisibility(self) -> list[int]:
        """Patch sizes must be multiples of this per axis (product of all strides)."""
        result = [1, 1, 1]
        for stride in self.strides:
            result = [r * s for r, s in zip(result, stride)]
        return result


@dataclass
class Plans:
    """Everything the planner decided for one dataset (3D full-resolution configuration).

    Attributes
    ----------
    spacing
        Target spacing ``(z, y, x)`` that preprocessing resamples to.
    patch_size, batch_size
        Training patch ``(z, y, x)`` and batch, chosen under ``budget``.
    normalization
        Per channel ``"CT"`` (clip to foreground percentiles, z-score with dataset stats) or
        ``"ZScore"`` (per image).
    intensity_properties
        Per channel (key ``"0"``...) the dataset foreground statistics from the fingerprint
        (``mean, median, std, min, max, percentile_00_5, percentile_99_5``).
    resampling
        Interpolation orders: ``data_order``, ``data_order_z``, ``seg_order``, ``seg_order_z``,
        ``probabilities_order``, and ``separate_z_anisotropy_threshold``.
    budget
        What drove patch and batch: ``{"kind": "gpu"|"cpu", ...}`` with the reference numbers used.
    mip_axes
        Projection axes (mip mode); empty otherwise.
    """

    dataset_name: str
    spacing: list[float]
    original_median_spacing: list[float]
    median_shape: list[int]
    patch_size: list[int]
    batch_size: int
    network: NetworkTopology
    normalization: list[str]
    use_mask_for_norm: list[bool]
    intensity_properties: dict[str, dict[str, float]]
    resampling: dict[str, Any]
    labels: dict[str, int]
    ignore_label: int
    annotation: str | None = None
    mip_axes: list[int] = field(default_factory=list)
    budget: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len([name for name in self.labels if name != "ignore"])

    @property
    def num_channels(self) -> int:
        return len(self.normalization)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plans:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["network"] = NetworkTopology(**data["network"])
        return cls(**values)

    def save(self, path: str | Path) -> Path:
        return io.write_json(self.to_json(), path)


def load_plans(path: str | Path) -> Plans:
    """Read plans.json, with a clear error if it is missing (run mipseg_plan first) or malformed."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: plans not found; run mipseg_plan for this dataset first")
    data = io.read_json(path)
    try:
        return Plans.from_json(data)
    except (KeyError, TypeError) as error:
        raise InputError(f"{path}: malformed plans ({error}); re-run mipseg_plan") from None
