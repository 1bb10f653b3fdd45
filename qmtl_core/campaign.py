"""Campaigns: where each strategy stands, measured on data, and what to do next. Pure functions.

``tick(state, now)`` turns a ``WorldState`` (read from the store by the facade) into one
``Action`` per strategy. Same state and ``now`` give identical actions, and every action carries an
``idempotency_key`` hashed from the evidence it acts on: executing it changes the evidence, so a
second tick never repeats it, and a key is executed at most once, ever (the store enforces that).

Window progress is measured on the returns the stage's latest run was measured on (span of their
timestamps and their number), never on the wall-clock time between calls: repeating a call with
no new data does not move a window.

Exit classes (DESIGN §10) come from the action's reason: 0 for work to do or nothing wrong, 11 for
waiting (window incomplete, awaiting data), 10 for a policy block, 12 for missing or stale
evidence (fail closed).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson

from qmtl_core.evidence_class import home_stage, is_trusted
from qmtl_core.policy import WorldPolicy
from qmtl_core.policy._durations import format_duration
from qmtl_core.portfolio import PortfolioRisk
from qmtl_core.risk import INCOMPLETE, Freshness, SnapshotView, freshness, incomplete_detail
from qmtl_core.runs import INSUFFICIENT, suggested_run_id
from qmtl_core.timeutil import iso

PHASES: dict[str, str] = {"backtest": "backtest_campaign", "paper": "paper_campaign",
                          "live": "live_campaign"}

#: Actions the loop executes; the others only report.
EXECUTABLE = frozenset({"evaluate", "promote_to_paper", "request_live_approval", "apply_live", "demote"})

WAITING_REASONS = frozenset({"window_incomplete", "awaiting_data", "approval_pending", "approval_required",
                             "shadow_window_incomplete"})
BLOCKED_REASONS = frozenset({"validation_failed", "backtest_window_incomplete", "allow_live_false",
                             "promotion_disabled", "world_halted", "cooldown_active",
                             "max_live_slots_exceeded", "not_in_paper", "paper_window_incomplete",
                             "approvals_expired", "evidence_changed", "validation_stale",
                             "shadow_validation_failed"})
FAIL_CLOSED_REASONS = frozenset({"risk_snapshot_missing", "risk_snapshot_expired", "risk_snapshot_lagging",
                                 "risk_snapshot_incomplete", "insufficient_data", "evidence_untrusted"})


@dataclass(frozen=True)
class RunSummary:
    """The latest revision of a strategy's latest run at one stage (no returns: tick stays cheap).

    ``metrics`` and ``rule_results`` may be given as the store's raw JSON text: they are decoded
    on first use, because a tick over a large world needs them for few strategies.
    """

    run_id: str
    revision: int
    status: str
    policy_version: int | None
    content_hash: str
    raw_metrics: Mapping[str, float | None] | str | None
    raw_rule_results: Sequence[Mapping[str, Any]] | str | None
    window_start: datetime | None
    window_end: datetime | None
    n_observations: int
    #: Provenance class of the run (``qmtl_core.evidence_class``); ``None`` (older stores) is untrusted.
    evidence_class: str | None = None

    @property
    def metrics(self) -> Mapping[str, float | None]:
        """The run's metrics (decoded once)."""
        return self._decoded("raw_metrics", dict)

    @property
    def rule_results(self) -> tuple[Mapping[str, Any], ...]:
        """The run's rule results (decoded once)."""
        return self._decoded("raw_rule_results", tuple)

    def _decoded(self, name: str, kind: type) -> Any:
        value = getattr(self, name)
        if isinstance(value, (str, bytes)):
            from qmtl_core.store.engine import json_loads

            value = json_loads(value)
        if not isinstance(value, kind):
            value = kind(value or ())
        object.__setattr__(self, name, value)
        return value


@dataclass(frozen=True)
class StrategyState:
    """One strategy in a world: its stage and the latest run of each stage."""

    strategy_id: str
    stage: str
    runs: Mapping[str, RunSummary] = field(default_factory=dict)
    submitter: str | None = None
    #: When the strategy last changed stage: part of every action's evidence, so an action taken
    #: before a rollback or a re-promotion is not mistaken for one already taken in this stay.
    stage_since: str | None = None
    #: When the strategy entered its current stage: observations before it never count.
    entered_at: datetime | None = None


