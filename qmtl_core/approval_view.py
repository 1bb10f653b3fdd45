"""What an approver reads before signing a promotion request: one document, built from reads only.

In the order an approver needs it (issue 18): the live-gate checklist, each condition with its
evidence; paper (and shadow/live) next to the backtest on the same metrics; the risk evidence
(snapshot freshness, the strategy's weight, its correlation with what is live, stress, constraints,
costs); the small-sample caveat (the minimum track record length for the observed Sharpe, Bailey &
López de Prado, "The Sharpe Ratio Efficient Frontier", Journal of Risk 15(2), 2012, eq. 11); the
policy change since the request opened; the evidence hash, in one format (64 hex digits).

Everything here is pure: ``approval_view`` takes the documents the facade already serves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

__all__ = ["CHECKLIST", "approval_view", "checklist", "correlation", "min_track_record_length", "stage_comparison"]

#: The live gate's conditions (DESIGN §7) and the reason codes that fail each one.
CHECKLIST: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("the policy allows live (allow_live)", ("allow_live_false",)),
    ("live promotion is enabled (governance mode)", ("promotion_disabled",)),
    ("the world is not halted", ("world_halted",)),
    ("the strategy is in paper", ("not_in_paper",)),
    ("the paper window is satisfied (measured on data)", ("paper_window_incomplete",)),
    ("the paper run passes the current policy's gates", ("validation_failed", "validation_stale")),
    ("a fresh risk snapshot covers the strategy", ("risk_snapshot_missing", "risk_snapshot_expired",
                                                   "risk_snapshot_lagging", "risk_snapshot_incomplete")),
    ("the cooldown since the last live promotion has elapsed", ("cooldown_active",)),
    ("a live slot is free", ("max_live_slots_exceeded",)),
    ("the evidence is the one the request was opened on", ("evidence_changed",)),
    ("the required approvals are in", ("approval_required", "approvals_expired")),
)
#: Metrics shown side by side, in this order; ``pct`` ones are fractions shown as percentages.
SIDE_BY_SIDE = (("n_observations", "observations", False), ("total_return", "total return", True),
                ("cagr", "CAGR (annualised)", True), ("annual_volatility", "volatility (annualised)", True),
                ("sharpe", "Sharpe (annualised)", False), ("psr", "PSR (P[true SR > 0])", False),
                ("max_drawdown", "max drawdown", True), ("calmar", "Calmar", False),
                ("var_95", "VaR 95% (per period)", True), ("skew", "skew", False),
                ("profit_factor", "profit factor", False), ("win_rate", "win rate", True))
STAGES = ("backtest", "paper", "shadow", "live")


def checklist(reasons: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per gate condition: ``ok`` unless one of its codes is among ``reasons``. A reason no
    condition knows (a newer gate) is its own failing row: nothing that blocks is ever hidden."""
    by_code = {str(r["code"]): str(r.get("detail") or "") for r in reasons}
    rows, known = [], set()
    for condition, codes in CHECKLIST:
        known.update(codes)
        failing = [c for c in codes if c in by_code]
        rows.append({"condition": condition, "ok": not failing, "codes": failing,
                     "detail": "; ".join(by_code[c] for c in failing)})
    for code, detail in by_code.items():
        if code not in known:
            rows.append({"condition": code, "ok": False, "codes": [code], "detail": detail})
    return rows


def min_track_record_length(sharpe: float, skew: float, kurtosis_excess: float, *, target: float = 0.0,
                            confidence: float = 0.95) -> float | None:
    """Observations needed before a per-period Sharpe ``sharpe`` shows, at ``confidence``, a true
    Sharpe above ``target`` (Bailey & López de Prado 2012, eq. 11):
    ``1 + (1 − γ3·SR + (γ4 − 1)/4·SR²)·(z / (SR − SR*))²`` with γ4 the (non-excess) kurtosis.
    ``None`` when the observed Sharpe is not above the target: no track record is long enough."""
    values = (sharpe, skew, kurtosis_excess)
    if not all(math.isfinite(v) for v in values) or sharpe <= target:
        return None
    z = NormalDist().inv_cdf(confidence)
    spread = 1.0 - skew * sharpe + (kurtosis_excess + 3.0 - 1.0) / 4.0 * sharpe ** 2
    return 1.0 + max(spread, 0.0) * (z / (sharpe - target)) ** 2


def correlation(a: Sequence[tuple[str, float]], b: Sequence[tuple[str, float]]) -> tuple[float | None, int]:
    """Pearson correlation of two return series on their common timestamps, and how many there are
    (``None`` below 3 common points or with a flat series)."""
    left = dict(a)
    pairs = [(left[t], r) for t, r in b if t in left]
    n = len(pairs)
    if n < 3:
        return None, n
    xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in pairs)
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    if sxx <= 0 or syy <= 0:
        return None, n
    return sxy / math.sqrt(sxx * syy), n


#: The quantiles of each stage's returns shown side by side (a quantile plot in numbers).
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
LATER_STAGES = ("paper", "shadow", "live")


