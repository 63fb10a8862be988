"""Sliding-window prediction with Gaussian importance weighting and mirroring (nnU-Net's scheme).

The one sliding window of mipseg (shared layer, below the stages): prediction runs it for logits,
training's final validation and refinement for class probabilities
(:func:`sliding_window_probabilities`).

A volume larger than the patch is covered by overlapping tiles (``tile_step_size`` of the patch
apart, 0.5 by default), each tile's logits are weighted by a Gaussian that trusts the tile centre
more than its border, and the weighted sum is divided by the summed weights. Tiles are run in
batches; test-time augmentation averages the logits of all mirror combinations of the allowed
axes (identity + 7 flips in 3D). Everything is vectorised in torch: no Python loop touches voxels.

Constants and formulas follow nnU-Net v2 (``inference/sliding_window_prediction.py``,
``predict_from_raw_data.py``): sigma = 1/8 of the tile, map scaled to a maximum of 10 with zeros
replaced by the smallest nonzero value, steps ``ceil((size - tile) / (tile * step)) + 1`` evenly
spaced between 0 and ``size - tile``.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache

import numpy as np
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from scipy.ndimage import gaussian_filter

GAUSSIAN_SIGMA_SCALE = 1.0 / 8  # nnU-Net: sigma = tile_size / 8 per axis
GAUSSIAN_VALUE_SCALING = 10.0  # nnU-Net's value_scaling_factor (keeps fp16 accumulation away from 0)


def compute_steps(
    image_size: Sequence[int], tile_size: Sequence[int], tile_step_size: float
) -> list[list[int]]:
    """Tile start positions per axis, as nnU-Net's ``compute_steps_for_sliding_window``.

    Parameters
    ----------
    image_size, tile_size
        Per axis ``(z, y, x)``; the image must be at least as large as the tile (pad it first).
    tile_step_size
        Target distance between tiles as a fraction of the tile, in ``(0, 1]``.

    Returns
    -------
    list of 3 lists of int
        For each axis ``n = ceil((size - tile) / (tile * step)) + 1`` starts, evenly spaced from 0
        to ``size - tile`` (rounded to integers).
    """
    if not 0 < tile_step_size <= 1:
        raise ValueError(f"tile_step_size must be in (0, 1], got {tile_step_size}")
    if any(i < t for i, t in zip(image_size, tile_size)):
        raise ValueError(f"image {tuple(image_size)} is smaller than the tile {tuple(tile_size)}; pad it")
    steps = []
    for size, tile in zip(image_size, tile_size):
        num_steps = int(np.ceil((size - tile) / (tile * tile_step_size))) + 1
        largest_start = size - tile
        spacing = largest_start / (num_steps - 1) if num_steps > 1 else 0.0
        steps.append([int(np.round(spacing * i)) for i in range(num_steps)])
    return steps


@lru_cache(maxsize=4)
def _gaussian_numpy(tile_size: tuple[int, ...], sigma_scale: float, value_scaling: float) -> np.ndarray:
    delta = np.zeros(tile_size, dtype=np.float64)
    delta[tuple(s // 2 for s in tile_size)] = 1
    gaussian = gaussian_filter(delta, [s * sigma_scale for s in tile_size], 0, mode="constant", cval=0)
    gaussian = gaussian / (gaussian.max() / value_scaling)
    # zeros would divide by zero where only a tile's border covers a voxel
    gaussian[gaussian == 0] = gaussian[gaussian > 0].min()
    return gaussian.astype(np.float32)


def gaussian_importance_map(
    tile_size: Sequence[int],
    sigma_scale: float = GAUSSIAN_SIGMA_SCALE,
    value_scaling: float = GAUSSIAN_VALUE_SCALING,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Gaussian weight per tile voxel: float32, shape ``tile_size`` ``(z, y, x)``, max ``value_scaling``."""
    gaussian = _gaussian_numpy(tuple(int(s) for s in tile_size), sigma_scale, value_scaling)
    return torch.from_numpy(gaussian.copy()).to(device)  # a copy: the cached array must stay unchanged


