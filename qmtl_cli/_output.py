"""Rendering: one JSON document on stdout with ``--json``, rich text otherwise."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

STATUS_STYLE = {"pass": "green", "ok": "green", "warn": "yellow", "fail": "red", "invalid": "red"}

# C0/C1 controls (ESC starts ANSI sequences; 0x9b is a one-byte CSI), DEL, and the Unicode marks
# that reorder or break a line (bidi overrides and isolates, line/paragraph separators): any of
# them in an id or a reason could hide, recolour or fake what an approver reads.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


class Markup(str):
    """Text that is rich markup on purpose (qmtl's own colours); every other value is escaped."""


def _escape_control(match: "re.Match[str]") -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def control_escaped(value: Any) -> str:
    """``value`` as text with every control character shown as an escape (``\\x1b``), for streams
    written without rich (error lines on stderr)."""
    return _CONTROLS.sub(_escape_control, "-" if value is None else str(value))


def user_text(value: Any) -> str:
    """The one way a value from users or the store reaches the terminal: plain text, never markup
    (``[/bold]`` prints as typed) and never raw control characters (``\\x1b[2K`` prints visibly).

    Every renderer interpolates values through this; only literal markup in qmtl's own format
    strings (or a ``Markup`` value) styles the output.
    """
    if isinstance(value, Markup):
        return value
    from rich.markup import escape

    return escape(control_escaped(value))


def console(*, stderr: bool = False) -> "Console":
    """A rich console; colours only on a TTY (rich checks) and never with NO_COLOR."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Piped output is for scripts and files: never truncate or wrap it at 80 columns.
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 240
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=width)


def emit(data: Any, *, json_mode: bool, human: Callable[["Console"], None]) -> None:
    """Print ``data`` as JSON, or call ``human`` with a console."""
    if json_mode:
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
        sys.stdout.flush()
    else:
        human(console())


def table(title: str | None, columns: list[str], rows: list[list[Any]]) -> Any:
    """A rich table; each cell is shown as plain text (``None`` as ``-``) unless it is ``Markup``."""
    from rich.table import Table

    t = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for name in columns:
        t.add_column(name)
    for row in rows:
        t.add_row(*[user_text(v) for v in row])
    return t


def styled(status: str) -> Markup:
    """``status`` wrapped in its colour markup."""
    style = STATUS_STYLE.get(status)
    text = user_text(status)
    return Markup(f"[{style}]{text}[/{style}]" if style else text)
