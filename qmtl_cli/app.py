"""The root ``qmtl`` command: global options and the command groups."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from qmtl_cli._state import CliState, set_current
from qmtl_cli.commands import audit, campaign, config, governance, report, risk, serve, world, world_evaluate  # noqa: F401 (registers commands)
from qmtl_cli.commands import submit, world_policy  # noqa: F401 (registers commands)

app = typer.Typer(
    name="qmtl",
    help="Take trading strategies from backtest to paper to live, world by world, under YAML policies.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Exit codes: 0 done, 1 bug, 2 bad input, 3 not found, 4 conflict, 10 blocked by policy, "
           "11 waiting, 12 fail-closed, 75 busy.",
)
governance.register(app)
serve.register(app)
app.add_typer(world.app, name="world")
app.add_typer(risk.app, name="risk")
app.add_typer(audit.app, name="audit")
app.add_typer(config.app, name="config")
app.command("submit")(submit.submit_command)
app.command("run")(submit.run_command)


def _version(value: bool) -> None:
    if value:
        from qmtl_core._version import __version__

        typer.echo(f"qmtl {__version__}")
        raise typer.Exit(0)


@app.callback()
def root(
    ctx: typer.Context,
    home: Annotated[Optional[Path], typer.Option(
        "--home", envvar="QMTL_HOME", help="Where qmtl keeps its store and config [default: ~/.qmtl].",
        show_default=False)] = None,
    worlds_dir: Annotated[Optional[Path], typer.Option(
        "--worlds-dir", envvar="QMTL_WORLDS_DIR",
        help="Directory of world policy files [default: ./worlds].", show_default=False)] = None,
    server: Annotated[Optional[str], typer.Option(
        "--server", envvar="QMTL_SERVER", help="URL of a `qmtl serve` (remote mode).")] = None,
    json_output: Annotated[bool, typer.Option(
        "--json", envvar="QMTL_JSON", help="Print one JSON document on stdout.")] = False,
    debug: Annotated[bool, typer.Option(
        "--debug", envvar="QMTL_DEBUG", help="Show tracebacks for errors.")] = False,
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Global options apply to every command."""
    state = CliState(home=home, worlds_dir=worlds_dir, server=server, json=json_output, debug=debug)
    ctx.obj = state
    set_current(state)


def main() -> None:
    """Console-script entry point."""
    from qmtl_core.process import tune_gc

    tune_gc()
    app(prog_name="qmtl")
