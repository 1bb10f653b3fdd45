"""The metric names a policy rule may refer to (DESIGN §4), kept free of heavy imports."""

from __future__ import annotations

#: Metrics computed from a returns series by ``qmtl_core.metrics``.
RETURN_METRICS: tuple[str, ...] = (
    "total_return",
    "cagr",
    "annual_volatility",
    "sharpe",
    "sortino",
    "max_drawdown",
    "calmar",
    "win_rate",
    "profit_factor",
    "tail_ratio",
    "n_observations",
    "effective_history_years",
    "skew",
    "kurtosis",
    "var_95",
    "cvar_95",
    "psr",
)

#: Metrics that need more than the returns: ``dsr`` needs the number of trials, ``n_trades``
#: comes from backtest/execution records, never from the count of periods.
EXTRA_METRICS: tuple[str, ...] = ("dsr", "n_trades")

KNOWN_METRICS: frozenset[str] = frozenset(RETURN_METRICS + EXTRA_METRICS)
