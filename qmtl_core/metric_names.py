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

#: Computed from returns too, but only reported where asked for (``qmtl_core.extra_metrics``):
#: ``beta``/``alpha`` need the policy's benchmark column, ``n_trades_per_year`` needs ``n_trades``.
COMPUTED_EXTRAS: tuple[str, ...] = ("time_under_water", "sharpe_stability", "beta", "alpha",
                                    "n_trades_per_year")

#: Metrics of a candidate against the world's book, from the risk snapshot (``qmtl_core.portfolio``).
PORTFOLIO_METRICS: tuple[str, ...] = ("portfolio_vol", "incremental_var_99", "incremental_es_99",
                                      "max_corr_live", "stress_loss_max")
#: ``stress_loss.<scenario>``: the book's loss with the candidate under one named stress scenario.
STRESS_PREFIX = "stress_loss."

KNOWN_METRICS: frozenset[str] = frozenset(RETURN_METRICS + EXTRA_METRICS + COMPUTED_EXTRAS
                                          + PORTFOLIO_METRICS)


def is_portfolio_metric(name: str) -> bool:
    """Whether ``name`` is measured from the risk snapshot's book (never taken from a request)."""
    return name in PORTFOLIO_METRICS or (name.startswith(STRESS_PREFIX) and len(name) > len(STRESS_PREFIX))


def is_known_metric(name: str, declared: frozenset[str] | set[str] = frozenset()) -> bool:
    """Whether a rule may name ``name``: a built-in metric, a stress scenario, or one the policy declares."""
    return name in KNOWN_METRICS or name in declared or is_portfolio_metric(name)
