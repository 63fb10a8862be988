"""Losses for label sets that leave voxels unlabelled (the ignore value contributes nothing).

A training loss is any callable ``(outputs, batch) -> (loss, parts)``: ``outputs`` is what the
network returned (a list of logits, highest resolution first, with deep supervision), ``batch``
the dict of tensors from the loader (``"target"`` ``(B, 1, z, y, x)`` int64 holding labels or the
ignore value; optional ``"seeds"`` of the same shape), ``loss`` a scalar tensor and ``parts`` a
dict of floats for the log. :class:`PartialDiceCELoss` is the plain trainer's; the MIP trainer
(issue 6) plugs in its own.

Dice follows nnU-Net's ``MemoryEfficientSoftDiceLoss`` (per sample, background excluded,
smooth 1e-5, returned as ``-dice``); cross-entropy uses ``ignore_index``; deep-supervision
weights are nnU-Net's ``1/2**i`` with the lowest resolution weighted 0, normalised to sum 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

LossFunction = Callable[[object, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]
# How a sample's background is read where its case left classes undrawn (--undrawn-classes).
UNDRAWN_CLASS_RULES = ("marginal", "background")


def deep_supervision_weights(num_outputs: int) -> list[float]:
    """nnU-Net's weights: ``1/2**i``, the lowest resolution set to 0, normalised to sum 1.

    >>> [round(w, 3) for w in deep_supervision_weights(5)]
    [0.533, 0.267, 0.133, 0.067, 0.0]
    """
    weights = np.array([1 / (2**i) for i in range(num_outputs)])
    if num_outputs > 1:
        weights[-1] = 0
    return list(weights / weights.sum())


def partial_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_label: int,
    undrawn: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy over labelled voxels, marginal over undrawn classes.

    Parameters
    ----------
    logits
        ``(B, K, z, y, x)``.
    target
        ``(B, 1, z, y, x)`` integer labels in ``0..K-1`` or ``ignore_label``.
    undrawn
        Optional ``(B, K)`` bool: class ``k`` was not drawn in sample ``b``, so that sample's
        background may hold it. Background voxels of such a sample are scored by the log of the
        summed probability of background and its undrawn classes (the marginal loss of Shi et
        al., MedIA 2021), so the network is not taught that an undrawn organ is background.

    Returns
    -------
    Scalar; exactly 0 (still connected to the graph) when no voxel is labelled.
    """
    labels = target[:, 0].long()
    labelled = labels != ignore_label
    if not bool(labelled.any()):
        return logits.sum() * 0.0
    if undrawn is None or not bool(undrawn.any()):
        return F.cross_entropy(logits.float(), labels, ignore_index=ignore_label)
    log_probabilities = torch.log_softmax(logits.float(), dim=1)
    merged = _merged_background(undrawn, log_probabilities.ndim)
    background = torch.logsumexp(log_probabilities.masked_fill(~merged, float("-inf")), dim=1)
    safe_labels = torch.where(labelled, labels, 0).unsqueeze(1)
    own = log_probabilities.gather(1, safe_labels)[:, 0]
    log_likelihood = torch.where(labels == 0, background, own)
    return -(log_likelihood * labelled).sum() / labelled.sum()


def _merged_background(undrawn: torch.Tensor, ndim: int) -> torch.Tensor:
    """``(B, K, 1, ...)`` bool: the classes a background voxel of each sample may be."""
    merged = undrawn.bool().clone()
    merged[:, 0] = True
    return merged.reshape(*merged.shape, *([1] * (ndim - 2)))


