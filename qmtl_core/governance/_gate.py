"""The paper → live promotion gate (DESIGN §7): a pure function that names every reason it blocks.

It never stops at the first reason: a reviewer (and ``qmtl promote --dry-run``) sees everything
standing between a strategy and live at once. Missing or stale evidence blocks with a fail-closed
reason code; a policy refusal with a policy code. Approvals count only for the exact evidence they
were given on, only from listed approvers who are neither the requester nor the submitter, once
per approver, and only within ``approval_ttl``.

Only trusted evidence counts (DESIGN §11): the paper run must be ``qmtl replay`` or ``hub`` and
observed after the strategy entered paper, and the snapshot a trusted producer's paper snapshot
carrying the strategy's realized returns. The evidence hash binds the paper run, the snapshot's
substance, the policy version and the code (code hash, parameters, data): any change voids a request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from qmtl_core.approval_signing import approval_message, signature_problem
from qmtl_core.campaign import RunSummary, StrategyState, counted_run, progress, uncounted_detail
from qmtl_core.canonical import content_hash
from qmtl_core.metric_names import is_portfolio_metric
from qmtl_core.policy import Rule, WorldPolicy
from qmtl_core.policy._engine import check_rule
from qmtl_core.portfolio import PortfolioRisk
from qmtl_core.risk import INCOMPLETE, SnapshotView, freshness
from qmtl_core.timeutil import iso

#: A portfolio rule fails for the book with the candidate (a policy block, exit 10).
PORTFOLIO_LIMIT = "portfolio_limit_exceeded"
FAIL_CLOSED = frozenset({"risk_snapshot_missing", "risk_snapshot_expired", "risk_snapshot_lagging",
                         "risk_snapshot_incomplete", "evidence_untrusted"})


@dataclass(frozen=True)
class Reason:
    """One reason a promotion is blocked: a stable code and words for people."""

    code: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        """JSON form."""
        return {"code": self.code, "detail": self.detail}


@dataclass(frozen=True)
class Approval:
    """One approver's decision on a request, bound to the evidence hash they saw."""

    approver: str
    decision: str  # approve | reject
    evidence_hash: str
    created_at: datetime
    reason: str = ""
    #: An SSH signature (armored ``ssh-keygen -Y sign`` output) over ``approval_message``, if given.
    signature: str | None = None


@dataclass(frozen=True)
class RequestView:
    """An open promotion request as the gate sees it."""

    request_id: str
    requester: str
    evidence_hash: str
    created_at: datetime
    approvals: tuple[Approval, ...] = ()


@dataclass(frozen=True)
class GateInput:
    """Everything the gate decides on (read from the store by the facade)."""

    policy: WorldPolicy
    strategy_id: str
    stage: str | None
    paper_run: RunSummary | None
    snapshot: SnapshotView | None
    halted: bool = False
    live_strategies: frozenset[str] = frozenset()
    last_live_promotion_at: datetime | None = None
    submitter: str | None = None
    request: RequestView | None = None
    #: The latest shadow run (``qmtl run --domain shadow``); counts only when the world asks for a
    #: shadow window (``campaign.shadow``).
    shadow_run: RunSummary | None = None
    #: The candidate's portfolio metrics against the live book, from ``snapshot`` (``runs.book_risk``).
    portfolio: PortfolioRisk | None = None
    #: When the strategy entered its stage (paper runs observed before it do not count).
    entered_at: datetime | None = None
    #: ``service._strategies.code_binding`` of the strategy's submission (code hash, parameters, data).
    code_binding: str | None = None


@dataclass(frozen=True)
class GateResult:
    """Allowed, or every reason not; plus the evidence the decision was made on."""

    allowed: bool
    reasons: tuple[Reason, ...]
    evidence: Mapping[str, Any]
    evidence_hash: str
    valid_approvals: tuple[str, ...] = ()
    needs_approval: bool = False

    @property
    def codes(self) -> list[str]:
        """The reason codes, in check order."""
        return [r.code for r in self.reasons]

    @property
    def exit_code(self) -> int:
        """0 allowed; 12 when evidence is missing or stale; 11 when only approvals are missing;
        10 for any other policy block."""
        if self.allowed:
            return 0
        codes = set(self.codes)
        if codes & FAIL_CLOSED:
            return 12
        if codes <= {"approval_required", "shadow_window_incomplete"}:
            return 11
        return 10

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"allowed": self.allowed, "reasons": [r.to_dict() for r in self.reasons],
                "evidence": dict(self.evidence), "evidence_hash": self.evidence_hash,
                "valid_approvals": list(self.valid_approvals), "exit_code": self.exit_code}


def portfolio_gate_rules(policy: WorldPolicy) -> list[Rule]:
    """Blocking rules on portfolio metrics the live gate re-checks at decision time: those of the
    paper and live stages (taking a strategy live adds it to the live book, so the book *now* decides)."""
    return [r for r in policy.rules if is_portfolio_metric(r.metric) and r.severity == "blocking"
            and (r.applies_to("paper") or r.applies_to("live"))]


