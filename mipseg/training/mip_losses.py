"""Projection losses of the MIP trainer: supervise the 3D network through the annotated MIP.

The published method (``reference/seed-methods.md`` A.3, A.4) adds two 2D soft-Dice terms to
the partial cross-entropy on the pseudo-labels:

* ``L_3D-MIP``: the 3D softmax gathered at the depth (argmax) index of every ray vs the 2D
  annotation ``Y_MIP``;
* ``L_MIP``: the 2D branch's output vs ``Y_MIP``.

Soft Dice per class (background and foreground), ``1 - (2 sum(p t) + eps) / (sum(p^2) + sum(t^2) + eps)``
with ``eps = 1e-5``, summed over the two classes. Here the sums run over the supervised rays of
the whole batch (patches make some rays unsupervised, see :func:`ray_targets`).

Patches cut rays. What the loader carries per MIP axis (``batch["mip"]``, two channels per axis,
see :mod:`mipseg.training.mip_data`) are the annotation broadcast along its rays and a marker at
each ray's brightest voxel of the WHOLE volume (a depth step along the ray, 1 from that voxel on).
In a patch:

* a background ray (annotation 0) is background on every voxel: always supervised;
* a vessel ray is supervised only where its marker (its brightest voxel) lies inside the patch;
* columns outside the image (ignore value) are not supervised.

``projection="gather"`` (published) samples the foreground probability at the marker's depth
(background rays without a marker in the patch: at the patch's own brightest voxel);
``projection="max"`` takes the maximum foreground probability along the column instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from mipseg.training.losses import LossFunction

DICE_EPS = 1e-5
PROJECTIONS = ("gather", "max")


@dataclass(frozen=True)
class MipSettings:
    """Switches of the MIP trainer (stored in its checkpoints).

    Attributes
    ----------
    weight_3d_mip
        Weight of ``L_3D-MIP`` (0 = off); published 1.
    weight_mip
        Weight of ``L_MIP`` (the 2D branch's loss); published 1. Ignored without a branch.
    branch
        Build the 2D MIP branch (fused with the 3D features).
    projection
        ``gather`` (3D prediction at the depth index, published) or ``max`` (max along the ray).
    """

    weight_3d_mip: float = 1.0
    weight_mip: float = 1.0
    branch: bool = True
    projection: str = "gather"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def problems(self) -> list[str]:
        """Out-of-range settings, one line each (empty when valid)."""
        problems = []
        if self.weight_3d_mip < 0:
            problems.append(f"--mip-3d-weight must be >= 0, got {self.weight_3d_mip}")
        if self.weight_mip < 0:
            problems.append(f"--mip-2d-weight must be >= 0, got {self.weight_mip}")
        if self.projection not in PROJECTIONS:
            problems.append(
                f"--mip-projection must be one of {', '.join(PROJECTIONS)}, got {self.projection!r}"
            )
        return problems


def gather_at_depth(volume: torch.Tensor, depth: torch.Tensor, axis: int) -> torch.Tensor:
    """Sample every ray of ``volume`` at its depth index (the published 2D-3D retrieval).

    Parameters
    ----------
    volume
        ``(B, C, z, y, x)``.
    depth
        ``(B, h, w)`` integer indices along ``axis``; ``(h, w)`` are the two other spatial axes
        in (z, y, x) order.
    axis
        Spatial axis of the rays (0 = z).

    Returns
    -------
    ``(B, C, h, w)`` with ``out[b, c, i, j] = volume[b, c]`` at index ``depth[b, i, j]`` along
    ``axis`` and ``(i, j)`` in the other two axes.
    """
    rays_first = volume.movedim(2 + axis, 2)
    batch, channels, _, rows, cols = rays_first.shape
    index = depth.long().reshape(batch, 1, 1, rows, cols).expand(batch, channels, 1, rows, cols)
    return rays_first.gather(2, index).squeeze(2)


def ray_targets(
    annotation: torch.Tensor, marker: torch.Tensor, axis: int, ignore_label: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """2D target, supervision mask and marker depth of one MIP axis within a patch.

    Parameters
    ----------
    annotation
        ``(B, z, y, x)``: the ray's annotation (0 background, 1 vessel) on every voxel of the
        ray, ``ignore_label`` outside the image.
    marker
        ``(B, z, y, x)``: the depth step, 1 from the ray's brightest voxel of the whole volume on
        (in the ray's original direction; mirroring reverses it), 0 before, or the ignore value.
    axis
        Spatial axis of the rays.

    Returns
    -------
    target
        ``(B, h, w)`` float: 1 on vessel rays, 0 elsewhere.
    supervised
        ``(B, h, w)`` bool: background rays, and vessel rays whose marker is in the patch.
    depth
        ``(B, h, w)`` long: index of the brightest voxel along ``axis`` (0 where there is none).
    has_marker
        ``(B, h, w)`` bool: the step switches inside the patch (both 0 and 1 occur).
    """
    labelled = annotation != ignore_label
    # every labelled voxel of a column carries the same value; -1 = no labelled voxel
    value = torch.where(labelled, annotation.long(), torch.full_like(annotation, -1, dtype=torch.long))
    column = value.amax(dim=1 + axis)
    dim = 1 + axis
    after = marker == 1
    before = marker == 0
    has_marker = after.any(dim=dim) & before.any(dim=dim)
    length = marker.shape[dim]
    first_after = after.to(torch.uint8).argmax(dim=dim)
    last_after = length - 1 - after.flip(dim).to(torch.uint8).argmax(dim=dim)
    # a ray mirrored along the axis has its 1s first: its brightest voxel is the last 1
    mirrored = first_after < before.to(torch.uint8).argmax(dim=dim)
    depth = torch.where(mirrored, last_after, first_after)
    vessel = column > 0
    supervised = (column == 0) | (vessel & has_marker)
    return vessel.float(), supervised, depth, has_marker


def soft_dice_2d(foreground: torch.Tensor, target: torch.Tensor, supervised: torch.Tensor) -> torch.Tensor:
    """Published two-class soft Dice loss over the supervised pixels of a batch.

    Parameters
    ----------
    foreground
        ``(B, h, w)`` foreground probability (background = ``1 - foreground``).
    target
        ``(B, h, w)`` in {0, 1}.
    supervised
        ``(B, h, w)`` bool; other pixels contribute nothing.

    Returns
    -------
    Scalar in ``[0, 2]``; 0 (connected to the graph) when nothing is supervised.
    """
    if not bool(supervised.any()):
        return foreground.sum() * 0.0
    mask = supervised.float()
    total = foreground.new_zeros(())
    for p, t in ((foreground, target), (1 - foreground, 1 - target)):
        p, t = p * mask, t * mask
        total = total + 1 - (2 * (p * t).sum() + DICE_EPS) / ((p * p).sum() + (t * t).sum() + DICE_EPS)
    return total


def project_foreground(
    foreground: torch.Tensor,
    depth: torch.Tensor,
    has_marker: torch.Tensor,
    image: torch.Tensor,
    axis: int,
    projection: str,
) -> torch.Tensor:
    """Foreground probability of every ray of a patch, ``(B, h, w)``.

    Parameters
    ----------
    foreground
        ``(B, z, y, x)`` 3D foreground probability.
    depth, has_marker
        From :func:`ray_targets`.
    image
        ``(B, z, y, x)`` channel 0 of the (augmented) patch: rays without a marker are sampled at
        their brightest voxel in the patch.
    projection
        ``gather`` or ``max``.
    """
    if projection == "max":
        return foreground.amax(dim=1 + axis)
    in_patch_depth = image.argmax(dim=1 + axis)
    chosen = torch.where(has_marker, depth, in_patch_depth)
    return gather_at_depth(foreground[:, None], chosen, axis)[:, 0]


class MipProjectionLoss:
    """Plain partial loss on the label set plus ``w_3d L_3D-MIP + w_2d L_MIP`` per MIP axis.

    ``outputs`` is what :class:`mipseg.training.mip_branch.MipTrainingNetwork` returns: the 3D
    logits list (highest resolution first) with ``branch_logits`` ``{axis: (B, K, h, w)}``;
    ``batch["mip"]`` holds two channels per axis of ``axes`` (annotation, marker). The terms are
    averaged over the axes.
    """

    def __init__(
        self, base: LossFunction, axes: tuple[int, ...], settings: MipSettings, ignore_label: int
    ) -> None:
        self.base = base
        self.axes = tuple(int(a) for a in axes)
        self.settings = settings
        self.ignore_label = int(ignore_label)

    def __call__(self, outputs: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        logits = list(outputs) if isinstance(outputs, list | tuple) else [outputs]
        loss, parts = self.base(logits, batch)
        if "mip" not in batch or not self.axes:
            return loss, parts
        channels = batch["mip"]
        foreground = 1 - torch.softmax(logits[0].float(), dim=1)[:, 0]
        branch_logits = getattr(outputs, "branch_logits", {}) or {}
        settings = self.settings
        loss_3d, loss_2d = [], []
        for j, axis in enumerate(self.axes):
            target, supervised, depth, has_marker = ray_targets(
                channels[:, 2 * j], channels[:, 2 * j + 1], axis, self.ignore_label
            )
            if settings.weight_3d_mip > 0:
                projected = project_foreground(
                    foreground, depth, has_marker, batch["data"][:, 0], axis, settings.projection
                )
                loss_3d.append(soft_dice_2d(projected, target, supervised))
            if settings.weight_mip > 0 and axis in branch_logits:
                branch_fg = 1 - torch.softmax(branch_logits[axis].float(), dim=1)[:, 0]
                loss_2d.append(soft_dice_2d(branch_fg, target, supervised))
        if loss_3d:
            term = torch.stack(loss_3d).mean()
            loss = loss + settings.weight_3d_mip * term
            parts["l_3d_mip"] = float(term.detach())
        if loss_2d:
            term = torch.stack(loss_2d).mean()
            loss = loss + settings.weight_mip * term
            parts["l_mip"] = float(term.detach())
        elif branch_logits:
            # keep the branch in the graph (DDP needs every parameter used) with zero gradient
            loss = loss + 0.0 * sum(t.sum() for t in branch_logits.values())
        return loss, parts
