"""Where reports go by default: ``$QMTL_HOME/reports/<world>.html`` for a world and
``$QMTL_HOME/reports/<world>/<strategy>.html`` for one strategy (PNG charts in a ``-charts``
directory beside them). Import-light: ``qmtl promote --list`` uses it to name each request's report."""

from __future__ import annotations

import re
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def safe_name(text: str) -> str:
    """``text`` usable as a file name (anything but letters, digits, ``_.-`` becomes ``_``)."""
    name = _UNSAFE.sub("_", text).lstrip(".")
    return name or "_"


def default_report_path(home: Path, world: str, strategy: str | None = None, fmt: str = "html") -> Path:
    """The file (``html``) or directory (``png``) ``qmtl world report`` writes when no ``--out`` is given."""
    base = home / "reports"
    stem = base / safe_name(world) if strategy is None else base / safe_name(world) / safe_name(strategy)
    return stem.with_name(stem.name + ".html") if fmt == "html" else stem.with_name(stem.name + "-charts")


def report_command(world: str, strategy: str | None = None) -> str:
    """The command line that writes that default report."""
    return f"qmtl world report {world}" + (f" --strategy {strategy}" if strategy else "")


def request_report(home: Path, world: str, strategy: str, evidence_hash: str) -> dict[str, str]:
    """Where the report of a pending request's strategy is, whether it shows that request's
    evidence (``current``), older evidence (``stale``) or is not written yet, and how to write it."""
    path = default_report_path(home, world, strategy)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        state = "not written"
    else:
        state = "current" if evidence_hash and evidence_hash in text else "stale"
    return {"path": str(path), "state": state, "command": report_command(world, strategy)}
