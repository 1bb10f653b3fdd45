"""What a report shows, assembled from the facade's answers: pure functions (no store, no clock).

``assemble`` takes the results of ``WorldService`` calls (runs, their returns, campaign views,
activations, history, promotion requests) and returns a ``Report``: per strategy its stage, the
latest run of every stage with its gate rows and window progress, its chained returns, its part of
the decision timeline and any pending request's evidence hash; for the world its activations, the
timeline and which strategies are shown in full (all of them in a small world; the top and bottom
``top`` by the ranking metric, plus every live strategy and every one awaiting approval, in a big
one). The rest appear only in the summary table.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from qmtl_core.report._series import STAGE_ORDER
from qmtl_core.timeutil import human_duration

#: Stages shown in a strategy's metrics and gates: the chained ones, plus shadow beside paper.
REPORT_STAGES = ("backtest", "paper", "shadow", "live")

#: Metrics shown per stage for a strategy shown in full, in this order.
KEY_METRICS = ("sharpe", "sortino", "cagr", "total_return", "annual_volatility", "max_drawdown", "calmar",
               "win_rate", "n_trades", "n_observations")
#: Fractions shown as percentages wherever they appear (one unit per metric across the page).
PERCENT_METRICS = frozenset({"cagr", "total_return", "annual_volatility", "max_drawdown", "win_rate"})


@dataclass
class StageRun:
    """The latest revision of a strategy's latest run at one stage (as of the report's moment)."""

    stage: str
    run_id: str
    revision: int
    status: str
    policy_version: int | None
    recorded_at: str
    metrics: dict[str, Any]
    gates: list[dict[str, Any]]
    window: dict[str, Any]
    returns: list[list[Any]]
    sources: dict[str, str] = field(default_factory=dict)
    reason: str | None = None
    evidence_class: str | None = None


@dataclass
class StrategyReport:
    """One strategy in the report."""

    strategy_id: str
    stage: str
    runs: dict[str, StageRun]
    progress: list[dict[str, Any]]
    next_action: dict[str, Any] | None
    activation: dict[str, Any] | None
    pending: list[dict[str, Any]]
    timeline: list[dict[str, Any]]
    rank_value: float | None = None
    full: bool = False
    section: str | None = None  # "top", "bottom", "live", "pending", "selected"
    #: The world asks for a shadow window before live (``campaign.shadow``): the live gate checks it.
    shadow_gate: bool = False

    @property
    def headline(self) -> StageRun | None:
        """The run at its current stage, else the most advanced stage that has one."""
        if self.stage in self.runs:
            return self.runs[self.stage]
        for stage in reversed(STAGE_ORDER):
            if stage in self.runs:
                return self.runs[stage]
        return None

    @property
    def status(self) -> str:
        """The headline run's status (``no_run`` without one)."""
        run = self.headline
        return run.status if run is not None else "no_run"

    def segments(self) -> dict[str, list[list[Any]]]:
        """``{stage: [[iso_ts, r], ...]}`` for every stage with stored returns."""
        return {s: r.returns for s, r in self.runs.items() if r.returns}

    def gate_rows(self) -> list[dict[str, Any]]:
        """Every stage's rule results, stage by stage (the gate table)."""
        rows = []
        for stage in REPORT_STAGES:
            run = self.runs.get(stage)
            if stage == "shadow" and self.shadow_gate and self.stage in ("paper", "live"):
                rows.append(self._shadow_window_row(run))
            if run is None:
                continue
            for g in run.gates:
                rows.append({"stage": stage, "run": f"{run.run_id}#{run.revision}", "id": g.get("id"),
                             "metric": g.get("metric"), "observed": g.get("observed"),
                             "threshold": threshold(g.get("min"), g.get("max")),
                             "status": g.get("status"), "severity": g.get("severity"),
                             "source": g.get("source") or run.sources.get(str(g.get("metric"))),
                             "reason": g.get("reason")})
        return rows

    def _shadow_window_row(self, run: StageRun | None) -> dict[str, Any]:
        """The live gate's shadow window condition (``campaign.shadow``) as a gate row, with its
        evidence: the shadow run, its provenance and the window measured on data."""
        prog = next((p for p in self.progress if p.get("stage") == "shadow"), None) or {}
        need = []
        if prog.get("window_seconds"):
            need.append(f"≥ {human_duration(prog['window_seconds'])}")
        need.append(f"≥ {prog.get('min_observations') or 1} obs")
        evidence = (f"shadow run {run.run_id}#{run.revision} ({run.evidence_class or 'unverified'})"
                    if run is not None else "no shadow run: qmtl run --domain shadow")
        return {"stage": "shadow", "run": f"{run.run_id}#{run.revision}" if run is not None else None,
                "id": "shadow window (live gate)", "metric": "window", "observed": prog.get("label") or "none",
                "threshold": ", ".join(need), "status": "pass" if prog.get("satisfied") else "fail",
                "severity": "blocking", "source": evidence,
                "reason": "the live gate requires the shadow window (campaign.shadow) measured on data"}

    def to_dict(self, *, returns: bool = False) -> dict[str, Any]:
        """JSON form (``--json``); returns only on request (they are large)."""
        head = self.headline
        return {"strategy_id": self.strategy_id, "stage": self.stage, "status": self.status,
                "rank_value": self.rank_value, "full": self.full, "section": self.section,
                "headline_run": None if head is None else f"{head.stage} {head.run_id}#{head.revision}",
                "runs": {s: {"run_id": r.run_id, "revision": r.revision, "status": r.status,
                             "recorded_at": r.recorded_at, "metrics": r.metrics, "window": r.window,
                             **({"returns": r.returns} if returns else {})} for s, r in self.runs.items()},
                "gates": self.gate_rows(), "progress": self.progress, "next_action": self.next_action,
                "activation": self.activation,
                "pending_requests": [{"request_id": p["request_id"], "evidence_hash": p["evidence_hash"]}
                                     for p in self.pending]}