@dataclass(frozen=True)
class WorldState:
    """Everything ``tick`` needs about a world."""

    world: str
    policy: WorldPolicy
    strategies: tuple[StrategyState, ...]
    snapshot: SnapshotView | None = None
    halted: bool = False
    live_strategies: frozenset[str] = frozenset()
    last_live_promotion_at: datetime | None = None
    #: Open promotion requests by strategy (``qmtl_core.governance.RequestView``).
    requests: Mapping[str, Any] = field(default_factory=dict)
    #: Paper strategies' portfolio metrics against the book, when a rule gates on them.
    portfolio: Mapping[str, PortfolioRisk] = field(default_factory=dict)
    #: The newest trusted snapshot per stage (what the facade reads); without it, ``snapshot``
    #: stands for the stage it holds returns of.
    snapshots: Mapping[str, SnapshotView] = field(default_factory=dict)
    #: Code binding per strategy (``service._strategies.code_binding``): part of the promotion evidence.
    code_bindings: Mapping[str, str | None] = field(default_factory=dict)

    def snapshot_for(self, stage: str) -> SnapshotView | None:
        """The snapshot a decision at ``stage`` reads: the newest trusted one of that stage."""
        if self.snapshots:
            return self.snapshots.get(stage)
        return self.snapshot if self.snapshot is not None and self.snapshot.stage == stage else None


_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


@dataclass(frozen=True)
class Progress:
    """A stage's window measured on data: span of observed timestamps and their number."""

    stage: str
    span: timedelta
    n_observations: int
    window: timedelta | None
    min_observations: int

    @property
    def satisfied(self) -> bool:
        """Both the span and the number of observations reach the policy's window."""
        return (self.n_observations >= max(self.min_observations, 1)
                and (self.window is None or self.span >= self.window))

    def label(self) -> str:
        """E.g. ``paper 21/30d, 15/20 obs`` (span in the window's unit)."""
        unit = format_duration(self.window)[-1] if self.window is not None else "d"
        value = self.span.total_seconds() / _UNIT_SECONDS[unit]
        span = f"{value:.0f}" if value == 0 or value >= 10 else f"{value:.1f}".rstrip("0").rstrip(".")
        target = format_duration(self.window) if self.window is not None else unit
        return f"{self.stage} {span}/{target}, {self.n_observations}/{self.min_observations} obs"

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"stage": self.stage, "span_seconds": self.span.total_seconds(),
                "window_seconds": self.window.total_seconds() if self.window is not None else None,
                "n_observations": self.n_observations, "min_observations": self.min_observations,
                "satisfied": self.satisfied, "label": self.label()}


@dataclass(frozen=True)
class Action:
    """What tick recommends for one strategy (DESIGN §6)."""

    action: str
    world: str
    strategy_id: str
    stage: str
    reason: str
    detail: str
    requires: tuple[str, ...]
    idempotency_key: str
    suggested_run_id: str | None = None
    suggested_body: Mapping[str, Any] | None = None

    @property
    def executable(self) -> bool:
        """Whether the loop executes this action (the others only report)."""
        return self.action in EXECUTABLE

    @property
    def exit_class(self) -> int:
        """0, 10, 11 or 12 (DESIGN §10) for this action."""
        if self.reason in FAIL_CLOSED_REASONS:
            return 12
        if self.reason in BLOCKED_REASONS:
            return 10
        if self.reason in WAITING_REASONS:
            return 11
        return 0

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"action": self.action, "world": self.world, "strategy_id": self.strategy_id,
                "stage": self.stage, "reason": self.reason, "detail": self.detail,
                "requires": list(self.requires), "idempotency_key": self.idempotency_key,
                "suggested_run_id": self.suggested_run_id,
                "suggested_body": dict(self.suggested_body) if self.suggested_body is not None else None,
                "exit_class": self.exit_class}


#: Most severe first: what a whole run of actions exits with.
_SEVERITY = (12, 10, 11, 0)


