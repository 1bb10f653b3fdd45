"""Evaluation runs: metric sourcing (pure), and recording runs with revisions (store).

A run is keyed ``(world, strategy_id, stage, run_id)``. Posting the same key again with different
content makes a new revision (history kept); the same content again is a no-op, so retries are
safe. Every revision records the policy version, each metric's source, the rule results and the
window of returns it was measured on.

Sourcing, per metric, first source that has it wins (DESIGN §5):
1. values in the request;
2. returns in the request;
3. realized returns (and ``extra_metrics``) for the **same stage** in a fresh risk snapshot;
4. the previous run of the **same stage**.
A paper run never takes backtest numbers. With nothing to source from, the run is recorded as
``insufficient_data`` with the reasons each source was unavailable.

Provenance (DESIGN §11): every metric carries the class of its source (``qmtl_core.evidence_class``)
and the run the class of its evidence: values and returns in a request are ``unverified`` unless
the caller is qmtl's own replay; snapshot returns are ``hub`` (only a trusted producer's snapshots
are read); a previous run passes on its own class. A run is trusted only when every metric is. For
a paper or live run of a strategy in that stage, observations dated before it entered the stage
are dropped (and said so); a paper or live run of a strategy not in that stage is ``unverified``.

Portfolio metrics (``qmtl_core.portfolio``: ``incremental_var_99``, ``max_corr_live`` ...) describe
the world's book *now*, not the strategy, so they come only from a fresh snapshot: never from the
request (a submitter cannot vouch for the book) nor from a previous run (the book has changed since).
When a rule of the run's stage names one the snapshot cannot give, nothing is recorded and
``EvidenceMissing`` says which entry is missing (``risk_snapshot_incomplete``, exit 12).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from qmtl_core import ledger
from qmtl_core.canonical import content_hash
from qmtl_core.errors import BadInputError, EvidenceMissing
from qmtl_core.evaluation import add_extras
from qmtl_core.evidence_class import EvidenceClass, home_stage, is_trusted
from qmtl_core.metric_names import is_portfolio_metric
from qmtl_core.policy import WorldPolicy
from qmtl_core.consistency import consistency_results
from qmtl_core.policy._engine import RuleResult, clean_number, evaluate_gates, summarize
from qmtl_core.portfolio import DEFAULT_MIN_OVERLAP, PortfolioRisk, portfolio_risk
from qmtl_core.risk import INCOMPLETE, MISSING, Freshness, StoredSnapshot
from qmtl_core.spacing import return_warnings
from qmtl_core.store import schema
from qmtl_core.timeutil import iso

INSUFFICIENT = "insufficient_data"
Returns = Sequence[tuple[datetime, float]]

# The statements every evaluation runs, built once: SQLAlchemy then neither builds nor keys them again
# on each call, which was about half the cost of a primary-key read.
_RUNS, _REVS, _HEADS, _STRATEGIES = (schema.evaluation_runs, schema.run_revisions, schema.run_heads,
                                     schema.strategies)
_RUN_BY_KEY = sa.select(_RUNS).where(_RUNS.c.world_id == sa.bindparam("w"), _RUNS.c.strategy_id == sa.bindparam("s"),
                                     _RUNS.c.stage == sa.bindparam("st"), _RUNS.c.run_id == sa.bindparam("r"))
_REVISION = sa.select(_REVS).where(_REVS.c.run_pk == sa.bindparam("pk"), _REVS.c.revision == sa.bindparam("rev"))
_NEW_RUN = sa.insert(_RUNS).returning(_RUNS.c.id)
_NEXT_REVISION = sa.update(_RUNS).where(_RUNS.c.id == sa.bindparam("pk"))
_NEW_REVISION = sa.insert(_REVS)
_HEAD_KEY = (_HEADS.c.world_id == sa.bindparam("w"), _HEADS.c.strategy_id == sa.bindparam("s"),
             _HEADS.c.stage == sa.bindparam("st"))
_HEAD = sa.select(_HEADS.c.run_pk, _HEADS.c.updated_at).where(*_HEAD_KEY)
_NEW_HEAD = sa.insert(_HEADS)
_MOVE_HEAD = sa.update(_HEADS).where(*_HEAD_KEY)
_STRATEGY = sa.select(_STRATEGIES).where(_STRATEGIES.c.world_id == sa.bindparam("w"),
                                         _STRATEGIES.c.strategy_id == sa.bindparam("s"))


def suggested_run_id(stage: str, window_end: datetime | None, now: datetime) -> str:
    """``<stage>-<UTC end of the data window>`` (or of ``now`` without data): ``paper-20260131``
    for a window ending at midnight, else ``paper-20260131T143000Z``. The same data gives the
    same id, so re-posting it is a revision of the same run, never a new run."""
    at = (window_end if window_end is not None else now).astimezone(timezone.utc)
    if (at.hour, at.minute, at.second, at.microsecond) == (0, 0, 0, 0):
        return f"{stage}-{at:%Y%m%d}"
    return f"{stage}-{at:%Y%m%dT%H%M%S}Z"


@dataclass(frozen=True)
class Window:
    """The returns a run was measured on: span and number of observations."""

    start: str | None
    end: str | None
    n_observations: int
    source: str | None
    #: What the returns' timestamps say against the policy (``spacing.return_warnings``): a rate
    #: that disagrees with ``periods_per_year``, or one return spanning a gap.
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``warnings`` only when there are some, so that runs recorded before they
        existed keep their content hash)."""
        out: dict[str, Any] = {"start": self.start, "end": self.end, "n_observations": self.n_observations,
                               "source": self.source}
        if self.warnings:
            out["warnings"] = list(self.warnings)
        return out


