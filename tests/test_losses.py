"""Partial-label losses: ignored voxels contribute nothing, Dice/CE values, DS weights, seed term."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _training_helpers import tiny_plans

from mipseg.training.losses import (
    PartialDiceCELoss,
    deep_supervision_weights,
    partial_cross_entropy,
    partial_soft_dice,
    seed_cross_entropy,
    skeleton_recall,
    tubed_skeleton,
)
from mipseg.training.network import build_network

IGNORE = 2


def _target(shape=(2, 1, 8, 8, 8), seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 3, shape, generator=generator)  # 0, 1 or ignore (2)
    return target


def test_ignored_voxels_get_exactly_zero_gradient() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 8, 8, 8, requires_grad=True)
    target = _target()
    seeds = torch.full_like(target, IGNORE)
    seeds[0, 0, 1, 1, 1] = 1
    loss, _ = PartialDiceCELoss(IGNORE, seed_weight=1.0)([logits], {"target": target, "seeds": seeds})
    loss.backward()
    ignored = (target[:, 0] == IGNORE) & (seeds[:, 0] == IGNORE)
    grad_norm = logits.grad.abs().sum(1)
    assert torch.count_nonzero(grad_norm[ignored]) == 0
    assert torch.count_nonzero(grad_norm[~ignored]) == (~ignored).sum()


def test_partial_losses_equal_the_losses_on_the_labelled_subset() -> None:
    torch.manual_seed(1)
    logits = torch.randn(1, 2, 6, 6, 6)
    target = _target((1, 1, 6, 6, 6), seed=1)
    labelled = target[0, 0] != IGNORE
    flat_logits = logits[0].permute(1, 2, 3, 0)[labelled]
    flat_target = target[0, 0][labelled]
    expected_ce = F.cross_entropy(flat_logits, flat_target)
    assert torch.isclose(partial_cross_entropy(logits, target, IGNORE), expected_ce)
    probabilities = torch.softmax(flat_logits, 1)[:, 1]
    reference = (flat_target == 1).float()
    expected_dice = (2 * (probabilities * reference).sum() + 1e-5) / (
        probabilities.sum() + reference.sum() + 1e-5
    )
    assert torch.isclose(partial_soft_dice(logits, target, IGNORE), -expected_dice)


def test_everything_ignored_gives_zero_loss_and_no_nan() -> None:
    logits = torch.randn(1, 2, 4, 4, 4, requires_grad=True)
    target = torch.full((1, 1, 4, 4, 4), IGNORE)
    loss, parts = PartialDiceCELoss(IGNORE)([logits], {"target": target})
    loss.backward()
    assert parts["ce"] == 0.0 and np.isfinite(float(loss.detach()))
    assert torch.count_nonzero(logits.grad) == 0


def test_deep_supervision_weights_match_nnunet() -> None:
    assert np.allclose(deep_supervision_weights(5), [0.5333, 0.2667, 0.1333, 0.0667, 0.0], atol=1e-4)
    assert deep_supervision_weights(1) == [1.0]


def test_seed_term_is_mean_cross_entropy_over_seeds_only() -> None:
    logits = torch.zeros(1, 2, 4, 4, 4)
    logits[0, 1, 0, 0, 0] = 3.0
    seeds = torch.full((1, 1, 4, 4, 4), IGNORE)
    seeds[0, 0, 0, 0, 0] = 1
    seeds[0, 0, 3, 3, 3] = 1
    expected = (-torch.log_softmax(torch.tensor([0.0, 3.0]), 0)[1] + np.log(2)) / 2
    assert torch.isclose(seed_cross_entropy(logits, seeds, IGNORE), expected)


def test_loss_decreases_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    plans = tiny_plans(features=(4, 8), patch_size=(8, 16, 16))
    network = build_network(plans, num_input_channels=1, num_classes=2)
    target = torch.full((2, 1, 8, 16, 16), IGNORE)
    target[:, :, :, 6:10, 6:10] = 1
    target[:, :, :, :3] = 0
    image = (target == 1).float() * 2 + 0.3 * torch.randn(2, 1, 8, 16, 16)
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    loss_fn = PartialDiceCELoss(IGNORE)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss, _ = loss_fn(network(image), {"target": target})
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.3


def test_pseudo_dice_counts_only_labelled_voxels_and_poly_lr() -> None:
    from mipseg.metrics import dice_from_counts
    from mipseg.training.loop import confusion_counts, poly_lr

    logits = torch.zeros(1, 2, 1, 1, 4)
    logits[0, 1, 0, 0, :2] = 1.0  # predicts vessel on voxels 0 and 1
    target = torch.tensor([1, IGNORE, 0, 1]).view(1, 1, 1, 1, 4)
    counts = confusion_counts(logits, target, num_classes=2, ignore_label=IGNORE)
    assert counts.tolist() == [[1, 0, 1]]  # voxel 1 is ignored, so its vessel prediction is no FP
    assert dice_from_counts(*counts.T).tolist() == [2 / 3]
    # a class the sample's case left undrawn is not scored there
    undrawn = torch.tensor([[False, True]])
    assert confusion_counts(logits, target, 2, IGNORE, undrawn).tolist() == [[0, 0, 0]]
    assert np.isnan(dice_from_counts(*np.zeros((1, 3), dtype=np.int64).T)[0])
    assert poly_lr(0.01, 0, 100) == 0.01 and poly_lr(0.01, 50, 100) == pytest.approx(0.01 * 0.5**0.9)


def test_skeleton_recall_counts_the_tubed_skeleton_of_each_labelled_vessel() -> None:
    target = torch.full((1, 1, 12, 16, 16), 2, dtype=torch.long)  # 2 = ignore
    target[0, 0, :, :, :3] = 0
    target[0, 0, 3:9, 5:11, 8] = 1  # a one-voxel-thick plate: its skeleton is a line in it
    target[0, 0, 6, 8, 4:14] = 1  # a thin vessel crossing it
    skeleton = tubed_skeleton(target, ignore_label=2)
    assert skeleton.shape == (1, 2, 12, 16, 16) and skeleton[:, 0].sum() == 0
    assert skeleton[0, 1, 6, 8, 4:14].all()  # the thin vessel's centreline is in the skeleton
    assert not skeleton[0, 1][target[0, 0] == 0].any()  # nothing on labelled background
    logits = torch.zeros(1, 2, 12, 16, 16)
    logits[:, 1] = 20.0  # vessel everywhere: full recall
    assert float(skeleton_recall(logits, target, 2)) < 1e-6
    logits[:, 1] = -20.0  # background everywhere: no recall
    assert float(skeleton_recall(logits, target, 2)) > 1 - 1e-6
    logits = torch.zeros(1, 2, 12, 16, 16, requires_grad=True)
    term = skeleton_recall(logits, target, 2)
    term.backward()
    assert abs(float(term.detach()) - 0.5) < 1e-6 and logits.grad[0, 1, 6, 8, 6] < 0
    assert float(logits.grad[0, 1, 0, 0, 0]) == 0.0  # off the skeleton: no gradient
    empty = torch.full((1, 1, 4, 4, 4), 2, dtype=torch.long)
    assert float(skeleton_recall(torch.zeros(1, 2, 4, 4, 4), empty, 2)) == 0.0


def test_skeleton_weight_adds_the_term_to_the_loss() -> None:
    torch.manual_seed(0)
    target = torch.zeros((2, 1, 8, 16, 16), dtype=torch.long)
    target[:, :, 4, 8, 2:14] = 1
    logits = torch.randn(2, 2, 8, 16, 16)
    plain, parts = PartialDiceCELoss(ignore_label=2)([logits], {"target": target})
    both, parts_both = PartialDiceCELoss(ignore_label=2, skeleton_weight=2.0)([logits], {"target": target})
    assert "skeleton" not in parts and "skeleton" in parts_both
    assert float(both - plain) == pytest.approx(2.0 * parts_both["skeleton"], rel=1e-5)


def test_marginal_loss_does_not_teach_an_undrawn_class_as_background() -> None:
    """A case whose drawing left class 2 out: its background may be class 2 (marginal loss)."""
    background_is_class_2 = torch.zeros(1, 3, 4, 4, 4)
    background_is_class_2[:, 2] = 6.0  # confident "class 2" where the label set says background
    target = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    target[0, 0, 0] = 1
    background_is_class_2[0, 1, 0] = 14.0
    undrawn = torch.tensor([[False, False, True]])
    as_drawn = partial_cross_entropy(background_is_class_2, target, ignore_label=3)
    marginal = partial_cross_entropy(background_is_class_2, target, ignore_label=3, undrawn=undrawn)
    assert float(as_drawn) > 4.0 and float(marginal) < 0.01
    # its Dice term is left out (nothing says where class 2 is), class 1's stays
    dice = partial_soft_dice(background_is_class_2, target, 3, undrawn=undrawn)
    class_1 = torch.softmax(background_is_class_2, 1)[:, 1]
    reference = (target[:, 0] == 1).float()
    class_1_dice = (2 * (class_1 * reference).sum() + 1e-5) / (class_1.sum() + reference.sum() + 1e-5)
    assert torch.isclose(dice, -class_1_dice)
    assert float(partial_soft_dice(background_is_class_2, target, 3)) > float(dice) + 0.4


def test_marginal_loss_is_the_log_of_background_plus_undrawn_probability() -> None:
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 4, 5, 6, requires_grad=True)
    target = torch.randint(0, 3, (2, 1, 4, 5, 6))
    target[:, :, 0] = 9  # ignored
    undrawn = torch.tensor([[False, False, False], [False, True, False]])
    target[1][target[1] == 1] = 0  # sample 1 has no drawn class 1
    probabilities = torch.softmax(logits.detach(), 1)
    own = probabilities.gather(1, torch.where(target == 9, 0, target))[:, 0]
    merged = probabilities[:, 0] + probabilities[:, 1] * torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)
    likelihood = torch.where(target[:, 0] == 0, merged, own)
    labelled = target[:, 0] != 9
    expected = -torch.log(likelihood[labelled]).mean()
    assert torch.isclose(partial_cross_entropy(logits, target, 9, undrawn), expected, atol=1e-5)
    # nothing undrawn: exactly the plain partial cross-entropy
    nothing = torch.zeros_like(undrawn)
    assert torch.equal(
        partial_cross_entropy(logits, target, 9, nothing), partial_cross_entropy(logits, target, 9)
    )
    assert torch.equal(
        partial_soft_dice(logits, target, 9, undrawn=nothing), partial_soft_dice(logits, target, 9)
    )


def test_undrawn_classes_background_rule_ignores_the_batch_field() -> None:
    torch.manual_seed(4)
    logits = torch.randn(1, 3, 4, 4, 4)
    target = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    target[0, 0, :2] = 1
    batch = {"target": target, "undrawn": torch.tensor([[False, False, True]])}
    marginal, _ = PartialDiceCELoss(9)([logits], batch)
    as_drawn, _ = PartialDiceCELoss(9, undrawn_classes="background")([logits], batch)
    plain, _ = PartialDiceCELoss(9)([logits], {"target": target})
    assert torch.equal(as_drawn, plain) and not torch.isclose(marginal, plain)
