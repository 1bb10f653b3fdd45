"""Offline cohort evaluation: metrics (vectorised) → gates → selection, as one pure function.

This is what ``qmtl world evaluate W --returns F`` runs without touching the store, and what the
recorded evaluation runs build on. Metric values given explicitly win over values computed from
returns (DESIGN §5: values in the request first); each value records where it came from.

Portfolio metrics (``incremental_var_99``, ``stress_loss_max`` ...) never come from the files: a
book cannot be described by the candidate. Offline they come from a ``BookRisk`` the caller read
(the world's newest trusted snapshot of the stage, against the world's current book); a metric a
blocking rule needs and that could not be measured is listed in ``unmeasured`` with why, and the
evaluation exits 12 (fail closed) unless a measured rule already fails it (10).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qmtl_core.datafiles import ReturnsTable
from qmtl_core.errors import BadInputError
from qmtl_core.extra_metrics import computed_extras
from qmtl_core.metric_names import COMPUTED_EXTRAS, is_portfolio_metric
from qmtl_core.policy import WorldPolicy
from qmtl_core.policy._engine import GateResult, Status, clean_number, evaluate_gates
from qmtl_core.policy._selection import Candidate, SelectionResult, select
from qmtl_core.portfolio import PortfolioRisk
from qmtl_core.spacing import return_warnings

if TYPE_CHECKING:
    import numpy as np

SOURCE_GIVEN = "request.metrics"
SOURCE_RETURNS = "request.returns"
SOURCE_DERIVED = "derived"


@dataclass(frozen=True)
class BookRisk:
    """Portfolio metrics of each candidate against the world's book (``runs.book_risk``), or why a
    candidate has none (no fresh snapshot of the stage, or it does not cover the candidate)."""

    risks: Mapping[str, PortfolioRisk] = field(default_factory=dict)
    why_not: Mapping[str, str] = field(default_factory=dict)


NO_BOOK = "no risk snapshot was read"


@dataclass(frozen=True)
class StrategyReport:
    """One strategy's metrics (with sources), gate results and selection decision."""

    strategy_id: str
    metrics: Mapping[str, float | None]
    sources: Mapping[str, str]
    gates: GateResult
    selected: bool
    selection_reason: str
    rank: int | None
    #: Portfolio metrics a rule of the stage names that could not be measured, with why.
    unmeasured: Mapping[str, str] = field(default_factory=dict)

    @property
    def fails_measured(self) -> bool:
        """A blocking rule fails on a value that was measured (a policy block, not missing evidence)."""
        return any(r.status == "fail" and r.severity == "blocking" and r.metric not in self.unmeasured
                   for r in self.gates.rules)

    @property
    def status(self) -> Status:
        """The gate summary: pass, warn or fail."""
        return self.gates.status

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"strategy_id": self.strategy_id, "status": self.status,
                "selected": self.selected, "rank": self.rank,
                "selection_reason": self.selection_reason,
                "metrics": dict(self.metrics), "metric_sources": dict(self.sources),
                "rules": [r.to_dict() for r in self.gates.rules], "unmeasured": dict(self.unmeasured)}


@dataclass(frozen=True)
class CohortEvaluation:
    """The result of evaluating many strategies together at one stage."""

    world: str
    stage: str
    policy_version: int
    strategies: tuple[StrategyReport, ...]
    selection: SelectionResult
    previous_active: tuple[str, ...] = ()
    n_trials: int | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def status(self) -> Status:
        """``fail`` when any strategy failed a blocking gate, else ``warn`` if any warned, else pass."""
        statuses = {s.status for s in self.strategies}
        return "fail" if "fail" in statuses else ("warn" if "warn" in statuses else "pass")

    @property
    def exit_code(self) -> int:
        """10 when a blocking rule fails on a measured value; else 12 when a portfolio metric a
        blocking rule needs could not be measured (fail closed); else 0."""
        if any(s.fails_measured for s in self.strategies):
            return 10
        if any(r.metric in s.unmeasured and r.severity == "blocking" for s in self.strategies for r in s.gates.rules):
            return 12
        return 0

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        counts = {k: sum(1 for s in self.strategies if s.status == k) for k in ("pass", "warn", "fail")}
        return {"world": self.world, "stage": self.stage, "policy_version": self.policy_version,
                "status": self.status, "exit_code": self.exit_code, "counts": counts, "n_trials": self.n_trials,
                "previous_active": list(self.previous_active),
                "selected": list(self.selection.selected),
                "strategies": [s.to_dict() for s in self.strategies], "notes": list(self.notes)}


