"""``qmtl world report``: a self-contained HTML report of a world (or its charts as PNG files)."""

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from qmtl_cli._output import console, emit, user_text as t
from qmtl_cli._runtime import JsonOption, command
from qmtl_cli._state import state
from qmtl_cli.commands.world import app

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from rich.console import Console

FORMATS = ("html", "png")


@contextmanager
def _progress(enabled: bool) -> "Iterator[Callable[..., None]]":
    """A rich progress bar on stderr (only on a terminal); yields ``update(done, total, label)``."""
    if not enabled:
        yield lambda *args, **kw: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console(stderr=True), transient=True) as bar:
        task = bar.add_task("reading", total=None)

        def update(done: int | None = None, total: int | None = None, label: str = "") -> None:
            bar.update(task, completed=done or 0, total=total, description=label[:40])

        yield update


@app.command("report")
@command
def report(
    ctx: typer.Context,
    world: Annotated[str, typer.Argument(help="World name.")],
    strategy: Annotated[Optional[str], typer.Option("--strategy", "-s", help="Only this strategy (its id or any unique prefix).")] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Where to write: the HTML file, or with --format png a directory "
                            "[default: $QMTL_HOME/reports/<world>.html, or <world>/<strategy>.html].",
        show_default=False)] = None,
    at: Annotated[Optional[str], typer.Option(
        "--at", help="Report as of a moment (ISO-8601 with zone, e.g. 2026-01-31T00:00Z): runs recorded by "
                     "then, activations and decisions from the ledger [default: now].")] = None,
    fmt: Annotated[str, typer.Option("--format", help="html (one self-contained page) or png (the charts as "
                                                      "PNG files, for tickets and chat).")] = "html",
    top: Annotated[int, typer.Option("--top", min=1, help="In a big world, show the top and bottom N by the "
                                                          "ranking metric in full (live strategies and those "
                                                          "awaiting approval always are).")] = 10,
    json_output: JsonOption = False,
) -> None:
    """Write a report of a world: equity (backtest, paper, live), drawdown, rolling Sharpe, monthly returns,
    gates, campaign windows, activations, the decision timeline and pending requests' evidence hashes.

    The HTML page is self-contained (inline SVG charts, CSS and script; it makes no network request).
    With --server the server reads its store and renders the report; the files are written here.
    Exit 0 (also for a world with no strategies yet: nothing is written), 3 for an unknown world or
    strategy, 2 for a bad option.
    """
    from qmtl_core.errors import UsageError

    if fmt not in FORMATS:
        raise UsageError(f"unknown --format {fmt!r}", hint="use html or png")
    if fmt == "png" and out is not None and out.suffix.lower() in (".html", ".htm"):
        raise UsageError("--format png writes PNG files into a directory; --out names that directory",
                         hint=f"e.g. --out {out.with_suffix('')}-charts")
    from qmtl_core.report import default_report_path
    from qmtl_core.report._document import CONTENT_KEYS, save_report
    from qmtl_core.timeutil import parse_instant

    from qmtl_cli._ids import strategy_id

    st = state(ctx)
    when = parse_instant(at, what="--at") if at else None
    client = st.client()
    strategy = strategy_id(st, world, strategy)
    with _progress(not st.json and sys.stderr.isatty()) as update:
        update(0, None, f"reading {world}" if st.settings().server is None else f"rendering {world} on the server")
        report_doc = client.report(world, strategy_id=strategy, at=when, top=top, fmt=fmt, progress=update)
        summary = {k: v for k, v in report_doc.items() if k not in CONTENT_KEYS}
        if not summary["strategies_total"]:
            stamp = summary.get("at")
            message = (f"world {world} had no strategy with a recorded run at {stamp}: nothing to report"
                       if stamp else f"world {world} has no strategies yet: nothing to report (submit one, "
                                     "or record a run with qmtl world evaluate --strategy)")
            emit({"world": world, "at": stamp, "format": fmt, "path": None, "files": [],
                  "strategies_total": 0, "message": message}, json_mode=st.json,
                 human=lambda c: c.print(t(message)))
            return
        target = out if out is not None else default_report_path(st.settings().home, world, strategy, fmt)
        files = save_report(report_doc, target)
    doc: dict[str, Any] = {"format": fmt, "path": str(target), "files": [str(f) for f in files], **summary}
    at_label = summary.get("at")
    shown = len(summary["strategies_in_full"])
    total = summary["strategies_total"]

    def human(c: "Console") -> None:
        what = "report" if fmt == "html" else f"{len(files)} PNG files in"
        c.print(t(f"wrote {what} {target}  ({total} {'strategy' if total == 1 else 'strategies'}, {shown} in full"
                  + (f", as of {at_label}" if at_label else "") + ")"), highlight=False)
        for p in summary["pending_requests"]:
            c.print(t(f"  pending {p['request_id']} {p['strategy_id']}: evidence {p['evidence_hash']}"))

    emit(doc, json_mode=st.json, human=human)
