"""Portfolio risk of a candidate against a world's book, from a risk snapshot. Pure functions.

The book is the world's strategies already live (with ``risk.portfolio_book: live_and_paper`` also
the ones in paper), each at its snapshot weight ``w_i``; the candidate enters at its proposed
weight ``w_c``, also read from the snapshot (the snapshot's weights describe the planned book).
Existing weights are not rescaled: the candidate is *added* to the book, which is Jorion's
definition of an incremental position (P. Jorion, *Value at Risk*, 3rd ed., McGraw-Hill 2007,
ch. 7.2, "incremental VaR": VaR(P + a) − VaR(P)).

With ``Σ`` the snapshot's per-period covariance of returns, ``b`` the book's weight vector and
``b' = b + w_c·e_c`` the book with the candidate:

- ``σ(x) = √(xᵀ Σ x)`` per period;
- ``portfolio_vol = σ(b') · √periods_per_year`` (annualised like ``annual_volatility``);
- ``VaR₉₉(x) = z·σ(x)`` and ``ES₉₉(x) = σ(x)·φ(z)/(1 − 0.99)`` with ``z = Φ⁻¹(0.99)``: one period,
  as a fraction of capital, under a **normal, zero-mean** distribution of the book's return
  (Jorion ch. 5.2 for VaR; the normal expected shortfall of Acerbi & Tasche, "Expected shortfall:
  a natural coherent alternative to Value at Risk", 2002). Cornish–Fisher is not used: a covariance
  carries no skew or kurtosis of the book, and an adjustment built from one strategy's moments
  would pretend to know the book's;
- ``incremental_var_99 = VaR₉₉(b') − VaR₉₉(b)``, ``incremental_es_99 = ES₉₉(b') − ES₉₉(b)``
  (negative when the candidate diversifies the book);
- ``max_corr_live``: the highest correlation of the candidate with a strategy of the book. Per
  pair, from the snapshot's realized returns when the two share at least ``min_overlap`` time
  stamps (the policy's ``selection.correlation.min_overlap``, default 20) and both vary there;
  otherwise from the covariance, ``Σ_cl / √(Σ_cc·Σ_ll)``. Over an empty book it is −1, the lower
  bound of a correlation (nothing to correlate with, so any ``max`` passes);
- from ``stress`` (``{scenario: {strategy: return under the scenario}}``):
  ``stress_loss.<scenario> = −(Σ_i b'_i·s_i)``, the loss of the book with the candidate as a
  positive fraction, and ``stress_loss_max`` the worst of them.

Nothing missing is ever read as zero: a covariance entry, a weight or a scenario value the
computation needs and the snapshot lacks leaves the metric unmeasured, and ``missing`` names the
entry. A gate that needs such a metric blocks with ``risk_snapshot_incomplete`` (fail closed).
Every value's source is ``risk_snapshot:<version>``.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from qmtl_core.metric_names import PORTFOLIO_METRICS, STRESS_PREFIX, is_portfolio_metric

if TYPE_CHECKING:
    from qmtl_core.risk import RiskSnapshot

__all__ = ["PortfolioRisk", "portfolio_risk", "portfolio_kernel", "Z_99", "ES_FACTOR_99",
           "PORTFOLIO_METRICS", "STRESS_PREFIX", "is_portfolio_metric", "DEFAULT_MIN_OVERLAP"]

Z_99 = NormalDist().inv_cdf(0.99)
#: ES₉₉ / σ for a zero-mean normal: φ(z)/(1 − 0.99).
ES_FACTOR_99 = NormalDist().pdf(Z_99) / 0.01
DEFAULT_MIN_OVERLAP = 20
Array = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Correlation:
    """The candidate's correlation with one book strategy, and what it was measured from."""

    strategy_id: str
    rho: float | None
    basis: str  # "returns" | "covariance" | "unavailable"
    n_overlap: int

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"strategy_id": self.strategy_id, "rho": self.rho, "basis": self.basis,
                "n_overlap": self.n_overlap}