@dataclass(frozen=True)
class PreviousRun:
    """The latest measured revision of the same stage, as a fallback source."""

    run_id: str
    revision: int
    metrics: Mapping[str, float | None]
    window: Mapping[str, Any] | None
    evidence_class: str | None = None


@dataclass(frozen=True)
class Sourced:
    """Metrics with their sources, the window, and why any source was not used."""

    metrics: dict[str, float | None]
    sources: dict[str, str]
    window: Window
    returns: list[tuple[str, float]] | None
    notes: list[str] = field(default_factory=list)
    #: Provenance class per metric, and of the run as a whole (trusted only if every metric is).
    metric_classes: dict[str, str] = field(default_factory=dict)
    evidence_class: str = EvidenceClass.UNVERIFIED

    @property
    def empty(self) -> bool:
        """True when no source gave anything."""
        return not self.sources


def _metrics_from_returns(series: Returns, periods_per_year: int) -> dict[str, float | None]:
    import numpy as np

    from qmtl_core.metrics import compute_metrics

    try:
        values = compute_metrics(np.array([r for _, r in series], dtype=np.float64), periods_per_year)
    except ValueError as exc:
        raise BadInputError(f"returns cannot be measured: {exc}") from None
    return {k: clean_number(v) for k, v in values.items()}


def portfolio_rules(policy: WorldPolicy, stage: str | None = None) -> list[Any]:
    """The rules (of ``stage``, or of any stage) that name a portfolio metric."""
    rules = policy.rules if stage is None else policy.rules_for(stage)
    return [r for r in rules if is_portfolio_metric(r.metric)]


def book_risk(policy: WorldPolicy, strategy_id: str, snapshot: StoredSnapshot | None,
              fresh: Freshness | None, book: frozenset[str], *, check_fresh: bool = True) -> PortfolioRisk | None:
    """The strategy's portfolio metrics against ``book`` when the policy gates on any and the
    snapshot is fresh; ``None`` otherwise (``require_portfolio`` says why when it matters).
    ``check_fresh=False`` leaves freshness to the caller (the promotion gate judges it itself)."""
    if not portfolio_rules(policy) or snapshot is None:
        return None
    if check_fresh and (fresh is None or not fresh.ok):
        return None
    corr = policy.selection.correlation
    return portfolio_risk(snapshot.snapshot, strategy_id, book, periods_per_year=policy.periods_per_year,
                          min_overlap=corr.min_overlap if corr is not None else DEFAULT_MIN_OVERLAP)


def portfolio_gaps(policy: WorldPolicy, stage: str, risk: PortfolioRisk | None,
                   fresh: Freshness | None) -> tuple[str, str] | None:
    """``(reason code, detail)`` when a blocking rule of ``stage`` needs a portfolio metric the
    snapshot cannot give; ``None`` when every such rule can be measured. Pure. (A soft or info rule
    whose metric is missing only reports it, as for any metric: it could not block either.)"""
    for rule in portfolio_rules(policy, stage):
        if rule.severity != "blocking":
            continue
        if risk is None:
            code = fresh.reason if fresh is not None and fresh.reason else MISSING
            detail = fresh.detail if fresh is not None else "the world has no risk snapshot"
            return code or MISSING, f"rule {rule.id} needs {rule.metric} from a fresh risk snapshot: {detail}"
        if rule.metric in risk.missing or rule.metric not in risk.metrics:
            return INCOMPLETE, f"rule {rule.id} needs {rule.metric}, but {risk.version} has no {risk.lacking(rule.metric)}"
    return None


