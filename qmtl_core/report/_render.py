"""Drawing a ``Report``: one self-contained HTML page, or PNG files of the charts."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qmtl_core.metric_names import is_portfolio_metric
from qmtl_core.report._assemble import KEY_METRICS, PERCENT_METRICS, Report, fmt, rank_key
from qmtl_core.report._paths import safe_name

#: ``progress(done, total, label)`` after each unit of work.
Progress = Callable[[int, int, str], None]

#: The world timeline shows at most this many (latest) entries; each strategy shows all of its own.
TIMELINE_LIMIT = 500
#: Activations listed before the rest fold away (live first, then by weight).
ACTIVATION_LIMIT = 25
STAGE_RANK = {"backtest": 0, "paper": 1, "live": 2, "retired": -1}
STATUS_RANK = {"fail": 0, "insufficient_data": 1, "no_run": 1, "warn": 2, "pass": 3}


def _environment() -> Any:
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(loader=PackageLoader("qmtl_core.report", "templates"),
                      autoescape=select_autoescape(["html", "j2"], default_for_string=True, default=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=_num, pct=_pct, pct1=_pct1, sortv=_sortv, heat=_heat, anchor=safe_name,
                       fraction=_fraction, link=_link)
    return env


def _link(strategy_id: str, full_ids: set[str]) -> Any:
    """The strategy's name, linked to its section when it is shown in full."""
    from markupsafe import Markup, escape

    if strategy_id in full_ids:
        return Markup('<a href="#s-{}">{}</a>').format(safe_name(strategy_id), strategy_id)
    return escape(strategy_id)


def _num(value: Any, digits: int = 4) -> str:
    return fmt(value, digits)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pct(value: Any) -> str:
    if not _finite(value):
        return "-"
    text = f"{value * 100:.1f}%"
    return "0.0%" if text == "-0.0%" else text  # a loss too small to show is not "-0.0%"


def _pct1(value: Any) -> str:
    return f"{value * 100:.1f}" if _finite(value) else ""


def _sortv(value: Any) -> str:
    return repr(float(value)) if _finite(value) else "-1e308"


def _heat(value: Any, scale: float) -> str:
    """Background for a monthly cell: green up, red down, stronger with size (to ``scale``)."""
    if not _finite(value) or scale <= 0:
        return ""
    alpha = min(1.0, abs(value) / scale) * 0.75 + 0.05
    rgb = "46,125,50" if value >= 0 else "198,40,40"
    return f"background:rgba({rgb},{alpha:.2f})"


def _fraction(p: dict[str, Any]) -> float:
    """How far a window is: the lesser of span and observations against their targets, 0..1."""
    window = p.get("window_seconds") or 0
    need = p.get("min_observations") or 0
    span = p["span_seconds"] / window if window else 1.0
    obs = p["n_observations"] / need if need else 1.0
    return max(0.0, min(1.0, span, obs))


