"""mipseg: one entry point, ``mipseg <command>``, beside the ``mipseg_<command>`` scripts.

Each subcommand is the very function of the ``mipseg_<command>`` script (same flags, same help);
this module only lists them in pipeline order with one line each.
"""

from __future__ import annotations

import importlib
import sys
from typing import Annotated

import typer

from mipseg import __version__
from mipseg.cli.predict import expand_multi_value_options
from mipseg.cli.propagate import default_suggest_count

# (command, cli module, one line for `mipseg -h`), in pipeline order
STAGES = (
    ("synthesize", "synthesize", "make a synthetic raw dataset with known truth"),
    ("validate", "validate", "check a raw dataset folder and summarise it"),
    ("plan", "plan", "fingerprint -> plans -> preprocessing; write MIPs to annotate"),
    ("annotate", "annotate", "draw annotations in the browser, pre-filled from MIPs or models"),
    ("pseudolabel", "pseudolabel", "MIP drawings -> label set 'pseudo'"),
    ("propagate", "propagate", "one drawn slice per volume -> label set 'propagated'"),
    ("train", "train", "train one fold on a label set; out-of-fold predictions"),
    ("refine", "refine", "out-of-fold models clean a label set -> label set 'refined'"),
    ("find_best_configuration", "find_best_configuration", "best model or ensemble, and its postprocessing"),
    ("predict", "predict", "segment new images with a trained model (-d) or a package (-m)"),
    ("evaluate", "evaluate", "predictions vs truth -> summary.json"),
    ("analyze", "analyze", "vessel masks -> centrelines, branch graph, radii, STL"),
    ("export_model", "export_model", "pack a trained model into one zip"),
    ("install_model", "install_model", "install a model zip under MIPSEG_RESULTS"),
)
MULTI_VALUE_COMMANDS = ("predict", "export_model")  # nnU-Net style `-f 0 1 2`, as their scripts

app = typer.Typer(
    help="mipseg: self-configuring 3D segmentation trained from 2D annotations. "
    "`mipseg COMMAND -h` shows a command's flags; every command also exists as the script mipseg_COMMAND.",
    add_completion=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mipseg {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """mipseg: self-configuring 3D segmentation trained from 2D annotations."""


for _command, _module, _line in STAGES:
    _stage_app = importlib.import_module(f"mipseg.cli.{_module}").app
    (_registered,) = _stage_app.registered_commands  # every cli module holds exactly one command
    app.command(name=_command, help=_line + ".\n\n" + (_registered.callback.__doc__ or ""), short_help=_line)(
        _registered.callback
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in MULTI_VALUE_COMMANDS:
        argv = argv[:1] + expand_multi_value_options(argv[1:])
    if argv and argv[0] == "propagate":
        argv = argv[:1] + default_suggest_count(argv[1:])
    app(args=argv, prog_name="mipseg")