def require_portfolio(policy: WorldPolicy, stage: str, risk: PortfolioRisk | None,
                      fresh: Freshness | None) -> None:
    """Refuse (fail closed, exit 12) when ``portfolio_gaps`` finds one."""
    gap = portfolio_gaps(policy, stage, risk, fresh)
    if gap is not None:
        raise EvidenceMissing(gap[1], code=gap[0], hint="post a risk snapshot with the covariance, weights "
                              "and stress entries of the strategy and the book (qmtl risk put)")


def source_metrics(*, stage: str, periods_per_year: int, strategy_id: str,
                   metrics: Mapping[str, Any] | None = None, returns: Returns | None = None,
                   snapshot: StoredSnapshot | None = None, snapshot_freshness: Freshness | None = None,
                   previous: PreviousRun | None = None, portfolio: PortfolioRisk | None = None,
                   policy: WorldPolicy | None = None, request_class: str = EvidenceClass.UNVERIFIED,
                   observed_since: datetime | None = None, in_stage: bool = True) -> Sourced:
    """Pick each metric from the first source that has it; pure (no store, no clock).

    ``policy`` (when given) names the computed extras to measure on the returns and the benchmark.
    ``request_class`` is the provenance of ``metrics`` and ``returns`` (``unverified`` unless the
    caller is qmtl's own replay). ``observed_since``: observations dated before it are dropped (the
    strategy entered the stage then). ``in_stage`` False: the strategy is not in ``stage``, so
    nothing observed for it there can count, whatever its source.
    """
    chosen: dict[str, float | None] = {}
    sources: dict[str, str] = {}
    classes: dict[str, str] = {}
    notes: list[str] = []
    window = Window(None, None, 0, None)
    used_returns: list[tuple[str, float]] | None = None
    if metrics:
        given = [n for n in metrics if is_portfolio_metric(n)]
        if given:
            notes.append(f"{', '.join(sorted(given))} ignored in the request: portfolio metrics come only "
                         "from the risk snapshot")
            metrics = {k: v for k, v in metrics.items() if not is_portfolio_metric(k)}

    def take(values: Mapping[str, Any], source: str, klass: str) -> None:
        for name, value in values.items():
            if name in sources:
                continue
            chosen[name] = clean_number(value)
            sources[name] = source
            classes[name] = klass

    def observed(series: Returns, source: str) -> list[tuple[datetime, float]]:
        ordered = sorted(series)
        if observed_since is None:
            return ordered
        kept = [(t, r) for t, r in ordered if t >= observed_since]
        if len(kept) < len(ordered):
            notes.append(f"{len(ordered) - len(kept)} {source} observation(s) dated before the strategy "
                         f"entered {home_stage(stage)} at {iso(observed_since)[:19]}Z not counted")
        return kept

    def from_series(series: Returns, source: str, klass: str) -> None:
        nonlocal window, used_returns
        measured = window_of(series, source, policy)  # may refuse: the policy's spacing rule
        take(_metrics_from_returns(series, periods_per_year), source, klass)
        window = measured
        notes.extend(measured.warnings)
        used_returns = [(iso(t), float(r)) for t, r in series]
        if policy is not None:
            extras: dict[str, float | None] = {}
            where: dict[str, str] = {k: "request.metrics" for k in (metrics or {})}
            add_extras(policy, extras, where, series=_array([r for _, r in series]),
                       benchmark=_benchmark(policy, series, snapshot), source=source)
            take({k: v for k, v in extras.items() if where.get(k) == source}, source, klass)

    counted = observed(returns, "request.returns") if returns else None
    # Metrics sent with returns describe those returns: when none of them counts, neither do they.
    if metrics and (counted or not returns):
        take(metrics, "request.metrics", request_class)
    if portfolio is not None:  # read from a trusted producer's snapshot only
        take({k: v for k, v in portfolio.metrics.items() if v is not None}, portfolio.source, EvidenceClass.HUB)
    if counted:
        from_series(counted, "request.returns", request_class)
    elif returns:
        pass  # every point predates the stage: nothing from the request, and no snapshot either
    elif snapshot is None:
        notes.append(f"no trusted {stage} risk snapshot for the world")
    else:
        snap = snapshot.snapshot
        series = snap.returns_of(strategy_id)
        if snapshot_freshness is not None and not snapshot_freshness.ok:
            notes.append(f"risk snapshot not used: {snapshot_freshness.reason} ({snapshot_freshness.detail})")
        elif snap.provenance.stage != stage:
            notes.append(f"risk snapshot {snap.version} holds {snap.provenance.stage} returns, "
                         f"not {stage}")
        elif not series:
            notes.append(f"risk snapshot {snap.version} has no realized returns for {strategy_id}")
        elif kept := observed(series, f"risk snapshot {snap.version}"):
            try:
                from_series(kept, f"risk_snapshot:{snap.version}", EvidenceClass.HUB)
            except BadInputError as exc:  # the policy refuses their spacing: the snapshot is not usable
                notes.append(f"risk snapshot {snap.version} returns not used: {exc.message}")
    if snapshot is not None and (snapshot_freshness is None or snapshot_freshness.ok) \
            and snapshot.snapshot.provenance.stage == stage:
        take((snapshot.snapshot.extra_metrics or {}).get(strategy_id, {}), f"risk_snapshot:{snapshot.version}",
             EvidenceClass.HUB)
    if policy is not None:  # n_trades_per_year from n_trades, wherever that came from
        derived: dict[str, float | None] = dict(chosen)
        where = dict(sources)
        add_extras(policy, derived, where, series=None, benchmark=None, source="")
        take({k: derived[k] for k in where if where[k] == "derived" and k not in sources}, "derived",
             classes.get("n_trades", EvidenceClass.UNVERIFIED))
    if previous is not None:
        before = set(sources)
        take({k: v for k, v in previous.metrics.items() if k not in sources and not is_portfolio_metric(k)},
             f"previous_run:{previous.run_id}#{previous.revision}",
             previous.evidence_class or EvidenceClass.UNVERIFIED)
        if window.source is None and previous.window and set(sources) != before:
            w = previous.window
            window = Window(w.get("start"), w.get("end"), int(w.get("n_observations") or 0),
                            f"previous_run:{previous.run_id}#{previous.revision}")
    elif not sources:
        notes.append(f"no previous {stage} run")
    return Sourced(chosen, sources, window, used_returns, notes, classes,
                   run_class(classes, window_class=classes.get("n_observations"), in_stage=in_stage))