def partial_soft_dice(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_label: int,
    *,
    batch_dice: bool = False,
    do_bg: bool = False,
    smooth: float = 1e-5,
    undrawn: torch.Tensor | None = None,
) -> torch.Tensor:
    """Negative soft Dice of the softmax, counted over labelled voxels only.

    Parameters
    ----------
    logits
        ``(B, K, z, y, x)``.
    target
        ``(B, 1, z, y, x)``; voxels equal to ``ignore_label`` are masked out of the
        intersection, the predicted sum and the reference sum.
    batch_dice
        Sum over the batch before dividing (nnU-Net's ``batch_dice``); else per sample.
    do_bg
        Include the background class.
    undrawn
        Optional ``(B, K)`` bool, as in :func:`partial_cross_entropy`: an undrawn class has no
        Dice term in that sample (nothing there says where it is), and the sample's background
        probability is that of background or any of its undrawn classes.

    Returns
    -------
    ``-mean(dice)`` over classes (and samples), a scalar in ``[-1, 0]``.
    """
    probabilities = torch.softmax(logits.float(), dim=1)
    labels = target[:, 0].long()
    mask = (labels != ignore_label).unsqueeze(1).float()
    with torch.no_grad():
        one_hot = torch.zeros_like(probabilities)
        one_hot.scatter_(1, torch.where(labels == ignore_label, 0, labels).unsqueeze(1), 1.0)
        one_hot = one_hot * mask
    scored = torch.ones(probabilities.shape[:2], dtype=torch.bool, device=probabilities.device)
    if undrawn is not None and bool(undrawn.any()):
        merged = _merged_background(undrawn, probabilities.ndim)
        background = (probabilities * merged).sum(1, keepdim=True)
        probabilities = torch.cat([background, probabilities[:, 1:]], dim=1)
        scored = ~undrawn.bool()
    if not do_bg:
        probabilities, one_hot, scored = probabilities[:, 1:], one_hot[:, 1:], scored[:, 1:]
    axes = tuple(range(2, probabilities.ndim))
    weight = scored.float()
    intersection = (probabilities * one_hot).sum(axes) * weight
    predicted = (probabilities * mask).sum(axes) * weight
    reference = one_hot.sum(axes) * weight
    if batch_dice:
        intersection, predicted, reference = intersection.sum(0), predicted.sum(0), reference.sum(0)
        weight = (weight.sum(0) > 0).float()
    dice = (2 * intersection + smooth) / torch.clip(reference + predicted + smooth, min=1e-8)
    return -(dice * weight).sum() / torch.clip(weight.sum(), min=1.0)


def partial_dice_ce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_label: int,
    *,
    weight_ce: float = 1.0,
    weight_dice: float = 1.0,
    batch_dice: bool = False,
    undrawn: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """nnU-Net's ``DC_and_CE_loss`` with an ignore label, for one resolution.

    ``undrawn``: optional ``(B, K)`` bool of classes not drawn per sample (:func:`partial_cross_entropy`).

    Returns
    -------
    (total, cross_entropy, negative_dice), all scalars.
    """
    ce = partial_cross_entropy(logits, target, ignore_label, undrawn)
    dice = partial_soft_dice(logits, target, ignore_label, batch_dice=batch_dice, undrawn=undrawn)
    return weight_ce * ce + weight_dice * dice, ce, dice


def seed_cross_entropy(logits: torch.Tensor, seeds: torch.Tensor, ignore_label: int) -> torch.Tensor:
    """The published seed term L_p: mean ``-log p(class)`` over the back-projected seed voxels.

    Guo et al. (TMI 2024) normalise the seed term by ``|S_p|`` separately from the region terms
    so that the few, most certain voxels weigh as much as the large grown region.

    Parameters
    ----------
    logits
        ``(B, K, z, y, x)`` at full resolution.
    seeds
        ``(B, 1, z, y, x)``: the seed's class at seed voxels, ``ignore_label`` elsewhere.
    """
    return partial_cross_entropy(logits, seeds, ignore_label)


def tubed_skeleton(target: torch.Tensor, ignore_label: int) -> torch.Tensor:
    """Per class, the skeleton of its voxels dilated by one voxel (6-neighbourhood), as a float mask.

    The "tubed skeleton" of Kirchhoff et al., "Skeleton Recall Loss for Connectivity Conserving
    and Resource Efficient Segmentation of Thin Tubular Structures" (ECCV 2024), computed on the
    CPU with :func:`skimage.morphology.skeletonize` (milliseconds per patch).

    Parameters
    ----------
    target
        ``(B, 1, z, y, x)`` int64: class values, ``ignore_label`` where unlabelled.
    ignore_label
        Never a class here.

    Returns
    -------
    torch.Tensor, shape ``(B, K, z, y, x)`` float32 with ``K = max class + 1``; channel 0
    (background) is all zero.
    """
    from scipy import ndimage
    from skimage.morphology import skeletonize

    labels = target[:, 0].detach().cpu().numpy()
    classes = [int(c) for c in np.unique(labels) if c not in (0, ignore_label)]
    count = max(classes, default=0) + 1
    out = np.zeros((labels.shape[0], count, *labels.shape[1:]), dtype=np.float32)
    cross = ndimage.generate_binary_structure(labels.ndim - 1, 1)
    for b in range(labels.shape[0]):
        for c in classes:
            skeleton = skeletonize(labels[b] == c)
            if skeleton.any():
                out[b, c] = ndimage.binary_dilation(skeleton, structure=cross)
    return torch.from_numpy(out).to(target.device)


