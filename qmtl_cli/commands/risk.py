"""``qmtl risk``: the risk signal hub — post and read a world's risk snapshots."""

import sys
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from qmtl_cli._output import emit, table, user_text as t
from qmtl_cli._runtime import JsonOption, command
from qmtl_cli._state import state

if TYPE_CHECKING:
    from rich.console import Console

app = typer.Typer(help="Post and read risk snapshots (the hub stores; producers compute).",
                  no_args_is_help=True)


@app.command("put")
@command
def put(
    ctx: typer.Context,
    file: Annotated[str, typer.Argument(help="Snapshot JSON file, or - for stdin.")],
    json_output: JsonOption = False,
) -> None:
    """Store a snapshot. The same (world, version) and content again is a no-op (exit 0); the
    same key with other content is a conflict (exit 4)."""
    from pathlib import Path

    from qmtl_core.errors import DataFileError
    from qmtl_core.risk import json_document

    if file == "-":
        text, source = sys.stdin.read(), "<stdin>"
    else:
        try:
            text, source = Path(file).read_text(encoding="utf-8"), file
        except FileNotFoundError:
            raise DataFileError(f"{file}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise DataFileError(f"{file}: cannot read ({exc})") from None
    document = json_document(text, source=source)
    data = state(ctx).client().risk_put(document, source=source)
    emit(data, json_mode=state(ctx).json,
         human=lambda c: c.print(t(
             f"stored risk snapshot {data['world']} version {data['version']} "
             f"(hash {data['content_hash'][:12]})" if data["created"] else
             f"unchanged: risk snapshot {data['world']} version {data['version']} is already "
             "stored with this content")))


@app.command("show")
@command
def show(
    ctx: typer.Context,
    world: Annotated[str, typer.Argument(help="World name.")],
    version: Annotated[Optional[str], typer.Option("--version", help="A stored version [default: "
                                                                     "the newest as_of].")] = None,
    json_output: JsonOption = False,
) -> None:
    """Show a world's risk snapshot and whether it is fresh enough to decide on now."""
    doc = state(ctx).client().risk_show(world, version=version)
    fresh = doc["freshness"]

    def human(c: "Console") -> None:
        colour = "green" if fresh["ok"] else "red"
        c.print(f"[bold]{t(world)}[/bold] risk snapshot {t(doc['version'])}  as_of {t(doc['as_of'])}  "
                f"ttl {t(doc['ttl_sec'])}s  [{colour}]{t(fresh['status'])}[/{colour}]"
                + (t(f" ({fresh['reason']}: {fresh['detail']})") if fresh["reason"] else ""))
        c.print(t(f"received {doc['recorded_at']} from {doc['recorded_by']}; produced by "
                  f"{doc['provenance']['actor']} for stage {doc['provenance']['stage']}; "
                  f"hash {doc['content_hash'][:12]}"))
        realized = doc.get("realized_returns") or {}
        c.print(table(None, ["strategy", "weight", "realized returns"],
                      [[s, f"{w:.4f}", len(realized.get(s, [])) or "-"]
                       for s, w in sorted(doc["weights"].items())]))

    emit(doc, json_mode=state(ctx).json, human=human)