def run_class(classes: Mapping[str, str], *, window_class: str | None, in_stage: bool = True) -> str:
    """A run's class: untrusted when any metric is (or when the strategy is not in the stage),
    else the class of the returns its window was measured on (else of its first metric)."""
    if not in_stage or not classes or not all(is_trusted(c) for c in classes.values()):
        return EvidenceClass.UNVERIFIED
    return window_class or next(iter(classes.values()))


def _array(values: list[float]) -> Any:
    import numpy as np

    return np.array(values, dtype=np.float64)


def _benchmark(policy: WorldPolicy, ordered: Returns, snapshot: StoredSnapshot | None) -> Any:
    """The policy's benchmark series aligned to ``ordered``'s time stamps (NaN where it has none),
    from the snapshot's realized returns; ``None`` when there is none to align."""
    if policy.benchmark is None or snapshot is None:
        return None
    points = snapshot.snapshot.returns_of(policy.benchmark)
    if not points:
        return None
    by_ts = dict(points)
    return _array([by_ts.get(t, float("nan")) for t, _ in ordered])


def _rounded(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.12g}")


def window_of(series: Returns | None, source: str, policy: WorldPolicy | None = None) -> Window:
    """The window a (sorted) series spans (empty window without data), with the warnings its
    timestamps raise under ``policy`` (``spacing.return_warnings``: ``BadInputError`` when the
    policy makes a spacing mismatch an error)."""
    if not series:
        return Window(None, None, 0, None)
    warnings = tuple(return_warnings(policy, [t for t, _ in series])) if policy is not None else ()
    return Window(iso(series[0][0]), iso(series[-1][0]), len(series), source, warnings)