def stage_comparison(returns: Mapping[str, Sequence[Sequence[Any]]]) -> dict[str, Any]:
    """The later stages on their own scale next to the backtest (what the report draws, as data):

    - ``zoomed``: per later stage with ``n`` returns, its equity (growth of 1) and the backtest's
      last ``n`` returns compounded the same way, with both total returns;
    - ``distributions``: per stage (backtest included), ``n`` and the ``QUANTILES`` of its returns
      (linear interpolation, numpy's default), so paper that behaves unlike its backtest shows.
    """
    arrays = {s: np.array([float(p[1]) for p in returns.get(s) or []], dtype=np.float64) for s in STAGES}
    arrays = {s: r for s, r in arrays.items() if r.size}
    back = arrays.get("backtest", np.array([], dtype=np.float64))
    zoomed = []
    for stage in LATER_STAGES:
        r = arrays.get(stage)
        if r is None:
            continue
        tail = back[-r.size:]
        zoomed.append({"stage": stage, "n": int(r.size), "equity": np.cumprod(1.0 + r).tolist(),
                       "total_return": _clean(float(np.prod(1.0 + r) - 1.0)),
                       "backtest_tail_n": int(tail.size), "backtest_tail_equity": np.cumprod(1.0 + tail).tolist(),
                       "backtest_tail_total_return": _clean(float(np.prod(1.0 + tail) - 1.0)) if tail.size else None})
    distributions = {s: {"n": int(r.size), "quantiles": {f"{q:.0%}": _clean(float(np.quantile(r, q)))
                                                         for q in QUANTILES}}
                     for s, r in arrays.items()}
    return {"zoomed": zoomed, "distributions": distributions}


def _points(snapshot: Mapping[str, Any] | None, strategy_id: str) -> list[tuple[str, float]]:
    series = ((snapshot or {}).get("realized_returns") or {}).get(strategy_id) or []
    return [(str(p["ts"]), float(p["r"])) for p in series]


def _clean(value: Any) -> Any:
    """No "-0.0": a zero is a zero whatever its sign."""
    return 0.0 if isinstance(value, float) and value == 0 else value


def approval_view(request: Mapping[str, Any], gate: Mapping[str, Any], runs: Sequence[Mapping[str, Any]], *,
                  policy: Mapping[str, Any], snapshot: Mapping[str, Any] | None,
                  live: Sequence[str], policy_diff: str | None = None,
                  returns: Mapping[str, Sequence[Sequence[Any]]] | None = None) -> dict[str, Any]:
    """The approver's page for ``request`` (a ``promote --list --all`` row) from the current dry-run
    ``gate`` (``Outcome.to_dict()['gate']``), the strategy's latest ``runs`` per stage, the world's
    ``policy`` document, its newest risk ``snapshot`` (``risk show``; ``None`` without one) and the
    strategies ``live`` now; ``policy_diff``: the unified diff of the recorded policy files between
    the version the request was opened under and the one in force, when they differ; ``returns``:
    the returns of each stage's latest run (``run_returns``), for ``stage_comparison``."""
    sid = str(request["strategy_id"])
    periods = int(policy.get("periods_per_year") or 252)
    by_stage = {str(r["stage"]): r for r in runs}
    stages = [s for s in STAGES if s in by_stage]
    table = []
    for key, label, pct in SIDE_BY_SIDE:
        table.append({"metric": key, "label": label, "percent": pct,
                      "values": {s: _clean((by_stage[s].get("metrics") or {}).get(key)) for s in stages}})
    caveats = []
    for s in stages:
        n = int(((by_stage[s].get("window") or {}).get("n_observations")) or 0)
        if 0 < n < periods:
            caveats.append(f"{s}: annualised figures extrapolate {n} observations to a year of {periods}")
    paper = by_stage.get("paper") or {}
    m = paper.get("metrics") or {}
    n_paper = int(((paper.get("window") or {}).get("n_observations")) or 0)
    sample = None
    if m.get("sharpe") is not None and n_paper:
        per_period = float(m["sharpe"]) / math.sqrt(periods)
        need = min_track_record_length(per_period, float(m.get("skew") or 0.0), float(m.get("kurtosis") or 0.0))
        sample = {"stage": "paper", "n_observations": n_paper, "sharpe_per_period": per_period,
                  "min_track_record_length": None if need is None else math.ceil(need),
                  "enough": need is not None and n_paper >= need,
                  "source": "Bailey & López de Prado (2012), The Sharpe Ratio Efficient Frontier, "
                            "J. of Risk 15(2), eq. 11; 95% confidence that the true Sharpe > 0"}
    risk: dict[str, Any] = {"snapshot": None}
    if snapshot is not None:
        mine = _points(snapshot, sid)
        corr = {}
        for other in live:
            value, n = correlation(mine, _points(snapshot, other))
            corr[other] = {"correlation": value, "common_points": n}
        risk = {"snapshot": {"version": snapshot.get("version"), "as_of": snapshot.get("as_of"),
                             "freshness": snapshot.get("freshness"), "content_hash": snapshot.get("content_hash")},
                "weight": (snapshot.get("weights") or {}).get(sid),
                "correlation_with_live": corr, "stress": snapshot.get("stress") or {},
                "constraints": snapshot.get("constraints") or {}}
    risk["costs"] = policy.get("costs") or {}
    opened_version = request.get("policy_version")
    current_version = policy.get("policy_version")
    return {
        "request": {k: request.get(k) for k in ("request_id", "world", "strategy_id", "status", "requester",
                                                "reason", "created_at", "age_seconds", "approvals",
                                                "required_approvals")},
        "checklist": checklist(gate.get("reasons") or []),
        "allowed_now": bool(gate.get("allowed")),
        "stages": stages,
        "side_by_side": table,
        "caveats": caveats,
        "comparison": stage_comparison(returns or {}),
        "small_sample": sample,
        "risk": risk,
        "policy": {"version_at_request": opened_version, "version_now": current_version,
                   "changed": opened_version is not None and opened_version != current_version,
                   "diff": policy_diff},
        "evidence": {"request": request.get("evidence_hash"), "now": gate.get("evidence_hash"),
                     "unchanged": request.get("evidence_hash") == gate.get("evidence_hash")},
    }