def cohort_metrics(returns: ReturnsTable, periods_per_year: int,
                   n_trials: int | None = None) -> dict[str, dict[str, float | None]]:
    """Metrics of every strategy in ``returns`` through the vectorised cohort path.

    With ``n_trials`` the deflated Sharpe ``dsr`` is added; the variance of the trials' Sharpe
    ratios it needs is measured on this cohort (a second pass over the same kernel).
    """
    import numpy as np

    from qmtl_core.metrics import compute_cohort

    try:
        arrays = compute_cohort(returns.matrix, periods_per_year)
        if n_trials is not None:
            sharpe = arrays["sharpe"][~np.isnan(arrays["sharpe"])]
            variance = float(np.var(sharpe, ddof=1)) if sharpe.size > 1 else 0.0
            arrays = compute_cohort(returns.matrix, periods_per_year, n_trials=n_trials,
                                    trials_sharpe_variance=variance if n_trials > 1 else None)
    except ValueError as exc:
        raise BadInputError(f"returns cannot be measured: {exc}") from None
    out: dict[str, dict[str, float | None]] = {}
    for i, sid in enumerate(returns.strategies):
        out[sid] = {name: clean_number(values[i]) for name, values in arrays.items()}
    return out


def merge_metrics(computed: Mapping[str, float | None], given: Mapping[str, Any]
                  ) -> tuple[dict[str, float | None], dict[str, str]]:
    """One strategy's metrics from returns, overridden by values given in the request, with the
    source of each (DESIGN §5: values in the request first)."""
    values: dict[str, float | None] = {}
    where: dict[str, str] = {}
    for name, value in computed.items():
        values[name], where[name] = value, SOURCE_RETURNS
    for name, value in given.items():
        values[name], where[name] = clean_number(value), SOURCE_GIVEN
    return values, where


def wanted_extras(policy: WorldPolicy) -> frozenset[str]:
    """The computed extras (``metric_names.COMPUTED_EXTRAS``) a rule or selection step names."""
    return frozenset(n for n in COMPUTED_EXTRAS if uses_metric(policy, n))


def add_extras(policy: WorldPolicy, values: dict[str, float | None], where: dict[str, str], *,
               series: "np.ndarray | None", benchmark: "np.ndarray | None", source: str) -> None:
    """Add the computed extras the policy names to one strategy's metrics, unless given already.

    ``n_trades_per_year`` is derived from ``n_trades`` (execution records) wherever that came
    from, so its source is ``derived``; the others are measured on ``series``.
    """
    wanted = wanted_extras(policy) - {n for n, s in where.items() if s == SOURCE_GIVEN}
    if not wanted:
        return
    import numpy as np

    data = series if series is not None else np.array([], dtype=np.float64)
    measured = computed_extras(data, periods_per_year=policy.periods_per_year, wanted=wanted,
                               benchmark=benchmark, known=values)
    for name, value in measured.items():
        if series is None and name != "n_trades_per_year":
            continue
        values[name] = value
        where[name] = SOURCE_DERIVED if name == "n_trades_per_year" else source


def uses_metric(policy: WorldPolicy, name: str) -> bool:
    """Whether any rule or selection step of ``policy`` reads metric ``name``."""
    sel = policy.selection
    return any(r.metric == name for r in policy.rules) or any(
        step is not None and step.metric == name for step in (sel.top_k, sel.hysteresis))