# --- store ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunRevision:
    """One stored revision of an evaluation run."""

    world_id: str
    strategy_id: str
    stage: str
    run_id: str
    revision: int
    status: str
    policy_version: int | None
    metrics: dict[str, Any]
    metric_sources: dict[str, str]
    rule_results: list[dict[str, Any]]
    window: dict[str, Any] | None
    reason: str | None
    content_hash: str
    recorded_at: str
    recorded_by: str
    created: bool = True
    evidence_class: str = EvidenceClass.UNVERIFIED
    metric_classes: dict[str, str] = field(default_factory=dict)

    def to_dict(self, *, with_rules: bool = True) -> dict[str, Any]:
        """JSON form."""
        out = {"world": self.world_id, "strategy_id": self.strategy_id, "stage": self.stage,
               "run_id": self.run_id, "revision": self.revision, "status": self.status,
               "policy_version": self.policy_version, "metrics": self.metrics,
               "metric_sources": self.metric_sources, "window": self.window, "reason": self.reason,
               "content_hash": self.content_hash, "recorded_at": self.recorded_at,
               "recorded_by": self.recorded_by, "evidence_class": self.evidence_class,
               "metric_classes": self.metric_classes,
               "warnings": list((self.window or {}).get("warnings") or [])}
        if with_rules:
            out["rules"] = self.rule_results
        return out


def _revision(run: Any, rev: Any, created: bool = True) -> RunRevision:
    return RunRevision(run.world_id, run.strategy_id, run.stage, run.run_id, rev.revision, rev.status,
                       rev.policy_version, rev.metrics or {}, rev.metric_sources or {},
                       rev.rule_results or [], rev.window, rev.reason, rev.content_hash,
                       rev.recorded_at, rev.recorded_by, created,
                       rev.evidence_class or EvidenceClass.UNVERIFIED, rev.metric_classes or {})


def ensure_strategy(conn: Connection, *, world_id: str, strategy_id: str, now: datetime,
                    submitter: str | None = None, name: str | None = None) -> Any:
    """The strategy's row, created at stage ``backtest`` the first time the world sees it."""
    key = {"w": world_id, "s": strategy_id}
    row = conn.execute(_STRATEGY, key).first()
    if row is None:
        conn.execute(sa.insert(_STRATEGIES).values(world_id=world_id, strategy_id=strategy_id, name=name,
                                                   stage="backtest", submitter=submitter, submitted_at=iso(now),
                                                   stage_entered_at=iso(now), updated_at=iso(now)))
        row = conn.execute(_STRATEGY, key).one()
    return row


def previous_run(conn: Connection, *, world_id: str, strategy_id: str, stage: str,
                 exclude_run: str | None = None) -> PreviousRun | None:
    """The latest measured (not ``insufficient_data``) revision of the same stage."""
    runs, revs = schema.evaluation_runs, schema.run_revisions
    query = (sa.select(runs.c.run_id, revs.c.revision, revs.c.metrics, revs.c.window, revs.c.evidence_class)
             .join(revs, revs.c.run_pk == runs.c.id)
             .where(runs.c.world_id == world_id, runs.c.strategy_id == strategy_id,
                    runs.c.stage == stage, revs.c.status != INSUFFICIENT)
             .order_by(revs.c.recorded_at.desc(), revs.c.id.desc()).limit(1))
    if exclude_run is not None:
        query = query.where(runs.c.run_id != exclude_run)
    row = conn.execute(query).first()
    if row is None:
        return None
    return PreviousRun(row.run_id, row.revision, row.metrics or {}, row.window, row.evidence_class)


