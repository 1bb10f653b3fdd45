"""Rendering: one JSON document on stdout with ``--json``, rich text otherwise."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

STATUS_STYLE = {"pass": "green", "ok": "green", "warn": "yellow", "fail": "red", "invalid": "red"}


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
    """A rich table with plain string cells (``None`` shown as ``-``)."""
    from rich.table import Table

    t = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for name in columns:
        t.add_column(name)
    for row in rows:
        t.add_row(*["-" if v is None else str(v) for v in row])
    return t


def styled(status: str) -> str:
    """``status`` wrapped in its colour markup."""
    style = STATUS_STYLE.get(status)
    return f"[{style}]{status}[/{style}]" if style else status