def worst_exit(codes: list[int]) -> int:
    """The most severe of 0/10/11/12 (12 fail-closed > 10 blocked > 11 waiting > 0)."""
    for code in _SEVERITY:
        if code in codes:
            return code
    return 0


def progress(policy: WorldPolicy, stage: str, run: RunSummary | None) -> Progress:
    """Window progress of ``stage`` measured on the data of its latest run."""
    config = getattr(policy.campaign, stage, None)
    window = getattr(config, "window", None)
    minimum = int(getattr(config, "min_observations", 1) or 1)
    if run is None or run.window_start is None or run.window_end is None:
        return Progress(stage, timedelta(0), 0, window, minimum)
    return Progress(stage, run.window_end - run.window_start, run.n_observations, window, minimum)


def counted_run(s: StrategyState, stage: str) -> RunSummary | None:
    """The stage's latest run if it may count toward a window or a gate: trusted provenance and,
    past backtest, observed after the strategy entered the stage (paper, for shadow: ``home_stage``)
    (DESIGN §11)."""
    run = s.runs.get(stage)
    if run is None or stage == "backtest":
        return run
    if not is_trusted(run.evidence_class) or s.stage != home_stage(stage):
        return None
    if s.entered_at is not None and (run.window_start is None or run.window_start < s.entered_at):
        return None
    return run


def _measured_run(s: StrategyState, stage: str) -> RunSummary | None:
    """The run whose window the campaign view shows for ``stage``: for the window being earned
    now (the strategy's own stage, and shadow while in paper) only one that counts, so untrusted or
    backdated observations never look like progress; a stage already passed shows its last run."""
    if stage != "backtest" and home_stage(stage) == s.stage:
        return counted_run(s, stage)
    return s.runs.get(stage)


def uncounted_detail(s: StrategyState, stage: str) -> str | None:
    """Why the stage's latest run does not count, or ``None`` when it does (or there is none)."""
    run = s.runs.get(stage)
    if run is None or run.status == INSUFFICIENT or counted_run(s, stage) is not None:
        return None  # nothing measured is not "untrusted": the window and gates say what is missing
    if not is_trusted(run.evidence_class):
        return (f"{stage} run {run.run_id}#{run.revision} is {run.evidence_class or 'unverified'} evidence: only "
                "qmtl replay or a trusted producer's hub returns count")
    home = home_stage(stage)
    if s.stage != home:
        return f"{stage} run {run.run_id}#{run.revision} counts only while {s.strategy_id} is in {home}"
    return (f"{stage} run {run.run_id}#{run.revision} was observed before {s.strategy_id} entered {home}"
            + (f" at {iso(s.entered_at)[:19]}Z" if s.entered_at else ""))


def _key(world: str, strategy_id: str, action: str, stage: str, evidence: Mapping[str, Any]) -> str:
    """sha256 of the action and its evidence as sorted-key JSON. orjson, not ``canonical_json``:
    a tick hashes one key per strategy, and these keys are compared only with keys made here."""
    doc = {"world": world, "strategy_id": strategy_id, "action": action, "stage": stage, "evidence": evidence}
    return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _run_evidence(run: RunSummary | None) -> dict[str, Any] | None:
    if run is None:
        return None
    return {"run_id": run.run_id, "revision": run.revision, "content_hash": run.content_hash}


