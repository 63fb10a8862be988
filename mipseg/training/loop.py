"""The training loop as small functions around one :class:`TrainingState`.

nnU-Net's hyper-parameters (SGD, lr 1e-2, momentum 0.99, Nesterov, weight decay 3e-5, poly
learning rate with exponent 0.9 stepped per epoch, gradient norm clipped at 12, AMP on CUDA)
with the epoch and iteration counts configurable. The state is everything a checkpoint needs
for an exact resume: weights, optimizer, grad scaler, completed epochs, logs, RNG states.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from mipseg.metrics import dice_from_counts
from mipseg.training.losses import UNDRAWN_CLASS_RULES, LossFunction


@dataclass
class TrainingConfig:
    """Settings of one training run (stored in checkpoints).

    ``None`` for ``epochs``/``iters_per_epoch``/``val_iters`` means: nnU-Net's 1000/250/50 on CUDA,
    the CPU-friendly 100/50/10 on CPU (see :func:`resolve_defaults`).
    """

    epochs: int | None = None
    iters_per_epoch: int | None = None
    val_iters: int | None = None
    initial_lr: float = 1e-2
    weight_decay: float = 3e-5
    momentum: float = 0.99
    grad_clip: float = 12.0
    save_every: int = 10
    oversample_foreground: float = 0.33
    num_workers: int | None = None
    seed: int = 0
    dropout: float = 0.0
    seed_weight: float = 1.0
    skeleton_weight: float = 0.0
    undrawn_classes: str = "marginal"
    device: str = "auto"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_config(config: TrainingConfig) -> None:
    """Raise InputError naming every out-of-range setting."""
    from mipseg.errors import InputError

    problems = []
    for key in ("epochs", "iters_per_epoch"):
        value = getattr(config, key)
        if value is not None and value < 1:
            problems.append(f"--{key.replace('_', '-')} must be at least 1, got {value}")
    if config.val_iters is not None and config.val_iters < 0:
        problems.append(f"--val-iters must be at least 0, got {config.val_iters}")
    if not 0.0 <= config.dropout < 1.0:
        problems.append(f"--dropout must be in [0, 1), got {config.dropout}")
    if config.seed_weight < 0:
        problems.append(f"--seed-weight must be >= 0, got {config.seed_weight}")
    if config.skeleton_weight < 0:
        problems.append(f"--skeleton-weight must be >= 0, got {config.skeleton_weight}")
    if config.undrawn_classes not in UNDRAWN_CLASS_RULES:
        rules = ", ".join(UNDRAWN_CLASS_RULES)
        problems.append(f"--undrawn-classes must be one of {rules}, got {config.undrawn_classes!r}")
    if config.initial_lr <= 0:
        problems.append(f"--lr must be positive, got {config.initial_lr}")
    if config.save_every < 1:
        problems.append(f"--save-every must be at least 1, got {config.save_every}")
    if problems:
        raise InputError(problems)


def resolve_defaults(config: TrainingConfig, device: torch.device) -> TrainingConfig:
    """Fill the ``None`` fields for the device the run uses."""
    gpu = device.type == "cuda"
    values = config.to_json()
    defaults = {
        "epochs": 1000 if gpu else 100,
        "iters_per_epoch": 250 if gpu else 50,
        "val_iters": 50 if gpu else 10,
    }
    for key, default in defaults.items():
        if values[key] is None:
            values[key] = default
    if values["num_workers"] is None:
        values["num_workers"] = default_num_workers(device)
    return TrainingConfig(**values)


CUDA_NUM_WORKERS = 12  # nnU-Net's default number of augmentation processes (get_allowed_n_proc_DA)
CPU_NUM_WORKERS = 2


def default_num_workers(device: torch.device, cpu_count: int | None = None) -> int:
    """Augmentation processes when ``--num-workers`` is not given, at most one per CPU.

    On CUDA, 12 as nnU-Net: a GPU trains the full-size plan in 0.08 s per step, and with 2 workers
    the H200 waited for batches (1.40 s/iteration vs 0.27 s with 12, documentation/performance.md).
    On CPU, 2: the network itself takes about a second per step there and shares the cores.
    """
    cpus = cpu_count or torch.multiprocessing.cpu_count()
    return min(CUDA_NUM_WORKERS if device.type == "cuda" else CPU_NUM_WORKERS, cpus)


@dataclass
class TrainingLog:
    """One value per finished epoch (nnU-Net's LocalLogger lists)."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    pseudo_dice: list[list[float]] = field(default_factory=list)
    mean_fg_dice: list[float] = field(default_factory=list)
    ema_fg_dice: list[float] = field(default_factory=list)
    learning_rate: list[float] = field(default_factory=list)
    epoch_time: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, list]:
        return asdict(self)