def record_run(conn: Connection, *, policy: WorldPolicy, strategy_id: str, stage: str, run_id: str,
               sourced: Sourced, actor: str, now: datetime, policy_hash: str | None = None,
               ledger_entry: bool = True) -> RunRevision:
    """Gate the sourced metrics (and the world's consistency checks at this stage) and store them
    as the run's next revision (or return the latest revision unchanged when the content is
    identical). Call inside a write transaction."""
    if sourced.empty:
        status, rule_results = INSUFFICIENT, []
        outcome = "nothing to source metrics from"
        reason = outcome + ": " + "; ".join(sourced.notes)
    else:
        gates = evaluate_gates(policy, sourced.metrics, stage=stage, strategy_id=strategy_id,
                               sources=sourced.sources)
        results = list(gates.rules) + _consistency(conn, policy, strategy_id, stage, sourced)
        status, rule_results = summarize(results), [r.to_dict() for r in results]
        failing = [r["id"] for r in rule_results if r["status"] != "pass" and r["severity"] != "info"]
        reason = outcome = ("rules not passing: " + ", ".join(failing)) if failing else "every rule passes"
        if sourced.notes:
            reason += " (" + "; ".join(sourced.notes) + ")"
    body = {"status": status, "policy_version": policy.policy_version, "metrics": sourced.metrics,
            "metric_sources": sourced.sources, "rule_results": rule_results,
            "window": sourced.window.to_dict(), "returns": sourced.returns, "reason": outcome,
            "evidence_class": sourced.evidence_class, "metric_classes": sourced.metric_classes}
    # Float noise below 12 significant digits (1-D vs cohort kernels) is not new evidence, and
    # neither are the notes on why a source went unused: they carry ages that change by the
    # second ("snapshot 3600s old"), so hashing them made a new, empty revision on every call.
    digest = content_hash({**body, "metrics": {k: _rounded(v) for k, v in sourced.metrics.items()},
                           "rule_results": [{**r, "observed": _rounded(r["observed"])} for r in rule_results]})
    run = conn.execute(_RUN_BY_KEY, {"w": policy.world, "s": strategy_id, "st": stage, "r": run_id}).first()
    if run is not None:
        latest = conn.execute(_REVISION, {"pk": run.id, "rev": run.latest_revision}).one()
        if latest.content_hash == digest:
            return _revision(run, latest, created=False)
        revision = run.latest_revision + 1
        conn.execute(_NEXT_REVISION, {"pk": run.id, "latest_revision": revision, "updated_at": iso(now)})
        run_pk = run.id
    else:
        revision = 1
        run_pk = conn.execute(_NEW_RUN, {
            "world_id": policy.world, "strategy_id": strategy_id, "stage": stage, "run_id": run_id,
            "latest_revision": 1, "created_at": iso(now), "updated_at": iso(now)}).scalar_one()
    conn.execute(_NEW_REVISION, {
        "run_pk": run_pk, "revision": revision, "status": status, "policy_version": policy.policy_version,
        "policy_hash": policy_hash, "metrics": sourced.metrics, "metric_sources": sourced.sources,
        "rule_results": rule_results, "window": sourced.window.to_dict(), "returns": sourced.returns,
        "reason": reason, "content_hash": digest, "recorded_at": iso(now), "recorded_by": actor,
        "evidence_class": sourced.evidence_class, "metric_classes": sourced.metric_classes})
    _advance_head(conn, world_id=policy.world, strategy_id=strategy_id, stage=stage, run_pk=run_pk,
                  head={"run_id": run_id, "revision": revision, "status": status,
                        "policy_version": policy.policy_version, "content_hash": digest,
                        "window_start": sourced.window.start, "window_end": sourced.window.end,
                        "n_observations": sourced.window.n_observations, "metrics": sourced.metrics,
                        "rule_results": rule_results, "updated_at": iso(now),
                        "evidence_class": sourced.evidence_class})
    if ledger_entry:
        ledger.append(conn, actor=actor, kind="run.recorded", now=now, world=policy.world,
                      subject=f"{strategy_id} {stage} {run_id}#{revision}", reason=reason,
                      payload={"strategy_id": strategy_id, "stage": stage, "run_id": run_id,
                               "revision": revision, "status": status,
                               "policy_version": policy.policy_version, "content_hash": digest,
                               "evidence_class": sourced.evidence_class})
    # Built from what was just written rather than read back: two round trips fewer per run.
    return RunRevision(policy.world, strategy_id, stage, run_id, revision, status, policy.policy_version,
                       sourced.metrics, sourced.sources, rule_results, sourced.window.to_dict(), reason, digest,
                       iso(now), actor, True, sourced.evidence_class, sourced.metric_classes)


