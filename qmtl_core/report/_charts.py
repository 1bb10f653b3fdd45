"""Charts: one matplotlib figure reused for every strategy (Agg canvas, SVG or PNG out) and
hand-built SVG sparklines for the summary table.

Creating a matplotlib figure costs more than drawing one, so ``TearSheet`` builds its figure, axes
and lines once and, per strategy, only moves data into them (``Line2D.set_data``), swaps the
drawdown fills and rescales. Text is kept as SVG ``<text>`` (no embedded glyphs, no fonts to
fetch), matplotlib's metadata block is dropped and element ids are prefixed per chart, so many
charts can live inline in one HTML page with no reference outside it.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO, Self

import numpy as np

from qmtl_core.report._series import (STAGE_ORDER, Chained, chain, downsample, equity, monthly_returns,
                                      rolling_sharpe, underwater)

COLOURS = {"backtest": "#4c72b0", "paper": "#dd8452", "shadow": "#8172b3", "live": "#2ca02c"}
#: The stages an approval is decided on, each compared with the backtest on its own scale.
LATER_STAGES = ("paper", "shadow", "live")
STATUS_COLOURS = {"pass": "#2e7d32", "warn": "#b26a00", "fail": "#c62828"}
ROLLING = 63
#: Longest series drawn point for point; longer ones keep every k-th point (the ends are kept).
MAX_POINTS = 1500

_RC: Any = {"svg.fonttype": "none", "svg.hashsalt": "qmtl-report", "font.size": 8.5, "axes.titlesize": 9,
       "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.25,
       "path.simplify": True, "path.simplify_threshold": 0.5, "legend.frameon": False,
       "font.family": ["DejaVu Sans", "sans-serif"]}

_ID = re.compile(r'\bid="([^"]+)"')
_REF = re.compile(r'(url\(#|href="#)')


def clean_svg(text: str, prefix: str) -> str:
    """Matplotlib's SVG made fit for inlining: no XML prolog, doctype, metadata or namespace URLs,
    ids (and references to them) prefixed so several charts never share one."""
    start = text.find("<svg")
    text = text[start:] if start >= 0 else text
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)
    text = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", text)
    text = text.replace("xlink:href=", "href=")
    text = _ID.sub(lambda m: f'id="{prefix}-{m.group(1)}"', text)
    return _REF.sub(lambda m: f"{m.group(1)}{prefix}-", text)


class _Chart:
    """One matplotlib figure under qmtl's settings (``_RC``, restored by ``close``), drawn again per
    strategy and written as inline SVG (``clean_svg``) or PNG."""

    prefix = "c"

    def __init__(self, size: tuple[float, float], dpi: int) -> None:
        from matplotlib import rc_context
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self._rc = rc_context(_RC)
        self._rc.__enter__()
        # Fixed margins, no layout engine: a layout pass per strategy would cost as much as drawing.
        self.fig = Figure(figsize=size, dpi=dpi)
        FigureCanvasAgg(self.fig)
        self._count = 0

    def close(self) -> None:
        """Restore matplotlib's settings."""
        self._rc.__exit__(None, None, None)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def svg(self, prefix: str | None = None) -> str:
        """The figure as inline SVG markup: no date or creator, ids prefixed."""
        self._count += 1
        buf = io.StringIO()
        self.fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
        return clean_svg(buf.getvalue(), prefix or f"{self.prefix}{self._count}")

    def png(self, path: Path | BinaryIO) -> None:
        """The figure as a PNG (a file, or a binary stream)."""
        self.fig.savefig(path, format="png", dpi=110, metadata={"Software": None})