@dataclass(frozen=True)
class PortfolioRisk:
    """Portfolio metrics of one candidate against a book, with what could not be measured."""

    candidate: str
    book: tuple[str, ...]
    source: str
    metrics: Mapping[str, float | None]
    missing: Mapping[str, str] = field(default_factory=dict)
    correlations: tuple[Correlation, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"candidate": self.candidate, "book": list(self.book), "source": self.source,
                "metrics": dict(self.metrics), "missing": dict(self.missing),
                "correlations": [c.to_dict() for c in self.correlations]}

    @property
    def version(self) -> str:
        """The snapshot version the metrics come from."""
        return self.source.split(":", 1)[1]

    def lacking(self, metric: str) -> str:
        """What the snapshot lacks for ``metric`` (an entry, or a stress scenario it never names)."""
        return self.missing.get(metric, "stress scenario " + metric.removeprefix(STRESS_PREFIX))

    def incomplete_for(self, names: Collection[str]) -> dict[str, str]:
        """Of ``names``, the portfolio metrics the snapshot could not give, with what is missing."""
        return {n: self.missing[n] for n in names if n in self.missing}


def portfolio_kernel(book_cov: Array, book_w: Array, cross_cov: Array, cand_var: Array,
                     cand_w: Array) -> dict[str, Array]:
    """Vectorised over ``n`` candidates against one book of ``m`` strategies.

    ``book_cov`` (m×m) and ``book_w`` (m) describe the book; ``cross_cov`` (n×m) is each candidate's
    covariance with the book, ``cand_var`` (n) its variance, ``cand_w`` (n) its proposed weight.
    ``σ²(b + w_c e_c) = bᵀΣb + 2·w_c·(Σ_cB·b) + w_c²·Σ_cc``, so the cost is one matrix-vector
    product, never an (m+1)×(m+1) matrix per candidate. Returns per-period ``sigma_book`` (a
    0-d array), ``sigma_with``, ``incremental_var_99``, ``incremental_es_99`` (n) and ``corr`` (n×m).
    """
    book_var = float(book_w @ book_cov @ book_w) if book_w.size else 0.0
    sigma_book = math.sqrt(max(book_var, 0.0))
    var_with = book_var + 2.0 * cand_w * (cross_cov @ book_w) + cand_w * cand_w * cand_var
    sigma_with = np.sqrt(np.maximum(var_with, 0.0))  # rounding can dip a PSD form below zero
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = cross_cov / np.sqrt(np.outer(cand_var, np.diag(book_cov)))
    return {"sigma_book": np.asarray(sigma_book), "sigma_with": sigma_with,
            "incremental_var_99": Z_99 * (sigma_with - sigma_book),
            "incremental_es_99": ES_FACTOR_99 * (sigma_with - sigma_book), "corr": corr}


def _cov_lookup(covariance: Mapping[str, float]) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for key, value in covariance.items():
        a, b = (p.strip() for p in key.split(","))
        out[(a, b)] = out[(b, a)] = float(value)
    return out


def _returns_correlation(a: list[tuple[datetime, float]] | None, b: list[tuple[datetime, float]] | None,
                         min_overlap: int) -> tuple[float | None, int]:
    """Pearson correlation over the time stamps both series have; ``None`` below ``min_overlap``
    shared stamps or when either is constant there."""
    if not a or not b:
        return None, 0
    other = dict(b)
    pairs = [(r, other[t]) for t, r in a if t in other]
    n = len(pairs)
    if n < max(min_overlap, 2):
        return None, n
    x = np.array([p[0] for p in pairs]) - np.mean([p[0] for p in pairs])
    y = np.array([p[1] for p in pairs]) - np.mean([p[1] for p in pairs])
    denom = math.sqrt(float(x @ x) * float(y @ y))
    if denom == 0.0:
        return None, n
    return float(x @ y) / denom, n


def _scenarios(stress: Mapping[str, Any]) -> dict[str, Any]:
    # ``stress`` is free-form in the hub; only scenarios of per-strategy values can be re-priced
    # with the candidate in the book. Anything else is reported as missing when a rule needs it.
    return {str(name): value for name, value in stress.items()}