def _advance_head(conn: Connection, *, world_id: str, strategy_id: str, stage: str, run_pk: int,
                  head: dict[str, Any]) -> None:
    """Keep the (strategy, stage) head on the latest revision of the latest run after a write.

    "Latest" is the order ``list_runs`` shows: by the run's ``updated_at``, then its id. The head
    is the maximum of that order: a write that sorts at or above it becomes the head; one that
    sorts below it leaves it, unless it is the head's own run moving down (a clock set back), when
    the head is found again among the stage's runs.
    """
    runs_t = schema.evaluation_runs
    key = {"w": world_id, "s": strategy_id, "st": stage}
    current = conn.execute(_HEAD, key).first()
    if current is None:
        conn.execute(_NEW_HEAD, {"world_id": world_id, "strategy_id": strategy_id, "stage": stage,
                                 "run_pk": run_pk, **head})
    elif (head["updated_at"], run_pk) >= (current.updated_at, current.run_pk):
        conn.execute(_MOVE_HEAD, {**key, "run_pk": run_pk, **head})
    elif current.run_pk == run_pk:
        latest = conn.execute(
            sa.select(runs_t.c.id).where(runs_t.c.world_id == world_id, runs_t.c.strategy_id == strategy_id,
                                         runs_t.c.stage == stage)
            .order_by(runs_t.c.updated_at.desc(), runs_t.c.id.desc()).limit(1)).scalar_one()
        conn.execute(_MOVE_HEAD, {**key, **_head_of(conn, latest)})


def _head_of(conn: Connection, run_pk: int) -> dict[str, Any]:
    """The head columns for a run's latest revision, read from the store."""
    runs_t, revs = schema.evaluation_runs, schema.run_revisions
    row = conn.execute(sa.select(runs_t.c.run_id, runs_t.c.updated_at, revs)
                       .join(revs, sa.and_(revs.c.run_pk == runs_t.c.id, revs.c.revision == runs_t.c.latest_revision))
                       .where(runs_t.c.id == run_pk)).one()
    window = row.window or {}
    return {"run_pk": run_pk, "run_id": row.run_id, "revision": row.revision, "status": row.status,
            "policy_version": row.policy_version, "content_hash": row.content_hash,
            "window_start": window.get("start"), "window_end": window.get("end"),
            "n_observations": int(window.get("n_observations") or 0), "metrics": row.metrics,
            "rule_results": row.rule_results, "updated_at": row.updated_at,
            "evidence_class": row.evidence_class}


def reference_returns(conn: Connection, *, world_id: str, strategy_id: str, stage: str) -> list[float] | None:
    """The returns of the latest revision of the strategy's latest run at ``stage`` (``None``: no run)."""
    h, revs = schema.run_heads, schema.run_revisions
    head = conn.execute(sa.select(h.c.run_pk, h.c.revision).where(
        h.c.world_id == world_id, h.c.strategy_id == strategy_id, h.c.stage == stage)).first()
    if head is None:
        return None
    stored = conn.execute(sa.select(revs.c.returns).where(revs.c.run_pk == head.run_pk,
                                                          revs.c.revision == head.revision)).scalar()
    return [float(r) for _, r in (stored or [])] or None


def _consistency(conn: Connection, policy: WorldPolicy, strategy_id: str, stage: str,
                 sourced: Sourced) -> list[RuleResult]:
    checks = policy.consistency_for(stage)
    if not checks:
        return []
    refs = {c.against: reference_returns(conn, world_id=policy.world, strategy_id=strategy_id, stage=c.against)
            for c in checks}
    return consistency_results(policy, stage, [r for _, r in sourced.returns or []], refs)