class TearSheet(_Chart):
    """Equity (stage-coloured), underwater drawdown and rolling Sharpe of one strategy, as one
    three-panel figure sharing the x axis. Build once, ``draw`` per strategy."""

    def __init__(self, *, periods_per_year: int = 252, window: int = ROLLING, size: tuple[float, float] = (9.0, 5.4),
                 dpi: int = 100) -> None:
        super().__init__(size, dpi)
        self.ppy, self.window = periods_per_year, window
        self.ax_eq, self.ax_dd, self.ax_sr = self.fig.subplots(3, 1, sharex=True,
                                                               gridspec_kw={"height_ratios": [2.3, 1, 1]})
        self.fig.subplots_adjust(left=0.075, right=0.965, top=0.955, bottom=0.06, hspace=0.32)
        for ax, title in ((self.ax_eq, "equity (growth of 1)"), (self.ax_dd, "underwater drawdown"),
                          (self.ax_sr, f"rolling {window}-period Sharpe (annualised)")):
            ax.text(0.0, 1.02, title, transform=ax.transAxes, ha="left", va="bottom", fontsize=9)
        self.eq = {s: self.ax_eq.plot([], [], color=COLOURS[s], lw=1.2, label=s)[0] for s in STAGE_ORDER}
        self.dd = {s: self.ax_dd.plot([], [], color=COLOURS[s], lw=0.8)[0] for s in STAGE_ORDER}
        self.sr = {s: self.ax_sr.plot([], [], color=COLOURS[s], lw=1.0)[0] for s in STAGE_ORDER}
        self.ax_sr.axhline(0.0, color="#888888", lw=0.6)
        self.ax_eq.axhline(1.0, color="#888888", lw=0.6)
        self.marks = [[ax.axvline(0, color="#999999", lw=0.8, ls="--", visible=False) for _ in range(2)]
                      for ax in (self.ax_eq, self.ax_dd, self.ax_sr)]
        self.ax_dd.yaxis.set_major_formatter(_percent())
        self.fills: list[Any] = []
        self.legend: Any = None

    def draw(self, chained: Chained) -> bool:
        """Move one strategy's series into the figure; ``False`` when it has no returns."""
        n = len(chained)
        if n == 0:
            return False
        r = chained.returns
        wealth = equity(r)
        dd = underwater(wealth)
        sr = rolling_sharpe(r, self.window, self.ppy)
        step = max(1, math.ceil(n / MAX_POINTS))
        for f in self.fills:
            f.remove()
        self.fills = []
        for i, stage in enumerate(STAGE_ORDER):
            if stage not in chained.stages:
                for line in (self.eq[stage], self.dd[stage], self.sr[stage]):
                    line.set_data([], [])
                continue
            k = chained.stages.index(stage)
            lo, hi = chained.bounds[k], chained.bounds[k + 1]
            start = max(0, lo - 1)  # join the previous segment's last point: one unbroken curve
            x = np.arange(start, hi)
            if step > 1:
                x = np.unique(np.concatenate((x[::step], x[-1:])))
            self.eq[stage].set_data(x, wealth[x])
            self.dd[stage].set_data(x, dd[x])
            self.sr[stage].set_data(x, sr[x])
            self.fills.append(self.ax_dd.fill_between(x, dd[x], 0.0, color=COLOURS[stage], alpha=0.35, lw=0))
        for row in self.marks:
            for j, line in enumerate(row):
                if j + 1 < len(chained.stages):
                    line.set_xdata([chained.bounds[j + 1] - 0.5] * 2)
                    line.set_visible(True)
                else:
                    line.set_visible(False)
        for ax in (self.ax_eq, self.ax_dd, self.ax_sr):
            ax.relim()
            ax.autoscale_view()
        self.ax_eq.set_xlim(0, max(n - 1, 1))
        if not np.isfinite(sr).any():
            self.ax_sr.set_ylim(-1, 1)
        ticks = _ticks(chained)
        self.ax_sr.set_xticks(ticks, [chained.timestamps[t][:7] for t in ticks])
        if self.legend is not None:
            self.legend.remove()
        labels = []
        for k, stage in enumerate(chained.stages):
            part = chained.segment(k)
            labels.append((self.eq[stage], f"{stage} {chained.timestamps[part][0][:10]} … "
                                           f"{chained.timestamps[part][-1][:10]} ({part.stop - part.start} obs)"))
        self.legend = self.ax_eq.legend([h for h, _ in labels], [t for _, t in labels], loc="upper left",
                                        fontsize=7.5)
        return True