def evaluate_cohort(policy: WorldPolicy, *, stage: str,
                    metrics: Mapping[str, Mapping[str, Any]] | None = None,
                    returns: ReturnsTable | None = None,
                    previous_active: Collection[str] = (),
                    n_trials: int | None = None,
                    covariance: Mapping[tuple[str, str], float] | None = None,
                    book: BookRisk | None = None) -> CohortEvaluation:
    """Gate and select a cohort; metrics come from ``metrics`` and/or are computed from ``returns``.

    ``n_trials`` (for the deflated Sharpe ``dsr``) defaults, when a rule or the selection uses
    ``dsr``, to the cohort's size: every strategy in the cohort is one trial of the same search.
    ``covariance`` (a fresh risk snapshot's, keyed both ways) decides correlations of pairs whose
    returns overlap too little. ``book``: the portfolio metrics read for the candidates (see the
    module docstring); without it, portfolio metrics are not measured.
    """
    if metrics is None and returns is None:
        raise BadInputError("nothing to evaluate", hint="give returns or metrics")
    notes: list[str] = []
    given = {sid: dict(m) for sid, m in (metrics or {}).items()}
    ignored = sorted({k for m in given.values() for k in m if is_portfolio_metric(k)})
    if ignored:
        notes.append(f"{', '.join(ignored)} ignored in the metrics file: portfolio metrics come only from a "
                     "trusted producer's risk snapshot")
        given = {sid: {k: v for k, v in m.items() if not is_portfolio_metric(k)} for sid, m in given.items()}
    computed: dict[str, dict[str, float | None]] = {}
    if returns is not None:
        if n_trials is None and uses_metric(policy, "dsr"):
            n_trials = len(returns.strategies)
        notes.extend(return_warnings(policy, returns.timestamps))
        computed = cohort_metrics(returns, policy.periods_per_year, n_trials)
    ids = sorted(set(given) | set(computed))
    rows = {sid: i for i, sid in enumerate(returns.strategies)} if returns is not None else {}

    benchmark = None
    if policy.benchmark is not None and {"alpha", "beta"} & wanted_extras(policy):
        if returns is not None and policy.benchmark in rows:
            benchmark = returns.matrix[rows[policy.benchmark]]
        else:
            notes.append(f"benchmark {policy.benchmark} is not a column of the returns: alpha and beta "
                         "not measured")
    gates: dict[str, GateResult] = {}
    merged: dict[str, dict[str, float | None]] = {}
    sources: dict[str, dict[str, str]] = {}
    unmeasured: dict[str, dict[str, str]] = {}
    needed = sorted({r.metric for r in policy.rules_for(stage) if is_portfolio_metric(r.metric)})
    for sid in ids:
        values, where = merge_metrics(computed.get(sid, {}), given.get(sid, {}))
        add_extras(policy, values, where, series=returns.matrix[rows[sid]] if sid in rows else None,
                   benchmark=benchmark, source=SOURCE_RETURNS)
        unmeasured[sid] = _book_metrics(needed, book, sid, values, where)
        merged[sid], sources[sid] = values, where
        gates[sid] = evaluate_gates(policy, values, stage=stage, strategy_id=sid, sources=where)

    candidates = [Candidate(sid, gates[sid].status, merged[sid],
                            returns.matrix[rows[sid]] if sid in rows else None) for sid in ids]
    selection = select(policy.selection, candidates, previous_active, covariance)
    unknown = sorted(set(previous_active) - set(ids))
    if unknown:
        notes.append("previously active but not in this cohort: " + ", ".join(unknown))
    reports = tuple(
        StrategyReport(sid, merged[sid], sources[sid], gates[sid],
                       selection.decisions[sid].selected, selection.decisions[sid].reason,
                       selection.decisions[sid].rank, unmeasured[sid])
        for sid in ids)
    return CohortEvaluation(policy.world, stage, policy.policy_version, reports, selection,
                            tuple(sorted(previous_active)), n_trials, tuple(notes))


def _book_metrics(needed: Sequence[str], book: BookRisk | None, strategy_id: str,
                  values: dict[str, float | None], where: dict[str, str]) -> dict[str, str]:
    """Add the candidate's portfolio metrics from ``book`` (with their snapshot as source); return
    the ones rules need that it lacks, each with why (never a silent zero)."""
    risk = book.risks.get(strategy_id) if book is not None else None
    if risk is not None:
        for name, value in risk.metrics.items():
            if value is not None:
                values[name], where[name] = value, risk.source
    out: dict[str, str] = {}
    for name in needed:
        if values.get(name) is not None:
            continue
        if risk is not None:
            out[name] = f"snapshot {risk.version} has no {risk.lacking(name)}"
        else:
            out[name] = book.why_not.get(strategy_id, NO_BOOK) if book is not None else NO_BOOK
    return out
