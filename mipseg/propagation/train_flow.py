"""Self-supervised training of the inter-slice flow network on all images of a dataset.

No labels are read. Every iteration takes one volume (channel 0; a random window of at most
``max_depth`` consecutive slices), predicts all flows in one pass and minimises

    L = L2G(local + chain over the curriculum span) + w_iss * ISS + w_smooth * in-plane smoothness

(:mod:`mipseg.propagation.losses`). Checkpoints go to ``results/DatasetX/flow__selfsup/``:
``checkpoint_latest.pt`` every ``save_every`` iterations and on Ctrl-C, ``checkpoint_final.pt``
at the end, plus ``training_log.txt`` and ``progress.png``; all written atomically.
``resume=True`` resumes from ``checkpoint_latest.pt`` (network, optimiser, random
states, loss log), so an interrupted and a straight run give the same weights.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from mipseg import io, paths
from mipseg.dataset import Dataset
from mipseg.devices import resolve_device
from mipseg.errors import InputError
from mipseg.progress import progress_bar
from mipseg.propagation.flow_net import FlowNet, FlowNetConfig, normalize_volume, split_flows, to_working_grid
from mipseg.propagation.losses import (
    SIMILARITIES,
    chain_loss,
    curriculum_span,
    in_plane_smoothness,
    inter_slice_smoothness,
    neighbour_reconstruction_loss,
)

FLOW_MODEL_NAME = "flow__selfsup"
# Regulariser weights per similarity: MSE of [0, 1] images is ~100x smaller than 1 - NCC. The chain
# (global) part of L2G is weighted 0.1: on abdomen_ct_small (120 iterations) weights 0 / 0.2 / 1 gave
# mean organ Dice 0.86 / 0.83 / 0.80, so a small weight keeps the curriculum without dominating.
DEFAULT_WEIGHTS = {
    "mse": {"chain": 0.1, "iss": 0.01, "smooth": 0.01},
    "ncc": {"chain": 0.1, "iss": 0.5, "smooth": 0.5},
}


@dataclass(frozen=True)
class FlowTrainingSettings:
    """Everything that determines a training run; stored in the checkpoint."""

    iterations: int = 300
    similarity: str = "mse"
    learning_rate: float = 1e-3
    anchors_per_iteration: int = 4
    max_depth: int = 64
    ramp_fraction: float = 0.6
    weights: dict[str, float] | None = None
    save_every: int = 50
    seed: int = 0
    network: FlowNetConfig = field(default_factory=FlowNetConfig)

    def loss_weights(self) -> dict[str, float]:
        return self.weights if self.weights is not None else DEFAULT_WEIGHTS[self.similarity]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["network"] = self.network.to_dict()
        data["weights"] = self.loss_weights()
        return data


def flow_model_dir(dataset: str | int) -> Path:
    """``results/DatasetX/flow__selfsup``."""
    return paths.results_dataset_dir(dataset) / FLOW_MODEL_NAME


def load_normalized_image(path: Path) -> np.ndarray:
    """Channel-0 image ``(z, y, x)`` clipped to its 0.5/99.5 percentiles and scaled to [0, 1]."""
    array, _ = io.read_image(path, dtype=np.float32)
    return normalize_volume(array)


def training_volumes(dataset: Dataset, working_size: tuple[int, int]) -> list[torch.Tensor]:
    """Every training and test image (channel 0) on the working grid, each ``(D, 1, h, w)``."""
    volumes = []
    for case in (*dataset.cases, *dataset.test_cases):
        volume = to_working_grid(load_normalized_image(case.images[0]), working_size)
        volumes.append(volume[0].permute(1, 0, 2, 3).contiguous())
    return volumes


def training_step_loss(
    model: FlowNet, slices: torch.Tensor, anchors: torch.Tensor, span: int, settings: FlowTrainingSettings
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts for one window of slices ``(D, 1, h, w)``."""
    forward, backward = split_flows(model(slices.permute(1, 0, 2, 3)[None]))
    weights = settings.loss_weights()
    parts = {
        "local": neighbour_reconstruction_loss(slices, forward, backward, settings.similarity),
        "chain": chain_loss(slices, forward, backward, anchors, span, settings.similarity),
        "iss": inter_slice_smoothness(forward, backward),
        "smooth": 0.5 * (in_plane_smoothness(forward[:-1]) + in_plane_smoothness(backward[1:])),
    }
    total = parts["local"] + sum(weights[name] * parts[name] for name in ("chain", "iss", "smooth"))
    return total, {name: float(value.detach()) for name, value in parts.items()}


