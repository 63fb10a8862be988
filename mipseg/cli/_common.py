"""What every command shares: error reporting, the --debug flag, dataset option types."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Annotated

import typer
from rich.console import Console

from mipseg.errors import InputError

console = Console(stderr=True)

DatasetOption = Annotated[
    str, typer.Option("-d", "--dataset", help="Dataset id (900) or name (Dataset900_Name).")
]
DebugOption = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
SeedOption = Annotated[int, typer.Option("--seed", help="Random seed; the same seed gives the same result.")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu or cuda[:N].")]


REDIRECTED_WIDTH = 160  # rich's 80 columns off a terminal cut option names and numbers ("0.54…")


def wide_console(stderr: bool = False) -> Console:
    """A console for tables: the terminal's width, or :data:`REDIRECTED_WIDTH` when redirected."""
    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=REDIRECTED_WIDTH)


def make_app(help_text: str) -> typer.Typer:
    """A single-command typer app with -h as a help alias and no shell-completion noise."""
    import typer.rich_utils

    if typer.rich_utils.MAX_WIDTH is None and not Console().is_terminal:  # help piped to less/grep
        typer.rich_utils.MAX_WIDTH = REDIRECTED_WIDTH
    return typer.Typer(
        help=help_text,
        add_completion=False,
        no_args_is_help=False,
        context_settings={"help_option_names": ["-h", "--help"]},
        pretty_exceptions_enable=False,
    )


@contextlib.contextmanager
def reported_errors(debug: bool = False) -> Iterator[None]:
    """Turn :class:`InputError` into one red line per problem and exit status 2.

    Ctrl-C exits with 130 and a hint that the command can be resumed; everything written
    before was written atomically, so nothing is half-written.
    """
    try:
        yield
    except InputError as error:
        if debug:
            console.print_exception()
        for problem in error.problems:
            console.print(f"[bold red]error:[/] {problem}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print(
            "[yellow]interrupted[/]; run the same command with --continue to resume", highlight=False
        )
        sys.exit(130)
    except MemoryError as error:
        # torch.OutOfMemoryError (GPU) derives from RuntimeError, CPU exhaustion from MemoryError
        _report_out_of_memory(error, debug)
    except RuntimeError as error:
        if "out of memory" not in str(error).lower():
            raise
        _report_out_of_memory(error, debug)


def _report_out_of_memory(error: BaseException, debug: bool) -> None:
    """One line with what to change instead of a traceback; exit status 1 (not an input error)."""
    if debug:
        console.print_exception()
    console.print(
        "[bold red]error:[/] out of memory; use a smaller --gpu-memory-gb when planning (smaller patch),"
        " fewer -np/--num-workers processes, or --device cpu; --continue resumes where it stopped"
        f" ({type(error).__name__})",
        highlight=False,
        soft_wrap=True,
    )
    sys.exit(1)