def portfolio_reasons(g: GateInput) -> list[Reason]:
    """Why the book with the candidate breaks a portfolio rule, or cannot be measured (fail closed)."""
    reasons: list[Reason] = []
    risk = g.portfolio
    for rule in portfolio_gate_rules(g.policy):
        observed = None if risk is None else risk.metrics.get(rule.metric)
        if risk is None or observed is None:
            reasons.append(Reason(INCOMPLETE, f"rule {rule.id} needs {rule.metric}: " + _lacking(risk, rule.metric)))
            continue
        result = check_rule(rule, observed, on_missing="fail", source=risk.source)
        if result.status == "fail":
            book = ", ".join(risk.book) or "nothing live"
            reasons.append(Reason(PORTFOLIO_LIMIT, f"rule {rule.id}: {result.reason} (book: {book}; {risk.source})"))
    return reasons


def _lacking(risk: PortfolioRisk | None, metric: str) -> str:
    if risk is None:
        return "the risk snapshot gave no portfolio metrics"
    return f"snapshot {risk.version} has no {risk.lacking(metric)}"


def _run_evidence(run: RunSummary | None) -> dict[str, Any] | None:
    if run is None:
        return None
    return {"run_id": run.run_id, "revision": run.revision, "content_hash": run.content_hash,
            "status": run.status, "policy_version": run.policy_version, "metrics": dict(run.metrics),
            "evidence_class": run.evidence_class,
            "window": {"start": iso(run.window_start) if run.window_start else None,
                       "end": iso(run.window_end) if run.window_end else None,
                       "n_observations": run.n_observations}}


def evidence_of(g: GateInput) -> dict[str, Any]:
    """What a promotion is decided on: paper run revision, metrics, window, policy, snapshot, and
    the shadow run when the world asks for a shadow window (only then, so the evidence hash of a
    world without one does not move when a shadow run is recorded), and the portfolio metrics of
    the book with the candidate when rules gate on them (likewise only then)."""
    out = {
        "world": g.policy.world, "strategy_id": g.strategy_id, "policy_version": g.policy.policy_version,
        "code_binding": g.code_binding,
        "paper_run": _run_evidence(g.paper_run),
        "snapshot": None if g.snapshot is None else snapshot_evidence(g.snapshot, g.strategy_id),
    }
    if g.policy.campaign.shadow is not None:
        out["shadow_run"] = _run_evidence(g.shadow_run)
    names = sorted({r.metric for r in portfolio_gate_rules(g.policy)})
    if names:  # only then, so evidence bound before portfolio rules existed keeps its hash
        risk = g.portfolio
        out["portfolio"] = None if risk is None else {
            "source": risk.source, "book": list(risk.book), "metrics": {n: risk.metrics.get(n) for n in names}}
    return out


def snapshot_evidence(stored: SnapshotView, strategy_id: str) -> dict[str, Any]:
    """The part of a risk snapshot a promotion of ``strategy_id`` rests on (``risk.substance_hash``)."""
    return {"content_hash": stored.substance_hash(strategy_id)}


def signature_problem_for(g: GateInput, a: Approval) -> str | None:
    """Why ``a`` does not carry the signature the policy asks for (``None`` when it needs none or has a
    valid one). A signature given where none is required must still verify: a bad one never counts."""
    lp = g.policy.live_promotion
    key = lp.ssh_keys.get(a.approver)
    if not lp.require_signatures and a.signature is None:
        return None
    if key is None:
        return f"{a.approver} has no ssh_key in the policy"
    assert g.request is not None
    message = approval_message(world=g.policy.world, strategy_id=g.strategy_id, request_id=g.request.request_id,
                               evidence_hash=a.evidence_hash)
    return signature_problem(key, a.signature, message)


def count_approvals(g: GateInput, evidence_hash: str, now: datetime) -> tuple[list[str], list[Reason]]:
    """Approvers whose approval counts now, and notes on the ones that do not."""
    lp = g.policy.live_promotion
    request = g.request
    if request is None:
        return [], []
    valid: list[str] = []
    expired: list[str] = []
    notes: list[Reason] = []
    for a in sorted(request.approvals, key=lambda x: x.created_at):
        if a.decision != "approve" or a.approver in valid:
            continue
        if a.approver not in lp.approver_names or a.approver in (request.requester, g.submitter):
            continue  # refused when given; never counts even if the store says otherwise
        if a.evidence_hash != evidence_hash:
            continue
        if signature_problem_for(g, a) is not None:
            continue
        if a.created_at + lp.approval_ttl < now:
            expired.append(a.approver)
            continue
        valid.append(a.approver)
    if expired and len(valid) < lp.required_approvals:
        notes.append(Reason("approvals_expired", f"approvals by {', '.join(expired)} are older than "
                            f"approval_ttl"))
    return valid, notes