@dataclass
class Report:
    """A world's report."""

    world: str
    generated_at: str
    at: str | None
    policy: dict[str, Any]
    rank_metric: str
    rank_order: str
    strategies: list[StrategyReport]
    activations: list[dict[str, Any]]
    set_version: int | None
    halted: bool
    timeline: list[dict[str, Any]]
    pending: list[dict[str, Any]]
    top: int
    only: str | None = None
    notes: list[str] = field(default_factory=list)
    #: The approver's view of each pending request (``approval_view``), by request id; now only.
    approvals: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def full(self) -> list[StrategyReport]:
        """Strategies shown in full, in the order they appear."""
        order = {"selected": 0, "top": 1, "live": 2, "pending": 3, "bottom": 4}
        return sorted((s for s in self.strategies if s.full),
                      key=lambda s: (order.get(s.section or "", 5), rank_key(s, self.rank_order)))

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``--json``): everything but the returns."""
        return {"world": self.world, "generated_at": self.generated_at, "at": self.at, "policy": self.policy,
                "rank_metric": self.rank_metric, "top": self.top, "strategy": self.only,
                "strategies_total": len(self.strategies), "strategies_in_full": [s.strategy_id for s in self.full],
                "halted": self.halted, "set_version": self.set_version, "activations": self.activations,
                "pending_requests": self.pending, "timeline": self.timeline, "notes": self.notes,
                "approval_views": self.approvals,
                "strategies": [s.to_dict() for s in self.strategies]}


def threshold(lo: Any, hi: Any) -> str:
    """``≥ 0.8``, ``≤ 0.3`` or ``0.2 … 0.5`` (empty when the rule has neither)."""
    if lo is not None and hi is not None:
        return f"{fmt(lo)} … {fmt(hi)}"
    if lo is not None:
        return f"≥ {fmt(lo)}"
    if hi is not None:
        return f"≤ {fmt(hi)}"
    return ""


def fmt(value: Any, digits: int = 4) -> str:
    """A number with ``digits`` significant digits; ``-`` for none."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return "-"
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.{digits}g}"


def rank_key(s: StrategyReport, order: str) -> tuple[int, float]:
    if s.rank_value is None:
        return (1, 0.0)
    return (0, -s.rank_value if order == "desc" else s.rank_value)


def _strategy_of(entry: Mapping[str, Any]) -> str | None:
    payload = entry.get("payload") or {}
    if payload.get("strategy_id"):
        return str(payload["strategy_id"])
    subject = entry.get("subject") or ""
    if entry.get("kind", "").startswith(("promotion.", "strategy.")) and subject:
        return str(subject).split()[0]
    return None


