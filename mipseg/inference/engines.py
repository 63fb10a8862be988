"""What runs the network on each batch of tiles: torch, or OpenVINO on CPUs (``--engine``, ``--precision``).

On a CPU, OpenVINO runs the same trained network 2x (32..320 features, patch 96x160x160) to 5x
(16..128 features, patch 32x40x48) faster than torch's float32 path, with the same output up to
float rounding (documentation/performance.md). It is an optional dependency (``pip install
openvino``); ``--engine auto`` uses it on CPU when it is installed and falls back to torch
otherwise. ``--precision bfloat16`` computes in bfloat16 (torch autocast, or OpenVINO's inference
precision), another 2x on CPUs with native bfloat16 (AVX512-BF16, AMX) at a small measured Dice cost.

The network is converted to OpenVINO once per (weights, tile batch shape, precision) and the
converted model is cached in ``$MIPSEG_CACHE`` (default ``$XDG_CACHE_HOME/mipseg``, else
``~/.cache/mipseg``): converting a large network takes minutes on 2 cores, loading it seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import types
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from mipseg.errors import InputError

ENGINES = ("auto", "torch", "openvino")
PRECISIONS = ("float32", "bfloat16")
_OPENVINO_PRECISION = {"float32": "f32", "bfloat16": "bf16"}

AUTO_OPENVINO_MIN_PASSES = 256
"""``--engine auto`` converts a network to OpenVINO only for at least this many forward passes
(tiles x mirrors) per fold, or when the converted model is already cached: converting takes
seconds to minutes, which a small volume does not win back (torch: ~0.4 s per pass of the CPU
plan's network, OpenVINO ~0.07 s)."""

TileRunner = Callable[[torch.Tensor], torch.Tensor]
"""Maps a batch of tiles ``(B, C, z, y, x)`` float32 to logits ``(B, K, z, y, x)`` float32."""


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def import_openvino() -> types.ModuleType:
    """``import openvino``, with Ctrl-C during its native initialisation kept a Ctrl-C.

    pybind11 turns a KeyboardInterrupt raised while the extension initialises into
    ``ImportError: initialization failed`` (the interrupt as its cause); re-raised as the
    interrupt, the command ends with its usual "interrupted" line instead of a traceback.
    """
    try:
        import openvino
    except ImportError as error:
        cause = error.__cause__ or error.__context__
        if isinstance(cause, KeyboardInterrupt):
            raise KeyboardInterrupt from error
        raise
    return openvino


def resolve_engine(engine: str, device: torch.device) -> str:
    """The engine an ``--engine`` value means on ``device``: ``"torch"`` or ``"openvino"``.

    ``auto`` is OpenVINO on CPU when it is installed, torch otherwise (always torch on CUDA).

    Raises
    ------
    InputError
        Unknown engine, OpenVINO asked for on CUDA, or OpenVINO not installed.
    """
    if engine not in ENGINES:
        raise InputError(f"--engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if engine == "auto":
        return "openvino" if device.type == "cpu" and openvino_available() else "torch"
    if engine == "openvino":
        if device.type != "cpu":
            raise InputError(f"--engine openvino runs on the CPU only; got --device {device}")
        if not openvino_available():
            raise InputError(
                "--engine openvino: the openvino package is not installed (pip install openvino)"
            )
    return engine


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return precision


def cache_dir() -> Path:
    """Converted models: ``$MIPSEG_CACHE``, else ``$XDG_CACHE_HOME/mipseg``, else ``~/.cache/mipseg``."""
    if os.environ.get("MIPSEG_CACHE"):
        return Path(os.environ["MIPSEG_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mipseg"


def tile_runner(
    network: torch.nn.Module,
    engine: str,
    precision: str,
    batch_shape: Sequence[int],
    device: torch.device,
) -> TileRunner:
    """A function running ``network`` (eval mode, one output) on tile batches with the chosen engine.

    Parameters
    ----------
    engine
        ``"torch"`` or ``"openvino"`` (see :func:`resolve_engine`).
    precision
        ``"float32"`` or ``"bfloat16"``.
    batch_shape
        ``(B, C, z, y, x)`` of a full batch; OpenVINO compiles for exactly this shape and pads
        smaller (last) batches up to it.
    """
    check_precision(precision)
    if engine == "openvino":
        return _openvino_runner(network, precision, tuple(int(s) for s in batch_shape))
    if precision == "bfloat16":
        return _torch_bfloat16_runner(network, device)
    return network


def _torch_bfloat16_runner(network: torch.nn.Module, device: torch.device) -> TileRunner:
    def run(batch: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return network(batch).float()

    return run


def network_fingerprint(network: torch.nn.Module, batch_shape: Sequence[int], precision: str) -> str:
    """Hash of the network's structure and weights, the batch shape, precision and OpenVINO version."""
    openvino = import_openvino()

    digest = hashlib.sha256()
    digest.update(repr(network).encode())
    digest.update(repr((tuple(batch_shape), precision, openvino.__version__)).encode())
    for name, tensor in network.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def _cached_model_path(network: torch.nn.Module, batch_shape: Sequence[int], precision: str) -> Path:
    return cache_dir() / "openvino" / network_fingerprint(network, batch_shape, precision) / "model.xml"


def is_cached(network: torch.nn.Module, batch_shape: Sequence[int], precision: str) -> bool:
    """True if the OpenVINO conversion of ``network`` for this batch shape and precision is cached."""
    return openvino_available() and _cached_model_path(network, batch_shape, precision).is_file()


def auto_uses_openvino(
    networks: Sequence[torch.nn.Module], batch_shape: Sequence[int], precision: str, passes: int
) -> bool:
    """Whether ``--engine auto`` (resolved to OpenVINO) should convert, for ``passes`` per fold."""
    return passes >= AUTO_OPENVINO_MIN_PASSES or all(is_cached(n, batch_shape, precision) for n in networks)


def _converted_model(network: torch.nn.Module, batch_shape: tuple[int, ...], precision: str):
    """The OpenVINO model of ``network`` for ``batch_shape``, from the cache or converted (and cached)."""
    openvino = import_openvino()

    path = _cached_model_path(network, batch_shape, precision)
    core = openvino.Core()
    if path.is_file():
        with contextlib.suppress(RuntimeError):  # a damaged cache entry is converted again
            return core.read_model(path)
    example = torch.zeros(batch_shape, dtype=torch.float32)
    with torch.no_grad(), warnings.catch_warnings():
        # tracing warns about shape checks that are constant for a fixed tile shape, which it is
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        model = openvino.convert_model(network.cpu().eval(), example_input=example)
    with contextlib.suppress(OSError):  # a read-only cache only costs the conversion next time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".partial-{os.getpid()}.xml")
        openvino.save_model(model, tmp, compress_to_fp16=False)
        tmp.with_suffix(".bin").replace(path.with_suffix(".bin"))
        tmp.replace(path)
    return model


def _openvino_runner(network: torch.nn.Module, precision: str, batch_shape: tuple[int, ...]) -> TileRunner:
    openvino = import_openvino()

    model = _converted_model(network, batch_shape, precision)
    config = {
        "INFERENCE_PRECISION_HINT": _OPENVINO_PRECISION[precision],  # f32 explicitly: the default may be bf16
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        "PERFORMANCE_HINT": "LATENCY",
    }
    compiled = openvino.Core().compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    full = batch_shape[0]

    def run(batch: torch.Tensor) -> torch.Tensor:
        count = batch.shape[0]
        array = batch.detach().cpu().numpy().astype(np.float32, copy=False)
        if count < full:  # the compiled shape is fixed: pad the last batch with zero tiles
            array = np.concatenate([array, np.zeros((full - count, *array.shape[1:]), np.float32)])
        request.infer({0: np.ascontiguousarray(array)})
        # the output buffer is reused by the next call: copy it out
        return torch.from_numpy(np.array(request.get_output_tensor(0).data[:count], dtype=np.float32))

    return run
