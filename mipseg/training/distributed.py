"""Multi-GPU training with torchrun: process group, per-rank batch split, reductions.

Launch ``torchrun --nproc_per_node N $(which mipseg_train) -d ... -f ...``; torchrun sets
``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``. NCCL on CUDA, gloo on CPU (tests use 2 gloo processes).
Only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    """Rank and world size of this process (``world_size == 1`` when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistributedContext:
    """Join the process group if torchrun launched several processes; else a single-process context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    return DistributedContext(rank, world_size, local_rank)


def per_rank_batch_size(global_batch_size: int, context: DistributedContext) -> int:
    """Split the planned batch across processes as nnU-Net does (at least 1 sample each)."""
    share = global_batch_size // context.world_size + (context.rank < global_batch_size % context.world_size)
    return max(1, share)


def sum_counts(counts: np.ndarray, context: DistributedContext) -> np.ndarray:
    """Sum TP/FP/FN arrays over all processes."""
    if not context.enabled:
        return counts
    tensor = _on_backend_device(torch.from_numpy(counts.astype(np.float64)))
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().numpy().astype(np.int64)


def mean_value(value: float, context: DistributedContext) -> float:
    """Average a float over all processes."""
    if not context.enabled:
        return value
    tensor = _on_backend_device(torch.tensor([value], dtype=torch.float64))
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item() / context.world_size)


def _on_backend_device(tensor: torch.Tensor) -> torch.Tensor:
    """NCCL reduces CUDA tensors only."""
    return tensor.cuda() if dist.get_backend() == "nccl" else tensor


def barrier(context: DistributedContext) -> None:
    if context.enabled:
        dist.barrier()


def shutdown(context: DistributedContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()
