"""The one progress bar every stage shows (rich, on stderr so that piped stdout stays clean).

Shared layer: any stage may import it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

Item = TypeVar("Item")


def progress_bar(show: bool = True, *, transient: bool = False, elapsed: bool = False) -> Progress:
    """A rich ``Progress``: description, bar, done/total, (elapsed,) time remaining.

    Parameters
    ----------
    show
        ``False`` gives a disabled bar with the same methods (``add_task``, ``advance``, ``track``),
        so callers never branch on it (``--disable-progress-bar``, ``show_progress=False``). Also
        disabled when stderr is not a terminal.
    transient
        Remove the bars when the block ends (bars nested in a longer run).
    elapsed
        Also show the time spent (long single tasks such as training iterations).
    """
    columns: list[ProgressColumn] = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    if elapsed:
        columns.append(TimeElapsedColumn())
    columns.append(TimeRemainingColumn())
    console = Console(stderr=True)
    # bars only in a terminal: redirected (nohup, SLURM, a log file) they would leave escape codes and
    # empty lines; the stages print plain lines for what matters there (training: one per epoch)
    return Progress(
        *columns, console=console, disable=not (show and console.is_terminal), transient=transient
    )


def track(items: Iterable[Item], description: str, *, show: bool = True) -> Iterator[Item]:
    """Yield ``items`` while :func:`progress_bar` counts them (``len(items)`` as the total when known)."""
    with progress_bar(show) as bar:
        yield from bar.track(items, description=description)