def skeleton_recall(logits: torch.Tensor, target: torch.Tensor, ignore_label: int) -> torch.Tensor:
    """``1 -`` the soft recall of the target's tubed skeleton (:func:`tubed_skeleton`).

    Every skeleton voxel counts once, however thick its vessel, so thin vessels weigh as much
    per unit length as thick ones; unlabelled voxels hold no skeleton. Summed over the batch and
    the foreground classes; 0 when the target holds no foreground.

    Parameters
    ----------
    logits
        ``(B, K, z, y, x)`` at the target's resolution.
    target
        ``(B, 1, z, y, x)`` int64 with ``ignore_label`` where unlabelled.
    """
    skeleton = tubed_skeleton(target, ignore_label)
    total = skeleton[:, 1:].sum()
    if float(total) == 0.0:
        return logits.sum() * 0.0
    classes = skeleton.shape[1]
    probabilities = torch.softmax(logits.float(), dim=1)[:, 1:classes]
    return 1.0 - (probabilities * skeleton[:, 1:]).sum() / total


def _resize_nearest(target: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour downsampling of a label map (nnU-Net's order-0 DS targets)."""
    if tuple(target.shape[2:]) == tuple(shape):
        return target
    return F.interpolate(target.float(), size=tuple(shape), mode="nearest").long()


@dataclass
class PartialDiceCELoss:
    """Deep-supervised Dice + CE on labelled voxels, plus the weighted seed term.

    Callable as ``loss(outputs, batch) -> (loss, parts)`` (see the module docstring).

    Attributes
    ----------
    ignore_label
        Value marking unlabelled voxels in ``batch["target"]`` and ``batch["seeds"]``.
    seed_weight
        Weight of :func:`seed_cross_entropy` at full resolution; 0 or a batch without
        ``"seeds"`` skips it.
    skeleton_weight
        Weight of :func:`skeleton_recall` at full resolution; 0 (default) skips it.
    batch_dice
        nnU-Net's ``batch_dice`` (False for 3d_fullres).
    undrawn_classes
        ``"marginal"``: a batch's ``"undrawn"`` ``(B, K)`` bool (classes not drawn in a sample's
        case) makes its background "background or an undrawn class" (:func:`partial_cross_entropy`);
        ``"background"``: the label set's background is taken as drawn.
    """

    ignore_label: int
    seed_weight: float = 1.0
    skeleton_weight: float = 0.0
    batch_dice: bool = False
    undrawn_classes: str = "marginal"

    def __call__(
        self, outputs: torch.Tensor | list[torch.Tensor], batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
        target = batch["target"]
        undrawn = batch.get("undrawn") if self.undrawn_classes == "marginal" else None
        weights = deep_supervision_weights(len(outputs))
        total = outputs[0].new_zeros(())
        parts = {}
        for i, (logits, weight) in enumerate(zip(outputs, weights)):
            if weight == 0:
                # keep the head in the graph with zero gradient: DDP requires every parameter used
                total = total + 0.0 * logits.sum()
                continue
            level_target = _resize_nearest(target, logits.shape[2:])
            level_loss, ce, dice = partial_dice_ce_loss(
                logits, level_target, self.ignore_label, batch_dice=self.batch_dice, undrawn=undrawn
            )
            total = total + weight * level_loss
            if i == 0:
                parts = {"ce": float(ce.detach()), "dice": float(dice.detach())}
        seeds = batch.get("seeds")
        if self.seed_weight > 0 and seeds is not None:
            seed_term = seed_cross_entropy(outputs[0], seeds, self.ignore_label)
            total = total + self.seed_weight * seed_term
            parts["seed"] = float(seed_term.detach())
        if self.skeleton_weight > 0:
            skeleton_term = skeleton_recall(outputs[0], target, self.ignore_label)
            total = total + self.skeleton_weight * skeleton_term
            parts["skeleton"] = float(skeleton_term.detach())
        return total, parts
