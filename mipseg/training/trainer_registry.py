"""The trainers ``--trainer`` chooses from: what network and loss each uses (the loop is shared).

``plain`` is the 3D U-Net on a (partial) label set; ``mip`` adds the 2D MIP branch and the
projection losses; ``auto`` picks ``mip`` for MIP-annotated datasets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from mipseg.dataset import DatasetSpec
from mipseg.planning.plans import Plans
from mipseg.training.loop import TrainingConfig
from mipseg.training.losses import LossFunction, PartialDiceCELoss
from mipseg.training.mip_branch import build_mip_network
from mipseg.training.mip_losses import MipProjectionLoss, MipSettings
from mipseg.training.network import build_network


@dataclass(frozen=True)
class TrainerComponents:
    """What distinguishes one trainer: its network and its loss (the loop is shared).

    ``build_network(plans, num_input_channels, num_classes, deep_supervision, dropout)`` and
    ``build_loss(plans, spec, config) -> (outputs, batch) -> (loss, parts)``.
    """

    name: str
    build_network: Callable[..., nn.Module]
    build_loss: Callable[[Plans, DatasetSpec, TrainingConfig], LossFunction]


def _plain_loss(plans: Plans, spec: DatasetSpec, config: TrainingConfig) -> LossFunction:
    return PartialDiceCELoss(
        ignore_label=spec.ignore_label,
        seed_weight=config.seed_weight,
        skeleton_weight=config.skeleton_weight,
        undrawn_classes=config.undrawn_classes,
    )


TRAINERS: dict[str, TrainerComponents] = {
    "plain": TrainerComponents(
        "plain",
        lambda plans, c, k, ds, p: build_network(
            plans, num_input_channels=c, num_classes=k, deep_supervision=ds, dropout=p
        ),
        _plain_loss,
    )
}


def register_trainer(components: TrainerComponents) -> None:
    """Make a trainer available to ``--trainer NAME``."""
    TRAINERS[components.name] = components


def mip_axes_of(plans: Plans, spec: DatasetSpec) -> tuple[int, ...]:
    """The MIP axes the mip trainer supervises: the plans', else dataset.json's."""
    return tuple(int(a) for a in (plans.mip_axes or spec.mip_axes))


def mip_trainer(settings: MipSettings, axes: tuple[int, ...] | None = None) -> TrainerComponents:
    """The ``mip`` trainer: 3D U-Net (+ 2D branch per MIP axis) and the projection losses.

    ``axes``: the MIP axes (default: the plans').
    """

    def network(plans, c, k, ds, p):
        return build_mip_network(
            plans,
            num_input_channels=c,
            num_classes=k,
            deep_supervision=ds,
            dropout=p,
            axes=tuple(plans.mip_axes) if axes is None else axes,
            branch=settings.branch,
        )

    def loss(plans: Plans, spec: DatasetSpec, config: TrainingConfig) -> LossFunction:
        base = _plain_loss(plans, spec, config)
        used = mip_axes_of(plans, spec) if axes is None else axes
        return MipProjectionLoss(base, used, settings, spec.ignore_label)

    return TrainerComponents("mip", network, loss)


register_trainer(mip_trainer(MipSettings()))


def resolve_trainer_name(dataset: str | int, trainer: str) -> str:
    """``auto`` -> ``mip`` for MIP-annotated datasets, else ``plain``.

    MIP-annotated: dataset.json's ``annotation`` is ``mip`` and every training case has its
    annotation PNG on every ``mip_axes`` axis (the projection losses need them).
    """
    if trainer != "auto":
        return trainer
    from mipseg.dataset import load_dataset

    loaded = load_dataset(dataset, read_voxels=False)
    axes = loaded.spec.mip_axes
    annotated = all(all(a in case.annotations for a in axes) for case in loaded.cases)
    return "mip" if loaded.spec.annotation == "mip" and loaded.cases and annotated else "plain"