def evaluate_and_record(conn: Connection, *, policy: WorldPolicy, policy_hash: str | None,
                        strategy_id: str, stage: str, run_id: str | None,
                        metrics: Mapping[str, Any] | None, returns: Returns | None, actor: str,
                        now: datetime, book: frozenset[str] = frozenset(),
                        request_class: str = EvidenceClass.UNVERIFIED, extra_notes: Sequence[str] = ()) -> RunRevision:
    """Source metrics (DESIGN §5) and record the run, inside the caller's write transaction.

    The caller holds the strategy's evaluation lock (``locks.evaluation``) or ``ledger.lock``, so
    nothing read here changes before the append: another evaluation of the same strategy waits,
    and so does every governance flow. ``book`` is the world's book for portfolio metrics
    (``risk.portfolio_book``), read by the caller (needed only when ``portfolio_rules`` has some).
    ``request_class``: the provenance of ``metrics`` and ``returns`` (the facade decides it from
    who is calling; only qmtl's own replay is trusted).
    """
    from qmtl_core.risk import freshness, latest_snapshot
    from qmtl_core.timeutil import parse_instant, parse_optional_instant, refuse_future

    if returns:
        refuse_future((t for t, _ in returns), now=now, tolerance=policy.risk.future_tolerance,
                      where=lambda i: f"{strategy_id} {stage} returns, point {i + 1}")
    row = ensure_strategy(conn, world_id=policy.world, strategy_id=strategy_id, now=now, submitter=actor)
    observed_since, in_stage = None, True
    notes = list(extra_notes)
    if stage != "backtest":
        in_stage = row.stage == home_stage(stage)
        observed_since = parse_optional_instant(row.stage_entered_at) if in_stage else None
        if not in_stage:
            notes.append(f"{strategy_id} is in {row.stage}, not {home_stage(stage)}: nothing observed "
                         f"at {stage} counts")
    gated = bool(portfolio_rules(policy, stage))  # only then are the book's metrics part of this run
    snapshot = latest_snapshot(conn, policy.world, stage=stage) if not returns or gated else None
    fresh = (freshness(snapshot, now=now, max_age=policy.risk.snapshot_max_age, strategy_id=strategy_id)
             if snapshot is not None else None)
    risk = book_risk(policy, strategy_id, snapshot, fresh, book) if gated else None
    previous = previous_run(conn, world_id=policy.world, strategy_id=strategy_id, stage=stage)
    if previous is not None and observed_since is not None and not _within(previous.window, observed_since):
        previous = None  # measured in an earlier stay in this stage
    sourced = source_metrics(stage=stage, periods_per_year=policy.periods_per_year,
                             strategy_id=strategy_id, metrics=metrics, returns=returns,
                             snapshot=snapshot if not returns else None, snapshot_freshness=fresh,
                             previous=previous, portfolio=risk, policy=policy, request_class=request_class,
                             observed_since=observed_since, in_stage=in_stage)
    sourced.notes[:0] = notes
    if not sourced.empty:  # with nothing at all to measure the run is insufficient_data (exit 12) anyway
        require_portfolio(policy, stage, risk, fresh)  # raising rolls back the strategy row made above
    end = parse_instant(sourced.window.end) if sourced.window.end is not None else None
    key = run_id or suggested_run_id(stage, end, now)
    if run_id is None and end is None:
        # No data names this run, so its id would be the clock's: the stage's latest run, when it
        # had no data either, is the same run instead, and identical content a no-op rather
        # than a new run per call.
        key = _dataless_head(conn, policy.world, strategy_id, stage) or key
    return record_run(conn, policy=policy, strategy_id=strategy_id, stage=stage, run_id=key,
                      sourced=sourced, actor=actor, now=now, policy_hash=policy_hash)


def _within(window: Mapping[str, Any] | None, since: datetime) -> bool:
    from qmtl_core.timeutil import parse_optional_instant

    start = parse_optional_instant((window or {}).get("start"))
    return start is not None and start >= since


def _dataless_head(conn: Connection, world_id: str, strategy_id: str, stage: str) -> str | None:
    """The run id of the stage's latest run when that run had no data window, else ``None``."""
    heads = schema.run_heads
    row = conn.execute(sa.select(heads.c.run_id, heads.c.window_end).where(
        heads.c.world_id == world_id, heads.c.strategy_id == strategy_id, heads.c.stage == stage)).first()
    return str(row.run_id) if row is not None and row.window_end is None else None


def list_runs(conn: Connection, *, world_id: str, strategy_id: str | None = None,
              stage: str | None = None, history: bool = False) -> list[RunRevision]:
    """Runs of a world (latest revision each, or every revision with ``history``), newest first."""
    runs, revs = schema.evaluation_runs, schema.run_revisions
    query = sa.select(runs, revs).join(revs, revs.c.run_pk == runs.c.id).where(runs.c.world_id == world_id)
    if not history:
        query = query.where(revs.c.revision == runs.c.latest_revision)
    if strategy_id is not None:
        query = query.where(runs.c.strategy_id == strategy_id)
    if stage is not None:
        query = query.where(runs.c.stage == stage)
    query = query.order_by(runs.c.updated_at.desc(), runs.c.id.desc(), revs.c.revision.desc())
    out = []
    for row in conn.execute(query):
        m = row._mapping
        run = _Row(world_id=m["world_id"], strategy_id=m["strategy_id"], stage=m["stage"], run_id=m["run_id"])
        out.append(_revision(run, row))
    return out


@dataclass(frozen=True)
class _Row:
    world_id: str
    strategy_id: str
    stage: str
    run_id: str