def _write_bytes(path: Path, data: bytes) -> None:
    """Write atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as an ordinary new file, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def render_html(report: Report, *, progress: Progress | None = None) -> str:
    """The report as one self-contained HTML page."""
    from markupsafe import Markup

    from qmtl_core._version import __version__
    from qmtl_core.report._charts import StageComparison, TearSheet, sparkline_svg
    from qmtl_core.report._series import chain, downsample, equity, monthly_returns

    full = report.full
    total = len(full) + len(report.strategies)
    done = 0
    charts: dict[str, Any] = {}
    compare: dict[str, Any] = {}
    compare_pending: dict[str, Any] = {}
    monthly: dict[str, Any] = {}
    scale: dict[str, float] = {}
    with TearSheet(periods_per_year=int(report.policy.get("periods_per_year") or 252)) as sheet, \
            StageComparison() as stages:
        for i, s in enumerate(full):
            chained = chain(s.segments())
            charts[s.strategy_id] = Markup(sheet.svg(prefix=f"s{i}")) if sheet.draw(chained) else None
            if stages.draw(s.segments()):
                compare[s.strategy_id] = Markup(stages.svg(prefix=f"k{i}"))
                if s.pending:  # a second copy, its own ids, in the approval view at the top of the page
                    compare_pending[s.strategy_id] = Markup(stages.svg(prefix=f"a{i}"))
            rows = monthly_returns(chained)
            monthly[s.strategy_id] = rows
            values = [abs(m) for row in rows for m in row["months"] if m is not None]
            scale[s.strategy_id] = max(values) if values else 0.0
            done += 1
            if progress is not None:
                progress(done, total, s.strategy_id)
    sparks: dict[str, Any] = {}
    for s in report.strategies:
        chained = chain(s.segments())
        sparks[s.strategy_id] = Markup(sparkline_svg(downsample(equity(chained.returns), 60), status=s.status)) \
            if len(chained) else ""
        done += 1
        if progress is not None and (done % 50 == 0 or done == total):
            progress(done, total, "summary")
    timeline = report.timeline[-TIMELINE_LIMIT:]
    return _environment().get_template("report.html.j2").render(
        r=report, full=full, summary=sorted(report.strategies, key=lambda s: rank_key(s, report.rank_order)),
        charts=charts, compare=compare, compare_pending=compare_pending, monthly=monthly, scale=scale, sparks=sparks,
        timeline=list(reversed(timeline)), timeline_cut=len(timeline) < len(report.timeline),
        full_ids={s.strategy_id for s in full}, activation_limit=ACTIVATION_LIMIT,
        activations=sorted(report.activations, key=lambda a: (a.get("stage") != "live", -float(a.get("weight") or 0),
                                                              a["strategy_id"])),
        key_metrics=KEY_METRICS, percent_metrics=PERCENT_METRICS, stage_rank=_Default(STAGE_RANK, -1), status_rank=_Default(STATUS_RANK, 1),
        portfolio_metric=is_portfolio_metric, version=__version__)


class _Default(dict):  # type: ignore[type-arg]
    """A mapping with a default for unknown keys (so a new stage or status never breaks the page)."""

    def __init__(self, values: dict[str, int], default: int) -> None:
        super().__init__(values)
        self.default = default

    def __missing__(self, key: str) -> int:
        return self.default


def write_html(report: Report, path: Path, *, progress: Progress | None = None) -> Path:
    """Render and write the page atomically (a reader never sees half a file)."""
    _write_bytes(path, render_html(report, progress=progress).encode("utf-8"))
    return path


def render_pngs(report: Report, *, progress: Progress | None = None) -> dict[str, bytes]:
    """The charts of every strategy shown in full as PNG images, by file name:
    ``<strategy>.png`` (equity, drawdown, rolling Sharpe), ``<strategy>-monthly.png``, and
    ``<strategy>-stages.png`` (later stages zoomed, return distributions) when it has a later stage."""
    import io

    from qmtl_core.report._charts import StageComparison, TearSheet, monthly_png
    from qmtl_core.report._series import chain

    images: dict[str, bytes] = {}
    full = report.full
    with TearSheet(periods_per_year=int(report.policy.get("periods_per_year") or 252)) as sheet, \
            StageComparison() as stages:
        for i, s in enumerate(full):
            chained = chain(s.segments())
            name = safe_name(s.strategy_id)
            if stages.draw(s.segments()):
                buf = io.BytesIO()
                stages.png(buf)
                images[f"{name}-stages.png"] = buf.getvalue()
            if sheet.draw(chained):
                buf = io.BytesIO()
                sheet.png(buf)
                images[f"{name}.png"] = buf.getvalue()
                buf = io.BytesIO()
                if monthly_png(chained, buf, f"{report.world} / {s.strategy_id}: monthly returns (%)"):
                    images[f"{name}-monthly.png"] = buf.getvalue()
            if progress is not None:
                progress(i + 1, len(full), s.strategy_id)
    return images


def write_files(directory: Path, files: dict[str, bytes]) -> list[Path]:
    """Write ``files`` (name: content) into ``directory``, each atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in files.items():
        if Path(name).name != name or name.startswith("."):  # a name from a server: no paths, no hidden files
            from qmtl_core.errors import BadInputError

            raise BadInputError(f"refusing to write report file {name!r}: not a plain file name",
                                hint="the server sent it; check that --server is a qmtl serve")
        _write_bytes(directory / name, data)
        written.append(directory / name)
    return written


def write_pngs(report: Report, directory: Path, *, progress: Progress | None = None) -> list[Path]:
    """``render_pngs`` written into ``directory``."""
    return write_files(directory, render_pngs(report, progress=progress))