def _as_state(g: GateInput) -> StrategyState:
    """The strategy as ``counted_run`` sees it: one rule decides what counts, in the tick and here."""
    runs = {stage: run for stage, run in (("paper", g.paper_run), ("shadow", g.shadow_run)) if run is not None}
    return StrategyState(g.strategy_id, g.stage or "", runs, entered_at=g.entered_at)


def shadow_reasons(g: GateInput) -> list[Reason]:
    """The shadow window (``campaign.shadow``), measured on the shadow run's data like the paper
    window, and the shadow run's own gates; nothing when the world asks for no shadow window."""
    if g.policy.campaign.shadow is None:
        return []
    out = []
    state = _as_state(g)
    untrusted = uncounted_detail(state, "shadow") if g.stage == "paper" else None  # else: not_in_paper
    if untrusted is not None:
        out.append(Reason("evidence_untrusted", untrusted))
    run = counted_run(state, "shadow")
    prog = progress(g.policy, "shadow", run)
    if not prog.satisfied:
        how = "" if g.shadow_run is not None else " (feed it: qmtl run FILE --world W --domain shadow --data BARS)"
        out.append(Reason("shadow_window_incomplete", prog.label() + how))
    if run is not None and run.status == "fail":
        out.append(Reason("shadow_validation_failed", f"shadow run {run.run_id}#{run.revision} fails its gates"))
    return out


def promotion_gate(g: GateInput, now: datetime) -> GateResult:
    """Decide a paper → live promotion now; pure."""
    policy = g.policy
    lp = policy.live_promotion
    reasons: list[Reason] = []
    if not policy.allow_live:
        reasons.append(Reason("allow_live_false", "the world sets allow_live: false"))
    if lp.mode == "disabled":
        reasons.append(Reason("promotion_disabled", "live promotion is disabled in this world"
                              + ("" if policy.governance is not None else " (no governance section)")))
    if g.halted:
        reasons.append(Reason("world_halted", "the world is halted (qmtl world resume to lift it)"))
    if g.stage != "paper":
        reasons.append(Reason("not_in_paper", f"the strategy is in {g.stage or 'no stage (unknown)'}, "
                              "not paper: paper observation is never skipped"))
    as_state = _as_state(g)
    untrusted = uncounted_detail(as_state, "paper") if g.stage == "paper" else None  # else: not_in_paper
    if untrusted is not None:
        reasons.append(Reason("evidence_untrusted", untrusted))
    run = counted_run(as_state, "paper")
    prog = progress(policy, "paper", run)
    if not prog.satisfied:
        reasons.append(Reason("paper_window_incomplete", prog.label()))
    if run is None or run.status not in ("pass", "warn"):
        why = ("no trusted paper evaluation" if run is None
               else f"paper run {run.run_id}#{run.revision} is {run.status}")
        reasons.append(Reason("validation_failed", why))
    elif run.policy_version != policy.policy_version:
        reasons.append(Reason("validation_stale", f"paper run {run.run_id}#{run.revision} was gated under "
                              f"policy_version {run.policy_version}, the world is at {policy.policy_version}: "
                              "re-evaluate it (the campaign loop does)"))
    reasons.extend(shadow_reasons(g))
    fresh = freshness(g.snapshot, now=now, max_age=policy.risk.snapshot_max_age, strategy_id=g.strategy_id)
    if not fresh.ok:
        reasons.append(Reason(fresh.reason or "risk_snapshot_missing", fresh.detail))
    else:
        reasons.extend(portfolio_reasons(g))
    if g.last_live_promotion_at is not None and g.last_live_promotion_at + lp.cooldown > now:
        reasons.append(Reason("cooldown_active", f"last live promotion at {iso(g.last_live_promotion_at)[:19]}Z; "
                              f"cooldown until {iso(g.last_live_promotion_at + lp.cooldown)[:19]}Z"))
    others = g.live_strategies - {g.strategy_id}
    if len(others) >= lp.max_live_slots:
        reasons.append(Reason("max_live_slots_exceeded", f"{len(others)} of {lp.max_live_slots} live slots "
                              "are taken"))
    evidence = evidence_of(g)
    digest = content_hash(evidence)
    valid: list[str] = []
    needs = lp.mode == "manual_approval"
    if needs:
        if g.request is not None and g.request.evidence_hash != digest:
            reasons.append(Reason("evidence_changed", f"request {g.request.request_id} was opened on evidence "
                                  f"{g.request.evidence_hash[:12]}, which is now {digest[:12]}"))
        else:
            valid, notes = count_approvals(g, digest, now)
            reasons.extend(notes)
            if len(valid) < lp.required_approvals:
                reasons.append(Reason("approval_required", f"{len(valid)} of {lp.required_approvals} "
                                      "approvals"))
    return GateResult(not reasons, tuple(reasons), evidence, digest, tuple(valid), needs)
