"""The report as one JSON document, the same in-process and over HTTP: the summary ``--json``
prints, plus the rendered page (``html``) or the charts (``png``: file name -> base64 PNG)."""

from __future__ import annotations

import base64
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qmtl_core.report._render import Progress
    from qmtl_core.service import WorldService

FORMATS = ("html", "png")
#: Keys of the document that carry the rendered content (not printed with ``--json``).
CONTENT_KEYS = ("html", "png")


def report_document(service: "WorldService", world: str, *, strategy: str | None = None,
                    at: datetime | None = None, top: int = 10, fmt: str = "html",
                    progress: "Progress | None" = None) -> dict[str, Any]:
    """Collect and render the report of ``world``; a world with nothing to report has no content."""
    from qmtl_core.errors import UsageError
    from qmtl_core.report._collect import collect

    if fmt not in FORMATS:
        raise UsageError(f"unknown --format {fmt!r}", hint="use html or png")
    data = collect(service, world, strategy=strategy, at=at, top=top)
    doc: dict[str, Any] = {"format": fmt, **data.to_dict()}
    if not data.strategies:
        return doc
    if fmt == "html":
        from qmtl_core.report._render import render_html

        doc["html"] = render_html(data, progress=progress)
    else:
        from qmtl_core.report._render import render_pngs

        doc["png"] = {name: base64.b64encode(image).decode("ascii")
                      for name, image in render_pngs(data, progress=progress).items()}
    return doc


def save_report(doc: dict[str, Any], target: Path) -> list[Path]:
    """Write a report document's content: the page to ``target``, or the charts into it (a directory)."""
    from qmtl_core.report._render import _write_bytes, write_files

    if doc.get("html") is not None:
        _write_bytes(target, str(doc["html"]).encode("utf-8"))
        return [target]
    return write_files(target, {name: base64.b64decode(data) for name, data in (doc.get("png") or {}).items()})