@dataclass
class TrainingState:
    """Mutable state of a run. ``epoch`` counts completed epochs (the next one to run)."""

    network: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    device: torch.device
    config: TrainingConfig
    epoch: int = 0
    best_ema: float | None = None
    log: TrainingLog = field(default_factory=TrainingLog)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(network: nn.Module, config: TrainingConfig) -> torch.optim.SGD:
    """nnU-Net's SGD: momentum 0.99, Nesterov, weight decay 3e-5."""
    return torch.optim.SGD(
        network.parameters(),
        lr=config.initial_lr,
        weight_decay=config.weight_decay,
        momentum=config.momentum,
        nesterov=True,
    )


def poly_lr(initial_lr: float, epoch: int, max_epochs: int, exponent: float = 0.9) -> float:
    """nnU-Net's PolyLRScheduler: ``lr0 * (1 - epoch / max_epochs) ** 0.9``."""
    return initial_lr * (1 - epoch / max_epochs) ** exponent


def make_state(network: nn.Module, config: TrainingConfig, device: torch.device) -> TrainingState:
    """Fresh state: network on ``device``, optimizer, and a GradScaler on CUDA (AMP)."""
    network = network.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed patch size: let cuDNN pick the fastest kernels
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    return TrainingState(network, make_optimizer(network, config), scaler, device, config)


def to_device(batch: dict[str, Any], device: torch.device, has_seeds: bool) -> dict[str, torch.Tensor]:
    """numpy batch from the augmenter -> tensors: ``data``, ``target``, optionally ``seeds``, ``mip``,
    ``undrawn`` (only when some sample's case left a class undrawn).

    ``seg`` channel 0 is the label set, channel 1 (when loaded) the seeds, any further channels
    the MIP trainer's ray channels (``mip``).
    """
    seg = torch.as_tensor(np.asarray(batch["seg"]), dtype=torch.long)
    tensors = {
        "data": torch.as_tensor(np.asarray(batch["data"]), dtype=torch.float32).to(device, non_blocking=True),
        "target": seg[:, :1].to(device, non_blocking=True),
    }
    if has_seeds and seg.shape[1] > 1:
        tensors["seeds"] = seg[:, 1:2].to(device, non_blocking=True)
    first_mip = 2 if has_seeds else 1
    if seg.shape[1] > first_mip:  # the MIP trainer's ray channels (mipseg.training.mip_data)
        tensors["mip"] = seg[:, first_mip:].to(device, non_blocking=True)
    undrawn = batch.get("undrawn")
    if undrawn is not None and np.any(undrawn):
        tensors["undrawn"] = torch.as_tensor(np.asarray(undrawn), dtype=torch.bool).to(device)
    return tensors


def train_step(
    state: TrainingState, batch: dict[str, torch.Tensor], loss_fn: LossFunction
) -> dict[str, float]:
    """One SGD step (AMP on CUDA, gradient norm clipped); returns the loss and its parts."""
    state.network.train()
    state.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(state.device.type, enabled=state.scaler is not None):
        outputs = state.network(batch["data"])
        loss, parts = loss_fn(outputs, batch)
    if state.scaler is not None:
        state.scaler.scale(loss).backward()
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(state.network.parameters(), state.config.grad_clip)
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(state.network.parameters(), state.config.grad_clip)
        state.optimizer.step()
    return {"loss": float(loss.detach()), **parts}


def confusion_counts(
    logits: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    ignore_label: int,
    undrawn: torch.Tensor | None = None,
) -> np.ndarray:
    """Per foreground class TP, FP, FN of the argmax over labelled voxels.

    Parameters
    ----------
    logits
        ``(B, K, z, y, x)`` full-resolution logits.
    target
        ``(B, 1, z, y, x)``.
    undrawn
        Optional ``(B, K)`` bool: a class undrawn in a sample's case is not counted in that sample
        (its label set does not say where that class is).

    Returns
    -------
    ``(K - 1, 3)`` int64 array of (TP, FP, FN).
    """
    prediction = logits.argmax(1)
    labels = target[:, 0]
    labelled = labels != ignore_label
    counts = np.zeros((num_classes - 1, 3), dtype=np.int64)
    for c in range(1, num_classes):
        scored = labelled
        if undrawn is not None:
            scored = labelled & ~undrawn[:, c].reshape(-1, *([1] * (labels.ndim - 1)))
        predicted, reference = (prediction == c) & scored, (labels == c) & scored
        counts[c - 1] = [
            int((predicted & reference).sum()),
            int((predicted & ~reference).sum()),
            int((~predicted & reference).sum()),
        ]
    return counts


