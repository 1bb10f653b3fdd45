"""The command wrapper: applies ``--json``, maps errors to one line and an exit code."""

from __future__ import annotations

import functools
import json
import sys
import traceback
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from qmtl_cli._state import state

F = TypeVar("F", bound=Callable[..., Any])

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
AllowLiveOption = Annotated[bool, typer.Option(
    "--allow-live", help="Confirm you mean to change what is live (sends X-Allow-Live: true). Without it a "
                         "call that would make or keep a strategy live changes nothing, says what it would "
                         "have done and exits 10. Config allow_live=true (QMTL_ALLOW_LIVE) sets it for cron.")]


def report_error(*, message: str, exit_code: int, payload: dict[str, Any], json_mode: bool) -> None:
    """Print an error: JSON on stdout in ``--json`` mode, and always one line on stderr."""
    if json_mode:
        sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    from qmtl_cli._output import control_escaped

    # The message may quote user input (an id, a reason): never let it drive the terminal.
    sys.stderr.write(f"qmtl: error: {control_escaped(message)}\n")
    sys.stderr.flush()


def command(fn: F) -> F:
    """Wrap a command: honour its ``json_output`` flag and turn errors into exit codes.

    A ``QmtlError`` prints its one line and exits with its family's code; anything else is a bug:
    one line, exit 1, and the traceback only with ``--debug``.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from qmtl_core.errors import QmtlError

        st = state(kwargs.get("ctx"))
        if kwargs.get("json_output"):
            st.json = True
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except QmtlError as exc:
            if st.debug:
                traceback.print_exc()
            report_error(message=exc.one_line(), exit_code=exc.exit_code, payload=exc.to_dict(),
                         json_mode=st.json)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            sys.stderr.write("qmtl: interrupted\n")
            raise typer.Exit(130) from None
        except Exception as exc:  # a bug: say so in one line, never a bare traceback
            if st.debug:
                traceback.print_exc()
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            message = (f"internal error: {type(exc).__name__}: {first} "
                       "(a bug in qmtl; rerun with --debug for the traceback)")
            report_error(message=message, exit_code=1,
                         payload={"error": "internal_error", "message": message, "exit_code": 1},
                         json_mode=st.json)
            raise typer.Exit(1) from None
        finally:
            st.close()

    return wrapper  # type: ignore[return-value]
