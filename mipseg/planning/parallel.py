"""Run one function over many cases in worker processes, with the shared progress bar."""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

from mipseg.progress import progress_bar

DEFAULT_NUM_PROCESSES = 2
_shared_pool: ProcessPoolExecutor | None = None


@contextlib.contextmanager
def shared_workers(num_processes: int) -> Iterator[None]:
    """Let every :func:`map_with_progress` inside this block reuse one pool of workers.

    Spawned workers import numpy, scipy, SimpleITK and torch (through acvl_utils): seconds each,
    paid once per pool instead of once per step.
    """
    global _shared_pool
    if num_processes <= 1 or _shared_pool is not None:
        yield
        return
    # spawn, not fork: callers (training, prediction) may hold torch/ITK threads that fork does not copy
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=num_processes, mp_context=context) as pool:
        _shared_pool = pool
        try:
            yield
        finally:
            _shared_pool = None


def map_with_progress(
    function: Callable[..., Any],
    tasks: Sequence[tuple],
    num_processes: int,
    description: str,
) -> list[Any]:
    """``[function(*task) for task in tasks]``, in ``num_processes`` spawned workers.

    Results keep the order of ``tasks``. With ``num_processes <= 1`` everything runs in this
    process (no start-up cost, easy debugging). Exceptions in a worker are re-raised here;
    on Ctrl-C pending tasks are cancelled, and every file a finished task wrote was written
    atomically, so ``--continue`` picks up where it stopped.
    """
    results: list[Any] = [None] * len(tasks)
    with progress_bar() as progress:
        bar = progress.add_task(description, total=len(tasks))
        if num_processes <= 1 or len(tasks) <= 1:
            for index, task in enumerate(tasks):
                results[index] = function(*task)
                progress.advance(bar)
            return results
        with shared_workers(min(num_processes, len(tasks))):
            pool = _shared_pool
            pending: dict[Future, int] = {pool.submit(function, *task): i for i, task in enumerate(tasks)}
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        results[pending.pop(future)] = future.result()
                        progress.advance(bar)
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
    return results