@torch.no_grad()
def validation_step(
    state: TrainingState,
    batch: dict[str, torch.Tensor],
    loss_fn: LossFunction,
    num_classes: int,
    ignore_label: int,
) -> tuple[float, np.ndarray]:
    """Loss and TP/FP/FN counts on one validation batch (eval mode, no dropout)."""
    state.network.eval()
    with torch.autocast(state.device.type, enabled=state.scaler is not None):
        outputs = state.network(batch["data"])
        loss, _ = loss_fn(outputs, batch)
    full = outputs[0] if isinstance(outputs, list | tuple) else outputs
    counts = confusion_counts(full.float(), batch["target"], num_classes, ignore_label, batch.get("undrawn"))
    return float(loss), counts


def run_epoch(
    state: TrainingState,
    train_batches: Iterator[dict[str, Any]],
    val_batches: Iterator[dict[str, Any]],
    loss_fn: LossFunction,
    *,
    num_classes: int,
    ignore_label: int,
    has_seeds: bool,
    reduce_counts: Callable[[np.ndarray], np.ndarray] = lambda counts: counts,
    reduce_mean: Callable[[float], float] = lambda value: value,
    on_iteration: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train ``iters_per_epoch`` steps, validate ``val_iters`` batches, update log and EMA.

    ``reduce_counts``/``reduce_mean`` sum or average across DDP processes (identity otherwise).
    Returns the epoch's log entry; ``state.epoch`` is incremented only after everything succeeded.
    """
    config = state.config
    start = time.time()
    lr = poly_lr(config.initial_lr, state.epoch, config.epochs)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    train_losses = []
    for iteration in range(config.iters_per_epoch):
        result = train_step(state, to_device(next(train_batches), state.device, has_seeds), loss_fn)
        train_losses.append(result["loss"])
        if on_iteration is not None:
            on_iteration(iteration)
    val_losses, counts = [], np.zeros((num_classes - 1, 3), dtype=np.int64)
    for _ in range(config.val_iters):
        loss, batch_counts = validation_step(
            state, to_device(next(val_batches), state.device, has_seeds), loss_fn, num_classes, ignore_label
        )
        val_losses.append(loss)
        counts += batch_counts
    counts = reduce_counts(counts)
    dice = dice_from_counts(*counts.T)  # per foreground class; NaN where absent from both
    mean_dice = float(np.nanmean(dice)) if not np.all(np.isnan(dice)) else 0.0
    log = state.log
    ema = mean_dice if not log.ema_fg_dice else 0.9 * log.ema_fg_dice[-1] + 0.1 * mean_dice
    log.train_loss.append(reduce_mean(float(np.mean(train_losses))))
    log.val_loss.append(reduce_mean(float(np.mean(val_losses))) if val_losses else float("nan"))
    log.pseudo_dice.append([float(d) for d in dice])
    log.mean_fg_dice.append(mean_dice)
    log.ema_fg_dice.append(float(ema))
    log.learning_rate.append(lr)
    log.epoch_time.append(time.time() - start)
    improved = state.best_ema is None or ema > state.best_ema
    if improved:
        state.best_ema = float(ema)
    state.epoch += 1
    return {
        "epoch": state.epoch - 1,
        "train_loss": log.train_loss[-1],
        "val_loss": log.val_loss[-1],
        "pseudo_dice": log.pseudo_dice[-1],
        "ema": float(ema),
        "lr": lr,
        "time": log.epoch_time[-1],
        "new_best": improved,
    }


def unwrap(network: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return network.module if hasattr(network, "module") else network


def state_to_checkpoint(state: TrainingState, extra: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint dict of :mod:`mipseg.training.checkpoint` for this state."""
    return {
        "network_weights": {k: v.detach().cpu() for k, v in unwrap(state.network).state_dict().items()},
        "optimizer_state": state.optimizer.state_dict(),
        "grad_scaler_state": state.scaler.state_dict() if state.scaler is not None else None,
        "epoch": state.epoch,
        "best_ema": state.best_ema,
        "logging": state.log.to_json(),
        "config": state.config.to_json(),
        "dropout": state.config.dropout,
        "rng_state": {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        },
        **extra,
    }


def restore_state(state: TrainingState, checkpoint: dict[str, Any]) -> None:
    """Load weights, optimizer, scaler, epoch counter, logs and RNG states from a checkpoint."""
    unwrap(state.network).load_state_dict(checkpoint["network_weights"])
    state.optimizer.load_state_dict(checkpoint["optimizer_state"])
    if state.scaler is not None and checkpoint.get("grad_scaler_state"):
        state.scaler.load_state_dict(checkpoint["grad_scaler_state"])
    state.epoch = int(checkpoint["epoch"])
    state.best_ema = checkpoint.get("best_ema")
    state.log = TrainingLog(**checkpoint.get("logging", {}))
    rng = checkpoint.get("rng_state")
    if rng:
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