class _Ticker:
    """One tick over one world; methods build each strategy's action."""

    def __init__(self, state: WorldState, now: datetime) -> None:
        self.state = state
        self.policy = state.policy
        self.now = now
        # ``freshness(snap, strategy_id=s)`` depends on ``s`` only through "does the snapshot carry
        # its returns", and each call rebuilds that set: O(strategies x snapshot) per tick. Ask once
        # per stage, keep the set, and answer per strategy from them (same results).
        self._stage_fresh: dict[str, tuple[SnapshotView | None, Freshness, frozenset[str]]] = {}

    def _stage(self, stage: str) -> tuple[SnapshotView | None, Freshness, frozenset[str]]:
        if stage not in self._stage_fresh:
            snap = self.state.snapshot_for(stage)
            self._stage_fresh[stage] = (snap, freshness(snap, now=self.now, max_age=self.policy.risk.snapshot_max_age),
                                        snap.with_returns() if snap is not None else frozenset())
        return self._stage_fresh[stage]

    def fresh(self, strategy_id: str, stage: str) -> Freshness:
        snap, world, covered = self._stage(stage)
        if world.ok and snap is not None and strategy_id not in covered:
            version = snap.version  # what freshness() answers for a strategy without returns in it
            return Freshness("stale", INCOMPLETE, incomplete_detail(version, strategy_id), version)
        return world

    def make(self, s: StrategyState, action: str, reason: str, detail: str, *, stage: str | None = None,
             requires: tuple[str, ...] = (), evidence: Mapping[str, Any] | None = None,
             run_id: str | None = None, body: Mapping[str, Any] | None = None) -> Action:
        stage = stage or s.stage
        ev = {"policy_version": self.policy.policy_version, "reason": reason, "stage_since": s.stage_since,
              **(evidence or {})}
        return Action(action, self.state.world, s.strategy_id, stage, reason, detail, requires,
                      _key(self.state.world, s.strategy_id, action, stage, ev), run_id, body)

    def new_data(self, s: StrategyState, run: RunSummary | None, fresh: Freshness) -> Action | None:
        """An ``evaluate`` when the fresh snapshot holds returns of this stage the run has not seen,
        or when the policy changed since the run was gated."""
        snap = self._stage(s.stage)[0]
        series = snap.series(s.strategy_id) if snap is not None else None
        usable = fresh.ok and snap is not None and series is not None and snap.stage == s.stage
        if usable and series is not None and s.stage != "backtest" and s.entered_at is not None:
            # Points before entry never count: a series ending before it holds nothing new, and a
            # run ending where the series ends, measured since entry, has seen all that counts.
            if series[0] < s.entered_at or (
                    run is not None and run.status != INSUFFICIENT and run.window_end == series[0]
                    and run.window_start is not None and run.window_start >= s.entered_at
                    and run.n_observations <= series[1]):
                usable = False
        if usable and series is not None and snap is not None and (
                run is None or run.status == INSUFFICIENT or run.window_end is None
                or (run.window_end, run.n_observations) != series):
            run_id = suggested_run_id(s.stage, series[0], self.now)
            version = snap.version
            return self.make(s, "evaluate", "new_data",
                             f"risk snapshot {version} has {series[1]} {s.stage} returns up to "
                             f"{iso(series[0])[:19]}Z not yet evaluated",
                             requires=(f"risk_snapshot:{version}",),
                             evidence={"snapshot": snap.content_hash, "series_end": iso(series[0]),
                                       "series_n": series[1], "run": _run_evidence(run)},
                             run_id=run_id,
                             body={"strategy_id": s.strategy_id, "stage": s.stage, "run_id": run_id})
        if run is not None and run.status != INSUFFICIENT and run.policy_version != self.policy.policy_version:
            run_id = f"{run.run_id}-policy{self.policy.policy_version}"
            return self.make(s, "evaluate", "policy_changed",
                             f"run {run.run_id}#{run.revision} was gated under policy_version "
                             f"{run.policy_version}, the world is at {self.policy.policy_version}",
                             evidence={"run": _run_evidence(run)}, run_id=run_id,
                             body={"strategy_id": s.strategy_id, "stage": s.stage, "run_id": run_id})
        return None

    def backtest(self, s: StrategyState) -> Action:
        run = s.runs.get("backtest")
        fresh = self.fresh(s.strategy_id, "backtest")
        evaluate = self.new_data(s, run, fresh)
        if evaluate is not None:
            return evaluate
        ev = {"run": _run_evidence(run)}
        if run is None or run.status == INSUFFICIENT:
            return self.make(s, "blocked", "insufficient_data", "no measured backtest run: submit the "
                             "strategy or record one with qmtl world evaluate --strategy", evidence=ev)
        if run.status == "fail":
            return self.make(s, "blocked", "validation_failed", _failing(run), evidence=ev)
        prog = progress(self.policy, "backtest", run)
        if not prog.satisfied:
            return self.make(s, "blocked", "backtest_window_incomplete",
                             f"{prog.label()}: the backtest covers too little data", evidence=ev)
        body = {"strategy_id": s.strategy_id, "from_stage": "backtest", "to_stage": "paper",
                "evidence": _run_evidence(run)}
        return self.make(s, "promote_to_paper", "backtest_passed",
                         f"{prog.label()}; backtest run {run.run_id}#{run.revision} {run.status}",
                         stage="backtest", requires=(f"backtest_run:{run.run_id}#{run.revision}",),
                         evidence=ev, body=body)

    def paper(self, s: StrategyState) -> Action:
        run = s.runs.get("paper")
        fresh = self.fresh(s.strategy_id, "paper")
        evaluate = self.new_data(s, run, fresh)
        if evaluate is not None:
            return evaluate
        snap = self._stage("paper")[0]
        ev = {"run": _run_evidence(run), "snapshot": snap.content_hash if snap else None,
              "freshness": fresh.reason}
        uncounted = uncounted_detail(s, "paper")
        run = counted_run(s, "paper")
        if run is None or run.status == INSUFFICIENT:
            if not fresh.ok and fresh.reason != "risk_snapshot_incomplete":
                return self.make(s, "blocked", fresh.reason or "risk_snapshot_missing",
                                 f"paper campaign stalled: {fresh.detail}", evidence=ev)
            return self.make(s, "observe", "awaiting_data",
                             f"no trusted paper returns observed yet ({uncounted})" if uncounted
                             else "no paper returns observed yet", evidence=ev)
        prog = progress(self.policy, "paper", run)
        if not prog.satisfied:
            return self.make(s, "observe", "window_incomplete", prog.label(), evidence=ev)
        if run.status == "fail":
            return self.make(s, "blocked", "validation_failed", _failing(run), evidence=ev)
        return self.live_promotion(s, run, prog, fresh)

    def live_promotion(self, s: StrategyState, run: RunSummary, prog: Progress, fresh: Freshness) -> Action:
        """Hand the paper → live step to the governance gate and turn its answer into an action."""
        from qmtl_core.governance._gate import FAIL_CLOSED, GateInput, promotion_gate

        request = self.state.requests.get(s.strategy_id)
        gate = promotion_gate(GateInput(
            self.policy, s.strategy_id, s.stage, run, self._stage("paper")[0], self.state.halted,
            self.state.live_strategies, self.state.last_live_promotion_at, s.submitter, request,
            shadow_run=s.runs.get("shadow"), portfolio=self.state.portfolio.get(s.strategy_id),
            entered_at=s.entered_at, code_binding=self.state.code_bindings.get(s.strategy_id)), self.now)
        ev = {"gate_evidence": gate.evidence_hash, "request": request.request_id if request else None,
              "approvals": list(gate.valid_approvals), "codes": gate.codes}
        detail = "; ".join(f"{r.code}: {r.detail}" for r in gate.reasons)
        body = {"strategy_id": s.strategy_id, "from_stage": "paper", "to_stage": "live",
                "evidence_hash": gate.evidence_hash}
        if gate.allowed:
            return self.make(s, "apply_live", "gates_pass", f"{prog.label()}; every gate passes"
                             + (f"; approved by {', '.join(gate.valid_approvals)}" if gate.valid_approvals else ""),
                             requires=("governance",) + ((f"request:{request.request_id}",) if request else ()),
                             evidence=ev, body=body)
        codes = set(gate.codes)
        if codes <= {"approval_required", "approvals_expired"}:
            if request is None:
                return self.make(s, "request_live_approval", "approval_required",
                                 f"{prog.label()}; every other gate passes: open a request for "
                                 f"{self.policy.live_promotion.required_approvals} approvals",
                                 requires=("approvers",), evidence=ev, body=body)
            return self.make(s, "observe", "approval_pending", f"request {request.request_id}: {detail}",
                             evidence=ev)
        if codes - {"approval_required", "approvals_expired"} == {"shadow_window_incomplete"}:
            return self.make(s, "observe", "shadow_window_incomplete",
                             next(r.detail for r in gate.reasons if r.code == "shadow_window_incomplete"),
                             evidence=ev)
        # A standing refusal says more than stale evidence (it will never pass); then fail-closed.
        standing = ("allow_live_false", "promotion_disabled", "world_halted")
        worst = (next((r for r in gate.reasons if r.code in standing), None)
                 or next((r for r in gate.reasons if r.code in FAIL_CLOSED), None)
                 or next(r for r in gate.reasons if r.code not in ("approval_required", "approvals_expired")))
        # The action's reason is worst.code already: its detail leads without repeating the code.
        others = [f"{r.code}: {r.detail}" for r in gate.reasons if r is not worst]
        return self.make(s, "blocked", worst.code, "; ".join([worst.detail, *others]), evidence=ev)

    def live(self, s: StrategyState) -> Action:
        run = s.runs.get("live")
        fresh = self.fresh(s.strategy_id, "live")
        evaluate = self.new_data(s, run, fresh)
        if evaluate is not None:
            return evaluate
        ev = {"run": _run_evidence(run)}
        uncounted = uncounted_detail(s, "live")
        run = counted_run(s, "live")  # an unverified failing run never demotes (nor keeps) anyone
        if run is not None and run.status == "fail":
            return self.make(s, "demote", "validation_failed", _failing(run), evidence=ev,
                             body={"strategy_id": s.strategy_id, "from_stage": "live", "to_stage": "paper",
                                   "evidence": _run_evidence(run)})
        detail = progress(self.policy, "live", run).label() if run is not None else "no live run yet"
        if uncounted:
            detail += f"; not counted: {uncounted}"
        return self.make(s, "observe", "live_monitoring", detail, evidence=ev)


