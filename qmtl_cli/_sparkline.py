"""One-line unicode sparklines of equity curves for terminal tables (``▁▂▃▄▅▆▇█``).

Pure Python and import-light: the CLI draws them for every row of ``qmtl world runs`` and
``qmtl world campaign``. Colour is applied by the caller through rich markup, so piped output
keeps the characters and loses the ANSI codes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from qmtl_cli._output import Markup

BLOCKS = "▁▂▃▄▅▆▇█"
STATUS_STYLE = {"pass": "green", "warn": "yellow", "fail": "red"}


def equity(returns: Iterable[float]) -> list[float]:
    """Compounded wealth after each period, starting from 1.0 (NaN returns count as flat)."""
    wealth, out = 1.0, []
    for r in returns:
        value = float(r)
        if not math.isnan(value):
            wealth *= 1.0 + value
        out.append(wealth)
    return out


def resample(values: Sequence[float], width: int) -> list[float]:
    """At most ``width`` points: the last value of each of ``width`` equal buckets (ends kept)."""
    n = len(values)
    if width <= 0:
        return []
    if n <= width:
        return list(values)
    return [values[min(n - 1, ((i + 1) * n) // width - 1)] for i in range(width)]


def sparkline(values: Sequence[float], width: int = 20) -> str:
    """``values`` as at most ``width`` block characters, lowest ▁ to highest █ ('' when empty)."""
    points = [v for v in resample([float(v) for v in values], width) if math.isfinite(v)]
    if not points:
        return ""
    lo, hi = min(points), max(points)
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return BLOCKS[3] * len(points)
    top = len(BLOCKS) - 1
    return "".join(BLOCKS[int(round((v - lo) / (hi - lo) * top))] for v in points)


def equity_sparkline(returns: Iterable[float], width: int = 20) -> str:
    """The sparkline of the equity curve compounded from ``returns``."""
    return sparkline(equity(returns), width)


def styled_sparkline(returns: Iterable[float], status: str | None, width: int = 20) -> Markup:
    """The equity sparkline wrapped in rich markup coloured by ``status`` (pass/warn/fail)."""
    line = equity_sparkline(returns, width)
    style = STATUS_STYLE.get(status or "")
    return Markup(f"[{style}]{line}[/{style}]" if line and style else line)


def gate_status(rules: Iterable[dict[str, object]]) -> str | None:
    """pass / warn / fail of a run's rule results (DESIGN §3: a blocking fail fails; a soft fail or
    any warn warns; info rules only report); ``None`` without rules."""
    rules = list(rules)
    if not rules:
        return None
    counted = [r for r in rules if r.get("severity") != "info"]
    if any(r.get("status") == "fail" and r.get("severity", "blocking") == "blocking" for r in counted):
        return "fail"
    if any(r.get("status") != "pass" for r in counted):
        return "warn"
    return "pass"


def stored_returns(st: object, world: str, **query: object) -> list[dict[str, object]]:
    """The returns stored with runs, from the local store or the server (``GET /worlds/{id}/returns``)."""
    return st.client().run_returns(world, **query)["runs"]  # type: ignore[attr-defined, no-any-return]


def run_curves(st: object, world: str, **query: object) -> dict[tuple[str, str, str, int], list[float]]:
    """Returns per run revision, keyed ``(strategy_id, stage, run_id, revision)`` (``qmtl world runs``)."""
    return {(str(r["strategy_id"]), str(r["stage"]), str(r["run_id"]), int(r["revision"])):  # type: ignore[call-overload]
            [float(x[1]) for x in r["returns"]] for r in stored_returns(st, world, **query)}  # type: ignore[attr-defined]


def strategy_curves(st: object, world: str, strategy_id: str | None = None) -> dict[str, list[float]]:
    """Each strategy's returns chained backtest → paper → live (latest run per stage), for
    ``qmtl world campaign``."""
    order = {"backtest": 0, "paper": 1, "live": 2}
    rows = sorted(stored_returns(st, world, strategy_id=strategy_id, latest_per_stage=True),
                  key=lambda r: order.get(str(r["stage"]), 9))
    out: dict[str, list[float]] = {}
    for r in rows:
        out.setdefault(str(r["strategy_id"]), []).extend(float(x[1]) for x in r["returns"])  # type: ignore[attr-defined]
    return out
