"""Consistency (drift) checks: does a later stage behave like the stage it was promoted from?

A world's ``consistency:`` list compares the returns of a run at ``stage`` (paper, shadow, live)
with the returns of the strategy's latest run at ``against`` (the backtest by default). Two
statistics, each optional, each one rule result (DESIGN §3 shape) on the later stage's run:

- **metric drop** (``max_drop``): ``reference − observed`` of a metric where more is better
  (Sharpe by default), both computed by :func:`qmtl_core.metrics.compute_metrics` with the world's
  ``periods_per_year``. Fails when the later stage's metric fell by more than ``max_drop``.
- **two-sample Kolmogorov-Smirnov** (``ks_p_min``): ``D = sup_x |F₁(x) − F₂(x)|`` over the two
  empirical distribution functions of the per-period returns, and its p-value from the
  asymptotic Kolmogorov distribution ``Q(λ) = 2 Σ_{j≥1} (−1)^{j−1} e^{−2j²λ²}`` at
  ``λ = (√nₑ + 0.12 + 0.11/√nₑ)·D`` with ``nₑ = n₁n₂/(n₁+n₂)``: Stephens' small-sample correction
  (M. A. Stephens, "Use of the Kolmogorov-Smirnov, Cramér-Von Mises and related statistics without
  extensive tables", JRSS B 32 (1970) 115-122), as given in Press et al., *Numerical Recipes*, 3rd
  ed., §14.3.3. Fails when ``p < ks_p_min``: the stage's returns are unlikely to come from the
  backtest's distribution. It is tested against ``scipy.stats.ks_2samp`` where scipy is installed.

Returns are taken as they are (i.i.d. is the test's assumption; autocorrelated returns make the
p-value optimistic, so choose ``ks_p_min`` with that in mind). Too few returns on either side is a
missing metric, treated by ``validation.on_missing_metric`` (fail by default): never a pass.
Pure functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from qmtl_core.metrics import compute_metrics
from qmtl_core.policy import Consistency, WorldPolicy
from qmtl_core.policy._engine import RuleResult, Status

__all__ = ["ks_2samp", "kolmogorov_sf", "check_consistency", "consistency_results"]


def kolmogorov_sf(lam: float) -> float:
    """``Q(λ) = P(K > λ)`` of the Kolmogorov distribution (1 for λ ≤ 0; the series converges fast)."""
    if lam <= 0:
        return 1.0
    if lam < 0.2:  # the alternating series converges slowly here, and Q is 1 to 15 digits
        return 1.0
    total = 0.0
    for j in range(1, 101):
        term = (-1) ** (j - 1) * math.exp(-2.0 * j * j * lam * lam)
        total += term
        if abs(term) < 1e-16:
            break
    return min(1.0, max(0.0, 2.0 * total))


def ks_2samp(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Two-sample KS statistic ``D`` and its asymptotic p-value (Stephens-corrected; module doc)."""
    x = np.sort(np.asarray(a, dtype=np.float64))
    y = np.sort(np.asarray(b, dtype=np.float64))
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        raise ValueError("both samples need at least one value")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("returns must be finite")
    pooled = np.concatenate([x, y])
    cdf1 = np.searchsorted(x, pooled, side="right") / n1
    cdf2 = np.searchsorted(y, pooled, side="right") / n2
    d = float(np.max(np.abs(cdf1 - cdf2)))
    en = math.sqrt(n1 * n2 / (n1 + n2))
    return d, kolmogorov_sf((en + 0.12 + 0.11 / en) * d)


def _result(check: Consistency, suffix: str, metric: str, observed: float | None, lo: float | None,
            hi: float | None, status: Status, reason: str) -> RuleResult:
    return RuleResult(f"{check.id}{suffix}", metric, observed, lo, hi, status, check.severity, reason,
                      f"consistency:{check.against}")


def check_consistency(check: Consistency, returns: Sequence[float], reference: Sequence[float] | None, *,
                      periods_per_year: int, on_missing: str = "fail") -> list[RuleResult]:
    """The check's results for a run at ``check.stage`` with ``returns``, against ``reference``
    (the ``check.against`` run's returns; ``None`` when there is none)."""
    later = np.asarray(returns, dtype=np.float64)
    ref = None if reference is None else np.asarray(reference, dtype=np.float64)
    missing: Status = "fail" if on_missing == "fail" else "warn"
    short = None
    if ref is None:
        short = f"no {check.against} run to compare with"
    elif min(len(later), len(ref)) < check.min_observations:
        short = (f"{len(later)} {check.stage} and {len(ref)} {check.against} returns; each side needs "
                 f"{check.min_observations}")
    out = []
    drop_metric = f"{check.metric}_drop_vs_{check.against}"
    if check.max_drop is not None:
        if short is not None:
            out.append(_result(check, "", drop_metric, None, None, check.max_drop, missing,
                               f"{drop_metric} was not measured: {short} (on_missing_metric: {on_missing})"))
        else:
            assert ref is not None
            now = compute_metrics(later, periods_per_year=periods_per_year).get(check.metric)
            then = compute_metrics(ref, periods_per_year=periods_per_year).get(check.metric)
            if now is None or then is None or not (math.isfinite(now) and math.isfinite(then)):
                out.append(_result(check, "", drop_metric, None, None, check.max_drop, missing,
                                   f"{check.metric} is not finite on both sides (on_missing_metric: {on_missing})"))
            else:
                drop = float(then - now)
                words = (f"{check.metric} {now:.4g} in {check.stage} vs {then:.4g} in {check.against}: "
                         f"a drop of {drop:.4g}")
                ok = drop <= check.max_drop
                out.append(_result(check, "", drop_metric, drop, None, check.max_drop,
                                   "pass" if ok else "fail",
                                   words + (f" <= max_drop {check.max_drop:g}" if ok else
                                            f" is above max_drop {check.max_drop:g}")))
    if check.ks_p_min is not None:
        ks_metric = f"ks_p_value_vs_{check.against}"
        if short is not None:
            out.append(_result(check, ".ks", ks_metric, None, check.ks_p_min, None, missing,
                               f"{ks_metric} was not measured: {short} (on_missing_metric: {on_missing})"))
        else:
            assert ref is not None
            d, p = ks_2samp(later, ref)
            ok = p >= check.ks_p_min
            out.append(_result(check, ".ks", ks_metric, p, check.ks_p_min, None, "pass" if ok else "fail",
                               f"two-sample KS D={d:.4g} over {len(later)} {check.stage} and {len(ref)} "
                               f"{check.against} returns: p={p:.4g} "
                               + (f">= ks_p_min {check.ks_p_min:g}" if ok else
                                  f"is below ks_p_min {check.ks_p_min:g}: the {check.stage} returns do "
                                  f"not look like the {check.against}'s")))
    return out


def consistency_results(policy: WorldPolicy, stage: str, returns: Sequence[float] | None,
                        references: dict[str, Sequence[float] | None]) -> list[RuleResult]:
    """Every consistency check of ``policy`` at ``stage``; ``references`` maps ``against`` stages to
    their returns. No returns at ``stage`` (metrics given as values): each check counts as missing."""
    out: list[RuleResult] = []
    for check in policy.consistency_for(stage):
        out.extend(check_consistency(check, returns or [], references.get(check.against),
                                     periods_per_year=policy.periods_per_year,
                                     on_missing=policy.validation.on_missing_metric))
    return out