def portfolio_risk(snapshot: "RiskSnapshot", candidate: str, book: Collection[str], *,
                   periods_per_year: int, min_overlap: int = DEFAULT_MIN_OVERLAP) -> PortfolioRisk:
    """The candidate's portfolio metrics against ``book`` from ``snapshot``; see the module docstring."""
    members = tuple(sorted(set(book) - {candidate}))
    source = f"risk_snapshot:{snapshot.version}"
    metrics: dict[str, float | None] = {}
    missing: dict[str, str] = {}
    weights = snapshot.weights

    def lack(names: Collection[str], what: str) -> None:
        for n in names:
            metrics[n] = None
            missing.setdefault(n, what)

    unweighted = [s for s in (candidate, *members) if s not in weights]
    cov = _cov_lookup(snapshot.covariance) if snapshot.covariance is not None else None
    w_c = weights.get(candidate)
    b = np.array([weights.get(s, math.nan) for s in members], dtype=np.float64)

    variance_metrics = ("portfolio_vol", "incremental_var_99", "incremental_es_99")
    if unweighted:
        lack(variance_metrics, f"weight of {unweighted[0]}")
    elif cov is None:
        lack(variance_metrics, "covariance" + (" (given by reference only)" if snapshot.covariance_ref else ""))
    else:
        ids = (candidate, *members)
        gaps = [f"{x},{y}" for i, x in enumerate(ids) for y in ids[i:] if (x, y) not in cov]
        if gaps:
            lack(variance_metrics, f"covariance {gaps[0]}" + (f" (+{len(gaps) - 1} more)" if len(gaps) > 1 else ""))
        else:
            book_cov = np.array([[cov[(x, y)] for y in members] for x in members], dtype=np.float64).reshape(
                len(members), len(members))
            cross = np.array([[cov[(candidate, y)] for y in members]], dtype=np.float64).reshape(1, len(members))
            out = portfolio_kernel(book_cov, b, cross, np.array([cov[(candidate, candidate)]]),
                                   np.array([w_c], dtype=np.float64))
            metrics["portfolio_vol"] = float(out["sigma_with"][0]) * math.sqrt(periods_per_year)
            metrics["incremental_var_99"] = float(out["incremental_var_99"][0])
            metrics["incremental_es_99"] = float(out["incremental_es_99"][0])

    correlations = []
    mine = snapshot.returns_of(candidate)
    for sid in members:
        rho, n = _returns_correlation(mine, snapshot.returns_of(sid), min_overlap)
        if rho is not None:
            correlations.append(Correlation(sid, rho, "returns", n))
            continue
        pair = (candidate, sid)
        if cov is not None and pair in cov and (candidate, candidate) in cov and (sid, sid) in cov:
            denom = math.sqrt(cov[(candidate, candidate)] * cov[(sid, sid)])
            if denom > 0:
                correlations.append(Correlation(sid, cov[pair] / denom, "covariance", n))
                continue
        correlations.append(Correlation(sid, None, "unavailable", n))
    unmeasured = [c for c in correlations if c.rho is None]
    if unmeasured:
        lack(["max_corr_live"], f"covariance {candidate},{unmeasured[0].strategy_id} (and fewer than "
                                f"{min_overlap} shared returns)")
    else:
        metrics["max_corr_live"] = max((c.rho for c in correlations if c.rho is not None), default=-1.0)

    scenarios = _scenarios(snapshot.stress)
    worst: float | None = None
    stress_gap: str | None = None if scenarios else "stress scenarios"
    for name, shocks in sorted(scenarios.items()):
        key = STRESS_PREFIX + name
        if not isinstance(shocks, Mapping):
            lack([key], f"stress {name} per strategy (it is one number, not {{strategy: return}})")
        else:
            gap = next((s for s in (candidate, *members) if not _finite_number(shocks.get(s))), None)
            if gap is not None:
                lack([key], f"stress {name}.{gap}")
            elif unweighted:
                lack([key], f"weight of {unweighted[0]}")
            else:
                pnl = math.fsum([weights[candidate] * float(shocks[candidate])]
                                + [weights[s] * float(shocks[s]) for s in members])
                metrics[key] = -pnl
                worst = -pnl if worst is None else max(worst, -pnl)
                continue
        stress_gap = stress_gap or missing[key]
    if stress_gap is not None:
        lack(["stress_loss_max"], stress_gap)
    else:
        metrics["stress_loss_max"] = worst
    ordered = {n: metrics.get(n) for n in PORTFOLIO_METRICS}
    ordered.update({k: v for k, v in sorted(metrics.items()) if k.startswith(STRESS_PREFIX)})
    return PortfolioRisk(candidate, members, source, ordered, missing, tuple(correlations))


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