def timeline_item(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A ledger entry as a timeline row: who, what, why, and for blocks the reason codes."""
    payload = entry.get("payload") or {}
    codes = [str(r.get("code")) for r in payload.get("reasons", []) if isinstance(r, Mapping) and r.get("code")]
    details = [str(r.get("detail")) for r in payload.get("reasons", []) if isinstance(r, Mapping) and r.get("detail")]
    extra = []
    if payload.get("request_id"):
        extra.append(f"request {payload['request_id']}")
    if payload.get("approvals"):
        extra.append("approved by " + ", ".join(str(a) for a in payload["approvals"]))
    if payload.get("changed"):
        extra.append(", ".join(f"{k} → {v}" for k, v in payload["changed"].items()))
    if payload.get("evidence_hash"):
        extra.append(f"evidence {str(payload['evidence_hash'])[:12]}")
    return {"seq": entry.get("seq"), "ts": entry.get("ts"), "actor": entry.get("actor"), "kind": entry.get("kind"),
            "strategy_id": _strategy_of(entry), "subject": entry.get("subject"), "reason": entry.get("reason"),
            "codes": codes, "details": details, "extra": "; ".join(extra)}


def _request_item(r: Mapping[str, Any]) -> dict[str, Any]:
    approvals = [a for a in r.get("approvals", []) if a.get("decision") == "approve"]
    return {"request_id": r["request_id"], "strategy_id": r["strategy_id"], "status": r.get("status"),
            "evidence_hash": r["evidence_hash"], "requester": r.get("requester"), "reason": r.get("reason"),
            "created_at": r.get("created_at"), "required_approvals": r.get("required_approvals"),
            "approvals": [{"approver": a.get("approver"), "reason": a.get("reason"), "at": a.get("at")}
                          for a in approvals]}


def pending_at(requests: Iterable[Mapping[str, Any]], at: datetime | None) -> list[Mapping[str, Any]]:
    """Requests pending at ``at`` as they stood then (opened by then, not decided by then, with only
    the approvals given by then); pending now without ``at``."""
    from qmtl_core.governance._requests import requests_at

    if at is None:
        return [r for r in requests if r.get("status") == "pending"]
    return [r for r in requests_at(requests, at) if r.get("status") == "pending"]


def _pick_runs(runs: Sequence[Any], at: datetime | None) -> dict[tuple[str, str], Any]:
    """The latest revision of the latest run per (strategy, stage): ``list_runs`` order, or the newest
    recorded at or before ``at`` from every revision."""
    picked: dict[tuple[str, str], Any] = {}
    if at is None:
        for r in runs:
            picked.setdefault((r.strategy_id, r.stage), r)
        return picked
    from qmtl_core.timeutil import iso

    cut = iso(at)
    for r in sorted((r for r in runs if r.recorded_at <= cut), key=lambda r: r.recorded_at, reverse=True):
        picked.setdefault((r.strategy_id, r.stage), r)
    return picked


def _progress_at(policy: Any, stage: str, run: StageRun | None) -> dict[str, Any]:
    """Window progress of a stage from a run's window (as ``qmtl_core.campaign.progress``)."""
    from qmtl_core.campaign import Progress
    from qmtl_core.timeutil import parse_instant

    config = getattr(policy.campaign, stage, None)
    window = getattr(config, "window", None)
    minimum = int(getattr(config, "min_observations", 1) or 1)
    w = run.window if run is not None else {}
    if not w or not w.get("start") or not w.get("end"):
        return Progress(stage, timedelta(0), 0, window, minimum).to_dict()
    span = parse_instant(w["end"]) - parse_instant(w["start"])
    return Progress(stage, span, int(w.get("n_observations") or 0), window, minimum).to_dict()


def assemble(*, world: str, policy: Any, runs: Sequence[Any], returns: Sequence[Mapping[str, Any]],
             views: Sequence[Mapping[str, Any]] | None, activations: Mapping[str, Any] | None,
             history: Mapping[str, Any], requests: Sequence[Mapping[str, Any]], at: datetime | None,
             now: datetime, top: int = 10, only: str | None = None) -> Report:
    """Build the report from facade results (``runs``: ``RunRevision`` objects; ``views``: campaign
    view dicts, ``None`` for a past moment; ``activations``: ``WorldService.activations`` now, or
    ``None`` to take them from ``history``)."""
    from qmtl_core.timeutil import iso

    picked = _pick_runs(runs, at)
    series = {(r["strategy_id"], r["stage"]): r for r in returns}
    stage_runs: dict[str, dict[str, StageRun]] = {}
    for (sid, stage), r in picked.items():
        ret = series.get((sid, stage))
        # The same pick as run_returns(latest_per_stage=True); a run revised between the two reads
        # shows the newer returns with the older gates until the next report.
        points = ret["returns"] if ret is not None else []
        stage_runs.setdefault(sid, {})[stage] = StageRun(
            stage, r.run_id, r.revision, r.status, r.policy_version, r.recorded_at, dict(r.metrics),
            list(r.rule_results), dict(r.window or {}), points, dict(r.metric_sources), r.reason,
            r.evidence_class)

    acts = list((activations or {}).get("activations") or history.get("activations") or [])
    why = {a["strategy_id"]: a.get("why") for a in history.get("activations", [])}
    acts = [{**a, "why": a.get("why", why.get(a["strategy_id"]))} for a in acts]
    act_by = {a["strategy_id"]: a for a in acts}
    view_by = {v["strategy_id"]: v for v in (views or [])}
    pending = [_request_item(r) for r in pending_at(requests, at)]
    pending_by: dict[str, list[dict[str, Any]]] = {}
    for p in pending:
        pending_by.setdefault(p["strategy_id"], []).append(p)
    timeline = [timeline_item(e) for e in history.get("timeline", [])]
    by_strategy: dict[str, list[dict[str, Any]]] = {}
    for t in timeline:
        by_strategy.setdefault(t["strategy_id"] or "", []).append(t)
    world_wide = by_strategy.get("", [])

    ids = set(stage_runs) | set(act_by) | (set(view_by) if at is None else set())
    if only is not None:
        ids &= {only}
        timeline = [t for t in timeline if t["strategy_id"] in (None, only)]
        pending = [p for p in pending if p["strategy_id"] == only]
        acts = [a for a in acts if a["strategy_id"] == only]

    lp = policy.live_promotion
    top_k = policy.selection.top_k
    rank_metric = top_k.metric if top_k is not None else "sharpe"
    rank_order = top_k.order if top_k is not None else "desc"
    out = []
    for sid in sorted(ids):
        runs_of = stage_runs.get(sid, {})
        view = view_by.get(sid) if at is None else None
        if view is not None:
            stage = view["stage"]
        elif sid in act_by:
            stage = act_by[sid]["stage"]
        else:
            stage = "backtest"
        if view is not None:
            progress = list(view.get("progress") or [])
            nxt = view.get("next_action")
        else:
            reached = STAGE_ORDER[: STAGE_ORDER.index(stage) + 1] if stage in STAGE_ORDER else STAGE_ORDER
            if "shadow" in runs_of or (policy.campaign.shadow is not None and "paper" in reached):
                reached = reached[:2] + ("shadow",) + reached[2:]  # as qmtl_core.campaign.campaign_view
            progress = [_progress_at(policy, st, runs_of.get(st)) for st in reached]
            nxt = None
        s = StrategyReport(sid, stage, {st: runs_of[st] for st in REPORT_STAGES if st in runs_of}, progress, nxt,
                           act_by.get(sid), pending_by.get(sid, []),
                           by_strategy.get(sid, []) + [t for t in world_wide if t["kind"].startswith("world.")],
                           shadow_gate=policy.campaign.shadow is not None)
        s.timeline.sort(key=lambda t: t["seq"] or 0)
        head = s.headline
        value = head.metrics.get(rank_metric) if head is not None else None
        s.rank_value = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
        out.append(s)

    _choose_full(out, top=top, order=rank_order, only=only)
    notes = []
    if at is not None:
        notes.append("as of a past moment: runs recorded by then, the activation set and timeline from the ledger; "
                     "next actions are not reconstructed")
    return Report(world=world, generated_at=iso(now), at=iso(at) if at is not None else None,
                  policy={"policy_version": policy.policy_version, "allow_live": policy.allow_live,
                          "mode": lp.mode, "approvers": list(lp.approver_names),
                          "required_approvals": lp.required_approvals, "max_live_slots": lp.max_live_slots,
                          "periods_per_year": policy.periods_per_year, "description": policy.description},
                  rank_metric=rank_metric, rank_order=rank_order, strategies=out, activations=acts,
                  set_version=(activations or {}).get("set_version"), halted=bool(history.get("halted")),
                  timeline=timeline, pending=pending, top=top, only=only, notes=notes)


def _choose_full(strategies: list[StrategyReport], *, top: int, order: str, only: str | None) -> None:
    """Mark the strategies shown in full: all when few, else top and bottom ``top`` by the ranking
    metric, plus live ones and those awaiting approval (what an approver must see)."""
    if only is not None or len(strategies) <= 2 * top:
        for s in strategies:
            s.full, s.section = True, ("selected" if only is not None else "top")
        return
    ranked = sorted(strategies, key=lambda s: rank_key(s, order))
    measured = [s for s in ranked if s.rank_value is not None]
    for s in measured[:top]:
        s.full, s.section = True, "top"
    for s in measured[len(measured) - top:] if len(measured) > top else []:
        if not s.full:
            s.full, s.section = True, "bottom"
    for s in strategies:
        if not s.full and s.stage == "live":
            s.full, s.section = True, "live"
        elif not s.full and s.pending:
            s.full, s.section = True, "pending"
