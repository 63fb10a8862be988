"""Training log text file and ``progress.png`` (losses + pseudo Dice, epoch time, learning rate)."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import numpy as np

from mipseg import io
from mipseg.training.loop import TrainingLog


def log_line(path: Path, message: str) -> None:
    """Append a timestamped line to the text log (``training_log.txt``)."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    with open(path, "a") as handle:
        handle.write(f"{stamp}: {message}\n")


def epoch_summary(result: dict[str, Any], epochs: int, class_names: list[str], eta_s: float) -> str:
    """The line printed after each epoch (plain text: the same in a terminal and in a redirected file).

    ``epoch 3/100 train_loss 0.4123 val_loss 0.3981 pseudo_dice vessel=0.6123 ema 0.5512 lr 0.009730
    time 12.3s eta 0:19:52``: ``key value`` pairs, per-class Dice as ``name=value``.
    """
    if len(class_names) != len(result["pseudo_dice"]):  # label regions etc.: number the classes
        class_names = [str(index + 1) for index in range(len(result["pseudo_dice"]))]
    dice = " ".join(f"{name}={value:.4f}" for name, value in zip(class_names, result["pseudo_dice"]))
    eta = datetime.timedelta(seconds=round(max(eta_s, 0.0)))
    return (
        f"epoch {result['epoch'] + 1}/{epochs} train_loss {result['train_loss']:.4f} "
        f"val_loss {result['val_loss']:.4f} pseudo_dice {dice} ema {result['ema']:.4f} "
        f"lr {result['lr']:.6f} time {result['time']:.1f}s eta {eta}"
    )


def foreground_names(labels: dict[str, int]) -> list[str]:
    """dataset.json's class names in label order, without background and ``ignore``."""
    return [
        name
        for name, value in sorted(labels.items(), key=lambda item: item[1])
        if value != 0 and name != "ignore"
    ]


PLOT_INTERVAL_S = 30.0


def plot_progress(log: TrainingLog, path: Path) -> Path:
    """nnU-Net's three panels, written atomically as a PNG.

    1. train loss (blue), validation loss (red); pseudo Dice (green dotted) and its EMA (green)
       on a twin axis; 2. epoch duration; 3. learning rate.
    """
    # the object-oriented API without pyplot: no global state, no GUI backend, much faster
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = np.arange(len(log.train_loss))
    figure = Figure(figsize=(8, 10))
    figure.subplots_adjust(hspace=0.35, right=0.88, top=0.97, bottom=0.05)
    FigureCanvasAgg(figure)
    axes = figure.subplots(3, 1)
    ax = axes[0]
    ax.plot(epochs, log.train_loss, color="b", marker=".", label="train loss")
    ax.plot(epochs, log.val_loss, color="r", marker=".", label="val loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    dice_axis = ax.twinx()
    dice_axis.plot(epochs, log.mean_fg_dice, color="g", linestyle=":", marker=".", label="pseudo Dice")
    dice_axis.plot(epochs, log.ema_fg_dice, color="g", marker=".", label="pseudo Dice (EMA)")
    dice_axis.set_ylabel("pseudo Dice")
    ax.legend(loc="upper left")
    dice_axis.legend(loc="upper right")
    axes[1].plot(epochs, log.epoch_time, color="b", marker=".")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("epoch time (s)")
    axes[2].plot(epochs, log.learning_rate, color="b", marker=".")
    axes[2].set_xlabel("epoch")
    axes[2].set_ylabel("learning rate")
    with io.atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=72)
    return path