class StageComparison(_Chart):
    """The later stages next to the backtest, where the whole-history chart leaves them a sliver:

    - left, **zoomed**: each later stage's equity (growth of 1) over its own observations, with the
      backtest's last ``n`` returns (``n`` the longest later stage) rebased to 1 on the same axes;
    - right, **distributions**: the empirical CDF of per-period returns of every stage, backtest
      included, on one x axis (a quantile plot: the step at x is the share of returns <= x), which
      reads on 10 observations where a histogram would not.
    """

    prefix = "k"

    def __init__(self, *, size: tuple[float, float] = (9.0, 3.0), dpi: int = 100) -> None:
        super().__init__(size, dpi)
        self.ax_zoom, self.ax_dist = self.fig.subplots(1, 2)
        self.fig.subplots_adjust(left=0.07, right=0.98, top=0.86, bottom=0.16, wspace=0.22)

    def draw(self, segments: dict[str, list[list[Any]]]) -> bool:
        """Draw one strategy's stages; ``False`` when it has no later stage with returns."""
        later = {s: np.array([float(p[1]) for p in segments.get(s) or []], dtype=np.float64) for s in LATER_STAGES}
        later = {s: r for s, r in later.items() if r.size}
        if not later:
            return False
        back = np.array([float(p[1]) for p in segments.get("backtest") or []], dtype=np.float64)
        for ax in (self.ax_zoom, self.ax_dist):
            ax.clear()
        n = max(r.size for r in later.values())
        tail = back[-n:]
        if tail.size:
            self.ax_zoom.plot(np.arange(tail.size + 1), np.concatenate(([1.0], equity(tail))), color=COLOURS["backtest"],
                              lw=1.0, ls="--", label=f"backtest, last {tail.size} obs")
        for stage, r in later.items():
            self.ax_zoom.plot(np.arange(r.size + 1), np.concatenate(([1.0], equity(r))), color=COLOURS[stage],
                              lw=1.4, label=f"{stage} ({r.size} obs)")
        self.ax_zoom.axhline(1.0, color="#888888", lw=0.6)
        self.ax_zoom.set_xlabel("observations in the stage", fontsize=8)
        self.ax_zoom.legend(loc="upper left", fontsize=7.5)
        self.ax_zoom.text(0.0, 1.03, "later stages zoomed, against the backtest's same-length tail (growth of 1)",
                          transform=self.ax_zoom.transAxes, ha="left", va="bottom", fontsize=8.5)
        for stage, r in (("backtest", back), *later.items()):
            if not r.size:
                continue
            x = np.sort(r)
            y = np.arange(1, x.size + 1) / x.size
            self.ax_dist.step(x, y, where="post", color=COLOURS[stage], lw=1.6 if stage != "backtest" else 1.0,
                              ls="--" if stage == "backtest" else "-", label=f"{stage} ({x.size})")
        self.ax_dist.xaxis.set_major_formatter(_percent(decimals=1))
        self.ax_dist.set_ylim(0, 1)
        self.ax_dist.set_xlabel("return per period", fontsize=8)
        self.ax_dist.legend(loc="upper left", fontsize=7.5)
        self.ax_dist.text(0.0, 1.03, "return distributions (empirical CDF, same axes)",
                          transform=self.ax_dist.transAxes, ha="left", va="bottom", fontsize=8.5)
        return True


def _ticks(chained: Chained, count: int = 7) -> list[int]:
    """Tick positions: every segment start first, then evenly spaced ones, none closer than 1/12
    of the axis to one already taken (labels never overlap)."""
    n = len(chained)
    even = [int(round(i * (n - 1) / (count - 1))) for i in range(count)] if n > 1 else [0]
    gap = max(1, n // 12)
    taken: list[int] = []
    for t in [*chained.bounds[:-1], *even]:
        if all(abs(t - s) >= gap for s in taken):
            taken.append(t)
    return sorted(taken)


def _percent(decimals: int = 0) -> Any:
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(1.0, decimals=decimals)


def monthly_png(chained: Chained, path: Path | BinaryIO, title: str) -> bool:
    """The monthly returns heat table as a PNG (``--format png``); ``False`` without returns."""
    rows = monthly_returns(chained)
    if not rows:
        return False
    from matplotlib import rc_context
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with rc_context({**_RC, "axes.grid": False}):
        grid = np.array([[np.nan if m is None else m for m in row["months"]] + [row["total"]] for row in rows])
        fig = Figure(figsize=(9.0, 0.6 + 0.32 * len(rows)), dpi=110, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        scale = float(np.nanmax(np.abs(grid[:, :12]))) if np.isfinite(grid[:, :12]).any() else 0.01
        ax.imshow(grid, cmap="RdYlGn", vmin=-scale, vmax=scale, aspect="auto")
        ax.set_xticks(range(13), ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
                                  "year"])
        ax.set_yticks(range(len(rows)), [f"{r['stage']} {r['year']}" for r in rows])
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, f"{v * 100:.1f}", ha="center", va="center", fontsize=7)
        ax.set_title(title, loc="left")
        fig.savefig(path, format="png", metadata={"Software": None})
    return True


def sparkline_svg(values: Sequence[float] | np.ndarray, *, status: str | None = None, width: int = 120,
                  height: int = 24, points: int = 60) -> str:
    """A small inline SVG polyline of ``values`` (the summary table's equity curves), no matplotlib."""
    v = np.asarray(values, dtype=np.float64)
    v = downsample(v[np.isfinite(v)], points)
    if v.size < 2:
        return ""
    lo, hi = float(v.min()), float(v.max())
    span = hi - lo if hi - lo > 1e-12 else 1.0
    xs = np.linspace(1, width - 1, v.size)
    ys = (height - 2) - (v - lo) / span * (height - 4)
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys))
    colour = STATUS_COLOURS.get(status or "", "#555555")
    return (f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">'
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.2" points="{path}"/></svg>')


def chained_of(segments: dict[str, list[list[Any]]]) -> Chained:
    """Chain a strategy's stage segments (re-exported for callers of this module)."""
    return chain(segments)