def mirror_combinations(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """All subsets of ``mirror_axes`` (spatial axes 0..2), the empty one (identity) first."""
    axes = sorted(set(int(a) for a in mirror_axes))
    return [combo for n in range(len(axes) + 1) for combo in itertools.combinations(axes, n)]


def predict_with_mirroring(
    network: Callable[[torch.Tensor], torch.Tensor],
    batch: torch.Tensor,
    mirror_axes: Sequence[int] | None,
) -> torch.Tensor:
    """Mean logits of ``network`` over the mirror combinations of ``batch`` ``(B, C, z, y, x)``.

    ``mirror_axes`` are spatial axes (0 = z); ``None`` or empty means no test-time augmentation.
    """
    combinations = mirror_combinations(mirror_axes or ())
    total = None
    for combo in combinations:
        dims = [axis + 2 for axis in combo]
        flipped = torch.flip(batch, dims) if dims else batch
        logits = network(flipped)
        logits = torch.flip(logits, dims) if dims else logits
        total = logits if total is None else total + logits
    return total / len(combinations)


def tile_slices(image_size: Sequence[int], tile_size: Sequence[int], tile_step_size: float) -> list[tuple]:
    """The ``(z, y, x)`` slice tuple of every tile, z-major order."""
    steps = compute_steps(image_size, tile_size, tile_step_size)
    return [
        tuple(slice(start, start + tile) for start, tile in zip(starts, tile_size))
        for starts in itertools.product(*steps)
    ]


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    # float32 on CPU (bf16 autocast there is slower and less exact); fp16 autocast on CUDA like nnU-Net
    return torch.autocast("cuda", enabled=True) if device.type == "cuda" else contextlib.nullcontext()


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _put_unless_stopped(channel: queue.Queue, item: object, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            channel.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


@contextlib.contextmanager
def _prefetched(produce: Callable[[], Iterator], maxsize: int = 2) -> Iterator[Iterator]:
    """Run the generator ``produce()`` in a background thread, ``maxsize`` items ahead.

    nnU-Net cuts its tiles in a producer thread as well. Besides overlapping the copies with the
    network, this measurably lowers the CPU time per forward pass on an oversubscribed machine
    (the OpenMP runtime spins less when more threads than cores exist). Errors in the producer
    are re-raised in the consumer; leaving the block early stops the producer.
    """
    channel: queue.Queue = queue.Queue(maxsize=maxsize)
    stop = threading.Event()

    def run() -> None:
        try:
            for item in produce():
                if not _put_unless_stopped(channel, ("item", item), stop):
                    return
            _put_unless_stopped(channel, ("end", None), stop)
            stop.wait()  # stay alive until the consumer is done: the last tiles profit as well
        except BaseException as error:  # handed to the consumer, which re-raises it
            _put_unless_stopped(channel, ("error", error), stop)

    def consume() -> Iterator:
        while True:
            kind, value = channel.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value

    thread = threading.Thread(target=run, name="mipseg-tiles", daemon=True)
    thread.start()
    try:
        yield consume()
    finally:
        stop.set()
        thread.join()


def sliding_window_logits(
    network: Callable[[torch.Tensor], torch.Tensor],
    image: np.ndarray | torch.Tensor,
    tile_size: Sequence[int],
    num_classes: int,
    *,
    tile_step_size: float = 0.5,
    mirror_axes: Sequence[int] | None = (0, 1, 2),
    batch_size: int = 1,
    use_gaussian: bool = True,
    device: torch.device | str = "cpu",
    on_tiles_done: Callable[[int], None] | None = None,
    tile_softmax: bool = False,
) -> torch.Tensor:
    """Logits of a whole preprocessed volume by Gaussian-weighted sliding-window prediction.

    Parameters
    ----------
    network
        Maps ``(B, C, *tile_size)`` to logits ``(B, num_classes, *tile_size)`` (eval mode, no
        deep supervision).
    image : shape (C, z, y, x)
        Preprocessed channels. Axes smaller than the tile are zero-padded (centred) and the
        padding is cut off again.
    tile_size
        Patch ``(z, y, x)`` the network was trained on.
    num_classes
        Logit channels ``K``.
    tile_step_size
        Tile overlap: distance between tiles as a fraction of the tile (0.5 = half overlap).
    mirror_axes
        Spatial axes whose mirror combinations are averaged (test-time augmentation); ``None``
        or ``()`` disables it.
    batch_size
        Tiles per forward pass.
    use_gaussian
        Weight tiles by :func:`gaussian_importance_map`; otherwise uniformly.
    device
        Where the network runs and the logits accumulate.
    on_tiles_done
        Called with the number of tiles finished after every batch (progress bars).
    tile_softmax
        Average every tile's softmax instead of its logits: the result is then class probabilities
        (see :func:`sliding_window_probabilities`).

    Returns
    -------
    torch.Tensor float32, shape (K, z, y, x), on ``device``
    """
    device = torch.device(device)
    image = torch.as_tensor(image)
    if image.ndim != 4:
        raise ValueError(f"expected (C, z, y, x) image, got shape {tuple(image.shape)}")
    tile_size = tuple(int(t) for t in tile_size)
    padded, revert_slicer = pad_nd_image(image, tile_size, "constant", {"value": 0}, True, None)
    spatial = tuple(padded.shape[1:])
    slices = tile_slices(spatial, tile_size, tile_step_size)

    weight_tile = (
        gaussian_importance_map(tile_size, device=device)
        if use_gaussian
        else torch.ones(tile_size, dtype=torch.float32, device=device)
    )
    logits_sum = torch.zeros((num_classes, *spatial), dtype=torch.float32, device=device)
    weight_sum = torch.zeros(spatial, dtype=torch.float32, device=device)
    padded = padded.to(device=device, dtype=torch.float32)

    def cut_batches() -> Iterator[tuple[torch.Tensor, list]]:
        for batch_slices in _batches(slices, max(1, int(batch_size))):
            yield torch.stack([padded[(slice(None), *s)] for s in batch_slices]), batch_slices

    with _prefetched(cut_batches) as batches, torch.inference_mode(), _autocast(device):
        for batch, batch_slices in batches:
            logits = predict_with_mirroring(network, batch, mirror_axes).float()
            if logits.shape[1] != num_classes:
                raise ValueError(f"network returned {logits.shape[1]} channels, expected {num_classes}")
            if tile_softmax:
                logits = torch.softmax(logits, 1)
            for tile_logits, s in zip(logits, batch_slices):
                logits_sum[(slice(None), *s)].addcmul_(tile_logits, weight_tile)
                weight_sum[s] += weight_tile
            if on_tiles_done is not None:
                on_tiles_done(len(batch_slices))
        logits_sum /= weight_sum
    if not torch.isfinite(logits_sum).all():
        raise RuntimeError("sliding-window logits contain inf/nan; the network output overflowed")
    # the slicer's first entry covers the image channels; the logits have K channels instead
    return logits_sum[(slice(None), *revert_slicer[1:])]


def sliding_window_probabilities(
    network: Callable[[torch.Tensor], torch.Tensor],
    image: np.ndarray,
    tile_size: Sequence[int],
    num_classes: int,
    *,
    tile_step_size: float = 0.5,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Class probabilities of a whole preprocessed case: Gaussian-weighted mean of every tile's softmax.

    One tile per forward pass, no mirroring; the network is put in eval mode first. Training's
    final validation (out-of-fold export) and refinement's passes use it; averaging per-tile
    softmax rather than logits keeps their probabilities as they were before the one sliding
    window was shared (prediction averages logits, as nnU-Net).

    Parameters
    ----------
    network
        Maps ``(1, C, *tile_size)`` to logits ``(1, num_classes, *tile_size)``.
    image : np.ndarray float32, shape (C, z, y, x)
    tile_size, num_classes, tile_step_size, device
        As :func:`sliding_window_logits`.

    Returns
    -------
    np.ndarray float32, shape (K, z, y, x), summing to 1 over K
    """
    if isinstance(network, torch.nn.Module):
        network.eval()
    probabilities = sliding_window_logits(
        network,
        image,
        tile_size,
        num_classes,
        tile_step_size=tile_step_size,
        mirror_axes=None,
        device=device,
        tile_softmax=True,
    )
    return probabilities.cpu().numpy()


def number_of_tiles(image_shape: Sequence[int], tile_size: Sequence[int], tile_step_size: float) -> int:
    """How many tiles :func:`sliding_window_logits` runs for a ``(z, y, x)`` image (after padding)."""
    padded = [max(i, t) for i, t in zip(image_shape, tile_size)]
    return int(np.prod([len(s) for s in compute_steps(padded, tile_size, tile_step_size)]))
