"""Values from users reach the terminal as plain text (issue 16, item 18).

A strategy id with rich markup brackets used to crash ``world campaign``/``audit log`` for everyone
(exit 1), and ANSI escapes in a ``--reason`` reached an approver's terminal raw, where they can
erase or fake lines. Every renderer now goes through ``qmtl_cli._output.user_text``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qmtl_cli._output import Markup, control_escaped, table, user_text
from tests.cli_helpers import qmtl

EVIL_ID = "[/bold][red]evil"
# Erase the line, move up, and print a fake approval: what an attacker would put in a reason.
EVIL_REASON = "ok\x1b[2K\x1b[1A\rapproved by risk-officer\x9b31m\u202egnp.exe"


def test_user_text_escapes_markup_and_every_control_kind() -> None:
    from rich.console import Console

    out = user_text(EVIL_REASON + " " + EVIL_ID)
    assert "\x1b" not in out and "\r" not in out and "\x9b" not in out and "\u202e" not in out
    assert "\\x1b[2K" in out.replace("\\[", "[") and "\\x9b" in out and "\\u202e" in out
    console = Console(record=True, width=400, color_system=None)
    console.print(f"[bold]{out}[/bold]")  # would raise MarkupError for an unescaped closing tag
    printed = console.export_text()
    assert "[/bold][red]evil" in printed and "\\x1b[2K" in printed
    assert control_escaped("tab\there\nnew") == "tab\\x09here\\x0anew"
    assert user_text(None) == "-" and user_text(Markup("[red]x[/red]")) == "[red]x[/red]"


def test_table_cells_are_plain_unless_markup() -> None:
    from rich.console import Console

    console = Console(record=True, width=400, color_system=None)
    console.print(table(None, ["id", "status"], [[EVIL_ID, Markup("[green]pass[/green]")]]))
    text = console.export_text()
    assert EVIL_ID in text and "pass" in text and "[green]" not in text


@pytest.fixture
def evil_world(qmtl_env: dict[str, str], tmp_path: Path, cli_mode: str) -> str:
    metrics = tmp_path / "m.json"
    metrics.write_text(json.dumps({"x": {"sharpe": 1.2, "max_drawdown": 0.1}}))
    ran = qmtl("world", "evaluate", "demo-momentum", "--strategy", EVIL_ID, "--metrics", str(metrics))
    assert ran.exit_code == 10, ran.stderr  # recorded (the gate fails on missing history)
    assert EVIL_ID in ran.stdout
    halt = qmtl("world", "halt", "demo-momentum", "--reason", EVIL_REASON)
    assert halt.exit_code == 0, halt.stderr
    return "demo-momentum"


@pytest.mark.parametrize("argv", [
    ("world", "campaign", "demo-momentum"),
    ("world", "runs", "demo-momentum"),
    ("world", "decision", "demo-momentum"),
    ("audit", "log"),
])
def test_markup_in_ids_and_ansi_in_reasons_print_as_text(evil_world: str, argv: tuple[str, ...]) -> None:
    ran = qmtl(*argv)
    assert ran.exit_code == 0, ran.stderr
    assert EVIL_ID in ran.stdout
    for raw in ("\x1b", "\x9b", "\r", "\u202e"):
        assert raw not in ran.stdout and raw not in ran.stderr
    if argv[0] == "audit":
        assert "ok\\x1b[2K\\x1b[1A\\x0dapproved by risk-officer\\x9b31m\\u202egnp.exe" in ran.stdout
        # --json keeps the exact value (JSON escapes control characters itself)
        doc = qmtl(*argv, "--json").json()
        assert EVIL_REASON in [e["reason"] for e in doc["entries"]]


def test_error_lines_escape_control_characters(evil_world: str) -> None:
    ran = qmtl("world", "campaign", "demo-momentum", "--strategy", "nope\x1b[2K")
    assert ran.exit_code == 3
    assert "\x1b" not in ran.stderr and "\\x1b" in ran.stderr and ran.stderr.count("\n") == 1
