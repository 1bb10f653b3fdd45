"""The root ``qmtl`` command: global options and the command groups."""

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer import _click as click  # typer vendors click; its exceptions live here (typer >= 0.2x)
from typer.core import TyperGroup

from qmtl_cli._state import CliState, set_current
from qmtl_cli.commands import audit, campaign, config, governance, report, risk, serve, world, world_evaluate  # noqa: F401 (registers commands)
from qmtl_cli.commands import submit, world_policy  # noqa: F401 (registers commands)

_TRUE = {"1", "true", "t", "yes", "y", "on"}
#: Whether this invocation asked for JSON (``--json`` anywhere, or QMTL_JSON), known before parsing.
_json_requested = False


def json_requested(argv: list[str]) -> bool:
    """``--json`` among the options (not after ``--``), or a true ``QMTL_JSON``."""
    options = argv[: argv.index("--")] if "--" in argv else argv
    return "--json" in options or os.environ.get("QMTL_JSON", "").strip().lower() in _TRUE


class QmtlGroup(TyperGroup):
    """The root command: with ``--json``, a usage error is one JSON document on stdout (and one line on
    stderr), like every other error, instead of click's usage block."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        global _json_requested
        argv = list(sys.argv[1:] if args is None else args)
        _json_requested = json_requested(argv)
        if not _json_requested:
            return super().main(argv, prog_name, complete_var, standalone_mode, **extra)
        try:
            result = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.ClickException as exc:
            code = 2 if isinstance(exc, click.exceptions.UsageError) else exc.exit_code
            where = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) else ""
            from qmtl_cli._runtime import report_error

            report_error(message=exc.format_message() + where, exit_code=code, json_mode=True,
                         payload={"error": "usage", "message": exc.format_message(), "exit_code": code})
            result = code
        except click.exceptions.Abort:
            sys.stderr.write("qmtl: aborted\n")
            result = 1
        if not standalone_mode:
            return result
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    name="qmtl",
    cls=QmtlGroup,
    help="Take trading strategies from backtest to paper to live, world by world, under YAML policies.",
    no_args_is_help=True,
    add_completion=True,
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

        if _json_requested:
            typer.echo(json.dumps({"version": __version__}))
        else:
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
