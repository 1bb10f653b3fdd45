"""Selection after the gates: hysteresis, top-k with backfill, greedy correlation filter. Pure.

Order of operations (DESIGN §3), over strategies whose gate status is not ``fail`` (a soft
failure warns but does not remove a strategy):

1. hysteresis: a strategy outside the previous active set enters only at ``metric >= enter``; one
   inside stays while ``metric >= exit`` (so it does not flap around a single threshold);
2. ranking by ``top_k.metric`` (ties broken by strategy id, so the result never depends on input
   order);
3. a greedy walk down the ranking: a strategy whose returns correlate above ``correlation.max``
   with one already kept (on their overlapping periods) is skipped, and the next ranked one takes
   its place (backfill), until ``k`` are kept. When two share fewer than ``min_overlap`` periods,
   the risk snapshot's covariance decides (Σ_ab/√(Σ_aa·Σ_bb)), the rule ``max_corr_live`` uses;
   without a covariance entry the pair is noted as not measured.

Every strategy gets a decision with the reason it was kept or dropped.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qmtl_core.policy._engine import Status, observed_value
from qmtl_core.policy._models import Selection

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class Candidate:
    """A strategy entering selection: its gate status, metrics and (optionally) its returns."""

    strategy_id: str
    status: Status
    metrics: Mapping[str, Any]
    returns: "np.ndarray | None" = None


@dataclass(frozen=True)
class SelectionDecision:
    """Whether selection kept a strategy, and why."""

    strategy_id: str
    selected: bool
    reason: str
    rank: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"strategy_id": self.strategy_id, "selected": self.selected, "rank": self.rank,
                "reason": self.reason}


@dataclass(frozen=True)
class SelectionResult:
    """The kept strategies in rank order, and a decision for every candidate."""

    selected: tuple[str, ...]
    decisions: Mapping[str, SelectionDecision]

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"selected": list(self.selected),
                "decisions": [d.to_dict() for d in self.decisions.values()]}


def overlap_correlation(a: "np.ndarray", b: "np.ndarray") -> tuple[float, int]:
    """Pearson correlation of two aligned return rows over the periods both have; ``(nan, n)`` when
    fewer than two shared periods or either side is constant there."""
    import numpy as np

    both = ~(np.isnan(a) | np.isnan(b))
    n = int(both.sum())
    if n < 2:
        return float("nan"), n
    x = a[both] - a[both].mean()
    y = b[both] - b[both].mean()
    denom = float(np.sqrt((x * x).sum() * (y * y).sum()))
    if denom == 0.0:
        return float("nan"), n
    return float((x * y).sum() / denom), n


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def covariance_correlation(covariance: Mapping[tuple[str, str], float] | None, a: str, b: str) -> float | None:
    """Σ_ab/√(Σ_aa·Σ_bb) from a snapshot's covariance (keyed both ways), or ``None`` without the entries."""
    if not covariance:
        return None
    try:
        cov, var_a, var_b = covariance[(a, b)], covariance[(a, a)], covariance[(b, b)]
    except KeyError:
        return None
    denom = (var_a * var_b) ** 0.5
    return cov / denom if denom > 0 else None


def select(selection: Selection, candidates: Sequence[Candidate],
           previous_active: Collection[str] = (),
           covariance: Mapping[tuple[str, str], float] | None = None) -> SelectionResult:
    """Run hysteresis, top-k and the correlation filter; see the module docstring.

    ``covariance`` (a risk snapshot's, keyed ``(a, b)`` both ways) decides pairs whose returns
    overlap too little."""
    decisions: dict[str, SelectionDecision] = {}
    previous = set(previous_active)
    pool: list[Candidate] = []
    for cand in sorted(candidates, key=lambda c: c.strategy_id):
        if cand.status == "fail":
            decisions[cand.strategy_id] = SelectionDecision(cand.strategy_id, False,
                                                            "failed a blocking gate")
            continue
        hyst = selection.hysteresis
        if hyst is not None:
            value = observed_value(cand.metrics, hyst.metric)
            incumbent = cand.strategy_id in previous
            threshold = hyst.exit if incumbent else hyst.enter
            if value is None or value < threshold:
                shown = "not measured" if value is None else _fmt(value)
                why = (f"was active but {hyst.metric} {shown} fell below exit {_fmt(hyst.exit)}"
                       if incumbent else
                       f"{hyst.metric} {shown} is below hysteresis enter {_fmt(hyst.enter)}")
                decisions[cand.strategy_id] = SelectionDecision(cand.strategy_id, False, why)
                continue
        pool.append(cand)

    top = selection.top_k
    if top is not None:
        ranked: list[tuple[float, Candidate]] = []
        for cand in pool:
            value = observed_value(cand.metrics, top.metric)
            if value is None:
                decisions[cand.strategy_id] = SelectionDecision(
                    cand.strategy_id, False, f"no {top.metric} to rank by")
                continue
            ranked.append((value, cand))
        sign = -1.0 if top.order == "desc" else 1.0
        ranked.sort(key=lambda vc: (sign * vc[0], vc[1].strategy_id))
        order = [c for _, c in ranked]
        limit = top.k
    else:
        order = pool  # already sorted by id
        limit = len(pool)

    corr = selection.correlation
    kept: list[Candidate] = []
    for rank, cand in enumerate(order, start=1):
        if len(kept) >= limit:
            decisions[cand.strategy_id] = SelectionDecision(
                cand.strategy_id, False, f"ranked {rank}, below the top {limit}", rank)
            continue
        notes: list[str] = []
        rejected_by: tuple[str, float] | None = None
        if corr is not None:
            if cand.returns is None:
                notes.append("correlation not checked (no returns)")
            else:
                for other in kept:
                    if other.returns is None:
                        continue
                    rho, n = overlap_correlation(cand.returns, other.returns)
                    if n < corr.min_overlap:
                        rho_cov = covariance_correlation(covariance, cand.strategy_id, other.strategy_id)
                        if rho_cov is None:
                            notes.append(f"correlation with {other.strategy_id} not measured "
                                         f"({n} shared periods < {corr.min_overlap})")
                            continue
                        rho = rho_cov
                        notes.append(f"correlation with {other.strategy_id} {_fmt(rho)} from the risk "
                                     f"snapshot's covariance ({n} shared periods < {corr.min_overlap})")
                    if rho == rho and rho > corr.max:
                        rejected_by = (other.strategy_id, rho)
                        break
        if rejected_by is not None:
            decisions[cand.strategy_id] = SelectionDecision(
                cand.strategy_id, False, f"returns correlate {_fmt(rejected_by[1])} with "
                f"{rejected_by[0]} (max {_fmt(corr.max)})", rank)  # type: ignore[union-attr]
            continue
        kept.append(cand)
        backfill = " (backfilled)" if top is not None and rank > limit else ""
        why = f"ranked {rank} by {top.metric}{backfill}" if top is not None else "passed the gates"
        if cand.strategy_id in previous and selection.hysteresis is not None:
            why += "; stays active (hysteresis)"
        if notes:
            why += "; " + "; ".join(notes)
        decisions[cand.strategy_id] = SelectionDecision(cand.strategy_id, True, why, rank)

    ordered = {c.strategy_id: decisions[c.strategy_id] for c in candidates if c.strategy_id in decisions}
    return SelectionResult(tuple(c.strategy_id for c in kept), ordered)
