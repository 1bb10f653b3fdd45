"""``qmtl audit``: read and verify the hash-chained ledger."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from qmtl_cli._output import emit, table
from qmtl_cli._runtime import JsonOption, command
from qmtl_cli._state import state

app = typer.Typer(help="Read and verify the audit ledger.", no_args_is_help=True)


@app.command("log")
@command
def log(
    ctx: typer.Context,
    world: Annotated[Optional[str], typer.Option("--world", "-w", help="Only this world.")] = None,
    since: Annotated[Optional[str], typer.Option(
        "--since", help="Only entries at or after this time (ISO-8601, e.g. 2026-01-31T00:00Z).")] = None,
    kind: Annotated[Optional[str], typer.Option(
        "--kind", help="Only this kind; '*' is a wildcard (e.g. 'policy.*').")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", "-n", min=1,
                                                 help="Only the newest N entries.")] = None,
    json_output: JsonOption = False,
) -> None:
    """Show ledger entries, oldest first: who did what, to which world, and why."""
    from qmtl_core.timeutil import parse_instant

    since_at = parse_instant(since, what="--since") if since else None
    doc = state(ctx).client().audit_log(world=world, since=since_at, kind=kind, limit=limit)
    entries = doc["entries"]
    emit(doc, json_mode=state(ctx).json,
         human=lambda c: c.print(table(None, ["seq", "time", "actor", "world", "kind", "subject", "reason"],
                                       [[e["seq"], e["ts"][:19] + "Z", e["actor"], e["world"], e["kind"],
                                         e["subject"], e["reason"]] for e in entries]))
         if entries else c.print("no ledger entries match"))


@app.command("verify")
@command
def verify(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """Check the ledger's hash chain; exit 4 naming the first broken entry."""
    result = state(ctx).client().audit_verify()
    emit(result, json_mode=state(ctx).json,
         human=lambda c: c.print(f"[green]ok[/green]: {result['entries']} ledger entries verify"))