def train_flow_model(
    dataset: Dataset,
    settings: FlowTrainingSettings = FlowTrainingSettings(),
    *,
    resume: bool = False,
    device: str = "auto",
    show_progress: bool = True,
) -> Path:
    """Train (or resume) the flow model of ``dataset``; returns the path of ``checkpoint_final.pt``.

    Raises
    ------
    InputError
        Unknown similarity, ``resume`` without a checkpoint, or a checkpoint made
        with other settings.
    """
    if settings.similarity not in SIMILARITIES:
        raise InputError(f"--similarity {settings.similarity}: choose one of {', '.join(SIMILARITIES)}")
    if settings.iterations < 1:
        raise InputError(f"--iters {settings.iterations}: must be at least 1")
    torch_device = resolve_device(device)
    folder = flow_model_dir(dataset.name)
    latest = folder / "checkpoint_latest.pt"
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    model = FlowNet(settings.network).to(torch_device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    log: list[dict] = []
    start = 0
    if resume:
        if not latest.is_file():
            raise InputError(f"{latest}: no checkpoint to continue from; run without --continue")
        checkpoint = torch.load(latest, map_location=torch_device, weights_only=False)
        if checkpoint["settings"] != settings.to_dict():
            raise InputError(
                f"{latest}: made with other settings ({checkpoint['settings']}); use the same flags"
            )
        model.load_state_dict(checkpoint["network_weights"])
        optimizer.load_state_dict(checkpoint["optimizer_state"])
        rng.bit_generator.state = checkpoint["numpy_rng_state"]
        torch.set_rng_state(checkpoint["torch_rng_state"])
        start, log = checkpoint["iteration"], checkpoint["logging"]

    volumes = training_volumes(dataset, settings.network.working_size)
    if min(v.shape[0] for v in volumes) < 2:
        raise InputError(f"{dataset.folder}: every image needs at least 2 slices along axis 0 to learn flows")
    model.train()
    iteration, iteration_rng_state = start, None
    try:
        with progress_bar(show_progress, elapsed=True) as progress:
            task = progress.add_task("training flow", total=settings.iterations, completed=start)
            for iteration in range(start, settings.iterations):
                began = time.perf_counter()
                # Restored on Ctrl-C so a resumed run draws what the straight run would have.
                iteration_rng_state = rng.bit_generator.state
                volume = volumes[int(rng.integers(len(volumes)))]
                depth = min(volume.shape[0], settings.max_depth)
                offset = int(rng.integers(volume.shape[0] - depth + 1))
                window = volume[offset : offset + depth].to(torch_device)
                span = curriculum_span(iteration, settings.iterations, depth, settings.ramp_fraction)
                anchors = torch.from_numpy(rng.integers(0, depth, settings.anchors_per_iteration)).to(
                    torch_device
                )
                loss, parts = training_step_loss(model, window, anchors, span, settings)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                log.append(
                    {
                        "iteration": iteration + 1,
                        "loss": float(loss.detach()),
                        "span": span,
                        **parts,
                        "seconds": time.perf_counter() - began,
                    }
                )
                progress.update(
                    task,
                    advance=1,
                    description=f"training flow (loss {float(loss.detach()):.4f}, span {span})",
                )
                if (iteration + 1) % settings.save_every == 0:
                    _save(folder, latest, model, optimizer, rng, iteration + 1, log, settings, dataset)
    except KeyboardInterrupt:
        done = log[-1]["iteration"] if log else start
        if iteration_rng_state is not None and done == iteration:
            rng.bit_generator.state = iteration_rng_state
        _save(folder, latest, model, optimizer, rng, done, log, settings, dataset)
        raise
    _save(folder, latest, model, optimizer, rng, settings.iterations, log, settings, dataset, report=False)
    final = folder / "checkpoint_final.pt"
    _save(folder, final, model, optimizer, rng, settings.iterations, log, settings, dataset)
    return final


def load_flow_model(checkpoint_path: Path, device: torch.device | str = "cpu") -> FlowNet:
    """Rebuild a trained :class:`FlowNet` from a checkpoint, in eval mode."""
    if not Path(checkpoint_path).is_file():
        raise InputError(f"{checkpoint_path}: flow model checkpoint not found")
    checkpoint = torch.load(checkpoint_path, map_location=device, weights_only=False)
    model = FlowNet(FlowNetConfig.from_dict(checkpoint["settings"]["network"])).to(device)
    model.load_state_dict(checkpoint["network_weights"])
    return model.eval()


def _save(
    folder: Path,
    target: Path,
    model: FlowNet,
    optimizer: torch.optim.Optimizer,
    rng: np.random.Generator,
    iteration: int,
    log: list[dict],
    settings: FlowTrainingSettings,
    dataset: Dataset,
    report: bool = True,
) -> None:
    """Write ``target`` atomically; with ``report`` also training_log.txt and progress.png."""
    checkpoint = {
        "network_weights": model.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "iteration": iteration,
        "epoch": iteration,
        "trainer": FLOW_MODEL_NAME,
        "settings": settings.to_dict(),
        "dataset_json": dataset.spec.to_json(),
        "numpy_rng_state": rng.bit_generator.state,
        "torch_rng_state": torch.get_rng_state(),
        "logging": log,
    }
    folder.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(target) as tmp:
        torch.save(checkpoint, tmp)
    if report:
        _write_log(folder / "training_log.txt", log)
        _plot_progress(folder / "progress.png", log)


def _write_log(path: Path, log: list[dict]) -> None:
    lines = ["iteration loss local chain iss smooth span seconds"]
    lines += [
        f"{e['iteration']} {e['loss']:.6f} {e['local']:.6f} {e['chain']:.6f} {e['iss']:.6f} "
        f"{e['smooth']:.6f} {e['span']} {e['seconds']:.3f}"
        for e in log
    ]
    with io.atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def _plot_progress(path: Path, log: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (losses, spans) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    steps = [e["iteration"] for e in log]
    for name in ("loss", "local", "chain"):
        losses.plot(steps, [e[name] for e in log], label=name, linewidth=0.8)
    losses.set_yscale("log")
    losses.legend()
    spans.plot(steps, [e["span"] for e in log], color="black")
    spans.set_ylabel("L2G span (slices)")
    spans.set_xlabel("iteration")
    with io.atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=80)
    plt.close(figure)
