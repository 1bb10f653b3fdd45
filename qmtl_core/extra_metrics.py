"""Computed extra metrics (``metric_names.COMPUTED_EXTRAS``), measured only when a policy names
them. Pure functions of a returns series; conventions as ``qmtl_core.metrics`` (simple returns,
risk-free 0, ``periods_per_year`` annualisation, starting wealth 1.0 counts as a peak).

- ``time_under_water``: the longest run of consecutive periods whose compounded wealth is below
  its running peak (the longest drawdown's duration, in periods; 0 when it never falls).
- ``sharpe_stability``: Sharpe of the second half minus Sharpe of the first half (annualised,
  halves split at ⌊n/2⌋); negative when performance decays. ``{min: -0.5}`` lets the Sharpe fall
  by at most 0.5.
- ``beta``, ``alpha``: against the policy's ``benchmark`` returns column, over the periods both
  have, as empyrical's ``alpha_beta`` (risk-free 0): ``β = cov(r, b)/var(b)``, and ``α`` the mean
  of ``r − β·b`` compounded to a year, ``(1 + mean)^periods_per_year − 1``.
- ``n_trades_per_year``: ``n_trades / (n_observations / periods_per_year)``, from the execution
  records' ``n_trades`` (never the count of periods).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from qmtl_core.metric_names import COMPUTED_EXTRAS

Array = npt.NDArray[np.float64]

__all__ = ["COMPUTED_EXTRAS", "time_under_water", "sharpe_stability", "alpha_beta", "n_trades_per_year",
           "computed_extras"]


def time_under_water(returns: Array) -> float:
    """The longest stretch of periods below the running peak of wealth (NaN skipped as leading history)."""
    r = returns[~np.isnan(returns)]
    if r.size == 0:
        return math.nan
    wealth = np.cumprod(1.0 + r)
    under = wealth < np.maximum.accumulate(np.maximum(wealth, 1.0))
    longest = run = 0
    for below in under:
        run = run + 1 if below else 0
        longest = max(longest, run)
    return float(longest)


def _sharpe(r: Array, periods_per_year: int) -> float:
    if r.size < 2:
        return math.nan
    sd = float(np.std(r, ddof=1))
    return math.nan if sd == 0.0 else float(np.mean(r)) / sd * math.sqrt(periods_per_year)


def sharpe_stability(returns: Array, periods_per_year: int) -> float:
    """Second-half Sharpe minus first-half Sharpe; NaN with fewer than 4 periods or a flat half."""
    r = returns[~np.isnan(returns)]
    if r.size < 4:
        return math.nan
    half = r.size // 2
    return _sharpe(r[half:], periods_per_year) - _sharpe(r[:half], periods_per_year)


def alpha_beta(returns: Array, benchmark: Array, periods_per_year: int) -> tuple[float, float]:
    """``(alpha, beta)`` against ``benchmark`` over the periods both have (NaN when under 2 or a flat benchmark)."""
    both = ~(np.isnan(returns) | np.isnan(benchmark))
    r, b = returns[both], benchmark[both]
    if r.size < 2:
        return math.nan, math.nan
    centred = b - b.mean()
    variance = float(np.mean(centred * centred))
    if variance == 0.0:
        return math.nan, math.nan
    beta = float(np.mean(centred * r)) / variance
    alpha = (1.0 + float(np.mean(r - beta * b))) ** periods_per_year - 1.0
    return alpha, beta


def n_trades_per_year(n_trades: float | None, n_observations: float | None, periods_per_year: int) -> float | None:
    """Trades per year of observed data, or ``None`` without trades or observations."""
    if n_trades is None or not n_observations:
        return None
    return float(n_trades) / (float(n_observations) / periods_per_year)


def computed_extras(returns: Array, *, periods_per_year: int, wanted: Collection[str],
                    benchmark: Array | None = None, known: Mapping[str, Any] | None = None
                    ) -> dict[str, float | None]:
    """The ``wanted`` computed extras of one series (``benchmark`` aligned with it; ``known``
    metrics supply ``n_trades`` and ``n_observations``). An extra that cannot be measured is None."""
    out: dict[str, float | None] = {}

    def clean(x: float) -> float | None:
        return None if math.isnan(x) else x

    if "time_under_water" in wanted:
        out["time_under_water"] = clean(time_under_water(returns))
    if "sharpe_stability" in wanted:
        out["sharpe_stability"] = clean(sharpe_stability(returns, periods_per_year))
    if {"alpha", "beta"} & set(wanted):
        alpha, beta = (alpha_beta(returns, benchmark, periods_per_year) if benchmark is not None
                       else (math.nan, math.nan))
        out.update({k: clean(v) for k, v in (("alpha", alpha), ("beta", beta)) if k in wanted})
    if "n_trades_per_year" in wanted:
        known = known or {}
        n_obs = known.get("n_observations", int(np.count_nonzero(~np.isnan(returns))))
        out["n_trades_per_year"] = n_trades_per_year(known.get("n_trades"), n_obs, periods_per_year)
    return out