def _failing(run: RunSummary) -> str:
    failing = [r.get("reason", r.get("id")) for r in run.rule_results
               if r.get("status") == "fail" and r.get("severity") == "blocking"]
    return f"run {run.run_id}#{run.revision} fails: " + "; ".join(str(f) for f in failing)


def tick(state: WorldState, now: datetime) -> list[Action]:
    """The next action for every strategy of a world (retired ones excepted), by strategy id."""
    ticker = _Ticker(state, now)
    actions = []
    for s in sorted(state.strategies, key=lambda x: x.strategy_id):
        if s.stage == "backtest":
            actions.append(ticker.backtest(s))
        elif s.stage == "paper":
            actions.append(ticker.paper(s))
        elif s.stage == "live":
            actions.append(ticker.live(s))
    return actions


@dataclass(frozen=True)
class CampaignView:
    """What ``qmtl world campaign`` shows for one strategy."""

    strategy_id: str
    stage: str
    phase: str
    progress: tuple[Progress, ...]
    metrics: Mapping[str, float | None]
    rule_results: tuple[Mapping[str, Any], ...]
    next_action: Action | None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"strategy_id": self.strategy_id, "stage": self.stage, "phase": self.phase,
                "progress": [p.to_dict() for p in self.progress], "metrics": dict(self.metrics),
                "rules": [dict(r) for r in self.rule_results],
                "eligibility": self.next_action.detail if self.next_action else None,
                "next_action": self.next_action.to_dict() if self.next_action else None}


def campaign_view(state: WorldState, now: datetime) -> list[CampaignView]:
    """Per strategy: phase, window progress of every stage it reached, metrics vs gates, next action."""
    actions = {a.strategy_id: a for a in tick(state, now)}
    out = []
    order = ("backtest", "paper", "live")
    for s in sorted(state.strategies, key=lambda x: x.strategy_id):
        reached = order[: order.index(s.stage) + 1] if s.stage in order else order
        if "shadow" in s.runs or (state.policy.campaign.shadow is not None and "paper" in reached):
            # The shadow segment sits beside paper: live inputs mirrored, orders off.
            reached = reached[:2] + ("shadow",) + reached[2:]
        current = s.runs.get(s.stage)
        out.append(CampaignView(
            s.strategy_id, s.stage, PHASES.get(s.stage, s.stage),
            tuple(progress(state.policy, st, _measured_run(s, st)) for st in reached),
            current.metrics if current else {}, current.rule_results if current else (),
            actions.get(s.strategy_id)))
    return out
