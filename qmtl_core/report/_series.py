"""Series a report draws, computed with numpy from one strategy's returns: pure functions.

A strategy's history is one return series per stage (backtest, then paper, then live). The report
chains them into one curve: wealth compounds across the stages, each point keeps the stage it came
from, and the x axis is the observation index (stages are often years apart in time: a backtest
on 2004-2013 prices and paper trading now), labelled with dates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

STAGE_ORDER = ("backtest", "paper", "live")


@dataclass(frozen=True)
class Chained:
    """Every stage's returns end to end, with the stage and timestamp of each point."""

    stages: tuple[str, ...]          # stage of each segment, in order
    bounds: tuple[int, ...]          # start index of each segment, then the total length
    timestamps: tuple[str, ...]      # ISO text per point
    returns: np.ndarray              # float64 per point

    def __len__(self) -> int:
        return int(self.returns.shape[0])

    def segment(self, i: int) -> slice:
        """The index range of segment ``i``."""
        return slice(self.bounds[i], self.bounds[i + 1])


def chain(segments: Mapping[str, Sequence[Sequence[Any]]]) -> Chained:
    """Chain ``{stage: [[iso_ts, r], ...]}`` in stage order (empty stages are left out)."""
    stages: list[str] = []
    bounds = [0]
    stamps: list[str] = []
    values: list[float] = []
    for stage in STAGE_ORDER:
        points = segments.get(stage) or []
        if not points:
            continue
        stages.append(stage)
        stamps.extend(str(p[0]) for p in points)
        values.extend(float(p[1]) for p in points)
        bounds.append(len(values))
    r = np.asarray(values, dtype=np.float64)
    return Chained(tuple(stages), tuple(bounds), tuple(stamps), np.nan_to_num(r, nan=0.0))


def equity(returns: np.ndarray) -> np.ndarray:
    """Compounded wealth after each period, from 1.0."""
    return np.cumprod(1.0 + returns)


def underwater(wealth: np.ndarray) -> np.ndarray:
    """Drawdown below the running peak as a negative fraction (starting wealth 1.0 is a peak)."""
    if wealth.size == 0:
        return wealth
    peak = np.maximum.accumulate(np.maximum(wealth, 1.0))
    return wealth / peak - 1.0


def rolling_sharpe(returns: np.ndarray, window: int = 63, periods_per_year: int = 252) -> np.ndarray:
    """Annualised Sharpe over the trailing ``window`` periods (ddof=1); NaN before a full window
    and where the window has no dispersion."""
    n = returns.shape[0]
    out = np.full(n, np.nan)
    if n < window or window < 2:
        return out
    c1 = np.concatenate(([0.0], np.cumsum(returns)))
    c2 = np.concatenate(([0.0], np.cumsum(returns * returns)))
    s1 = c1[window:] - c1[:-window]
    s2 = c2[window:] - c2[:-window]
    mean = s1 / window
    var = np.maximum(s2 - window * mean * mean, 0.0) / (window - 1)
    std = np.sqrt(var)
    with np.errstate(divide="ignore", invalid="ignore"):
        sr = np.where(std > 1e-12 * np.maximum(np.abs(mean), 1e-300), mean / std * math.sqrt(periods_per_year),
                      np.nan)
    out[window - 1:] = sr
    return out


def monthly_returns(chained: Chained) -> list[dict[str, Any]]:
    """Compounded return per calendar month, one row per (stage, year):
    ``{stage, year, months: [r or None] * 12, total}``; the total compounds that row's months."""
    rows: dict[tuple[str, int], list[float | None]] = {}
    for i, stage in enumerate(chained.stages):
        part = chained.segment(i)
        for ts, r in zip(chained.timestamps[part], chained.returns[part]):
            year, month = int(ts[0:4]), int(ts[5:7])
            months = rows.setdefault((stage, year), [None] * 12)
            prev = months[month - 1]
            months[month - 1] = (1.0 + (prev or 0.0)) * (1.0 + float(r)) - 1.0
    out = []
    for (stage, year), months in rows.items():
        total = 1.0
        for m in months:
            if m is not None:
                total *= 1.0 + m
        out.append({"stage": stage, "year": year, "months": months, "total": total - 1.0})
    order = {s: i for i, s in enumerate(STAGE_ORDER)}
    out.sort(key=lambda row: (order.get(str(row["stage"]), 9), row["year"]))
    return out


def downsample(values: np.ndarray, points: int) -> np.ndarray:
    """At most ``points`` values: the last of each equal bucket (the ends are kept)."""
    n = values.shape[0]
    if n <= points:
        return values
    idx = np.minimum(n - 1, ((np.arange(points) + 1) * n) // points - 1)
    return values[idx]
