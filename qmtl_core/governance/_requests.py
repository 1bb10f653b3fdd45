"""Promotion requests and approvals in the store, and the flows that use the gate.

Each flow runs inside the caller's write transaction (the ledger lock taken first), so reading the
evidence, deciding and writing the outcome cannot interleave with another writer. A flow never
raises after writing: it returns an ``Outcome`` and the caller raises, once the transaction has
committed, whatever exit the outcome calls for — a voided request stays voided.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from qmtl_core import ledger
from qmtl_core.approval_signing import approval_message, signature_problem
from qmtl_core.campaign import RunSummary
from qmtl_core.errors import BlockedError, ConflictError, RequestNotFound
from qmtl_core.governance._activations import book_members, current_set, set_stage
from qmtl_core.governance._gate import Approval, GateInput, GateResult, RequestView, promotion_gate
from qmtl_core.policy import WorldPolicy
from qmtl_core.risk import latest_snapshot
from qmtl_core.runs import book_risk
from qmtl_core.store import schema
from qmtl_core.timeutil import iso, parse_instant, parse_optional_instant


@dataclass
class Outcome:
    """What a governance flow did: ``applied``, ``pending``, ``blocked``, ``rejected``, ``voided``, ``planned``."""

    status: str
    world: str
    strategy_id: str
    gate: GateResult | None = None
    request_id: str | None = None
    message: str = ""
    exit_code: int = 0
    notify: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"status": self.status, "world": self.world, "strategy_id": self.strategy_id,
                "request_id": self.request_id, "message": self.message, "exit_code": self.exit_code,
                "gate": self.gate.to_dict() if self.gate else None, **self.extra}


# --- reading ------------------------------------------------------------------------------------------

def request_view(conn: Connection, row: Any) -> RequestView:
    """A request row with the approvals the ledger vouches for, as the gate sees it.

    A row of the approvals table counts only through the ledger entry it names, and only if that
    entry records the same decision by the same approver on the same request and evidence; the
    approval's time, reason and signature are read from the entry. A row written behind qmtl's back
    (``audit verify --deep`` names it) therefore changes nothing.
    """
    a, led = schema.approvals, schema.ledger
    query = (sa.select(a.c.approver, a.c.decision, a.c.evidence_hash, led.c.actor, led.c.kind, led.c.ts,
                       led.c.reason, led.c.payload)
             .join(led, led.c.seq == a.c.ledger_seq).where(a.c.request_id == row.request_id).order_by(a.c.id))
    approvals = []
    for r in conn.execute(query):
        payload = r.payload or {}
        if (_DECISION_KINDS.get(r.kind) != r.decision or r.actor != r.approver
                or payload.get("request_id") != row.request_id or payload.get("evidence_hash") != r.evidence_hash):
            continue
        approvals.append(Approval(r.approver, r.decision, r.evidence_hash, parse_instant(r.ts), r.reason or "",
                                  payload.get("signature")))
    return RequestView(row.request_id, row.requester, row.evidence_hash, parse_instant(row.created_at),
                       tuple(approvals))


_DECISION_KINDS = {"promotion.approved": "approve", "promotion.rejected": "reject"}


def pending_request(conn: Connection, world: str, strategy_id: str) -> Any:
    """The open request for a strategy, or ``None``."""
    t = schema.promotion_requests
    return conn.execute(sa.select(t).where(t.c.world_id == world, t.c.strategy_id == strategy_id,
                                           t.c.status == "pending").order_by(t.c.created_at.desc()).limit(1)).first()


def governance_state(conn: Connection, world: str, *,
                     submitters: Mapping[str, str | None] | None = None) -> dict[str, Any]:
    """What tick and the gate need besides runs: submitters, live set, last promotion, open requests.

    ``submitters`` may be passed by a caller that has read the world's strategies already.
    """
    st, t = schema.strategies, schema.promotion_requests
    if submitters is None:
        submitters = {r.strategy_id: r.submitter for r in conn.execute(
            sa.select(st.c.strategy_id, st.c.submitter).where(st.c.world_id == world))}
    set_version, rows = current_set(conn, world)
    live = frozenset(sid for sid, a in rows.items() if a.stage == "live")
    last = conn.execute(sa.select(sa.func.max(t.c.decided_at)).where(t.c.world_id == world,
                                                                      t.c.status == "applied")).scalar()
    requests = {r.strategy_id: request_view(conn, r) for r in conn.execute(
        sa.select(t).where(t.c.world_id == world, t.c.status == "pending").order_by(t.c.created_at))}
    return {"submitters": submitters, "live_strategies": live,
            "last_live_promotion_at": parse_optional_instant(last),
            "requests": requests, "set_version": set_version}


def paper_run_summary(conn: Connection, world: str, strategy_id: str, stage: str = "paper") -> RunSummary | None:
    """The latest revision of the strategy's latest run at ``stage`` (paper unless told)."""
    h = schema.run_heads
    row = conn.execute(sa.select(h).where(h.c.world_id == world, h.c.strategy_id == strategy_id,
                                          h.c.stage == stage)).first()
    if row is None:
        return None
    return RunSummary(row.run_id, row.revision, row.status, row.policy_version, row.content_hash, row.metrics or {},
                      tuple(row.rule_results or ()), parse_optional_instant(row.window_start),
                      parse_optional_instant(row.window_end), row.n_observations, row.evidence_class)


def gate_input(conn: Connection, policy: WorldPolicy, strategy_id: str, *, request: RequestView | None) -> GateInput:
    """Read the gate's inputs for one strategy."""
    world = policy.world
    st = schema.strategies
    row = conn.execute(sa.select(st.c.stage, st.c.submitter, st.c.stage_entered_at, st.c.code_binding)
                       .where(st.c.world_id == world, st.c.strategy_id == strategy_id)).first()
    gov = governance_state(conn, world)
    halted = bool(conn.execute(sa.select(schema.worlds.c.halted).where(schema.worlds.c.world_id == world)).scalar())
    snapshot = latest_snapshot(conn, world, stage="paper")
    risk = book_risk(policy, strategy_id, snapshot, None, book_members(conn, policy), check_fresh=False)
    return GateInput(policy, strategy_id, row.stage if row else None, paper_run_summary(conn, world, strategy_id),
                     snapshot, halted, gov["live_strategies"], gov["last_live_promotion_at"],
                     row.submitter if row else None, request,
                     shadow_run=paper_run_summary(conn, world, strategy_id, "shadow"), portfolio=risk,
                     entered_at=parse_optional_instant(row.stage_entered_at) if row else None,
                     code_binding=row.code_binding if row else None)


# --- writing ------------------------------------------------------------------------------------------
def _new_request(conn: Connection, *, policy: WorldPolicy, strategy_id: str, gate: GateResult, requester: str,
                 reason: str | None, status: str, now: datetime) -> str:
    request_id = f"pr-{uuid.uuid4().hex[:12]}"
    conn.execute(sa.insert(schema.promotion_requests).values(
        request_id=request_id, world_id=policy.world, strategy_id=strategy_id, evidence_hash=gate.evidence_hash,
        evidence={**gate.evidence, "reasons": [r.to_dict() for r in gate.reasons]}, requester=requester,
        reason=reason, status=status, created_at=iso(now), decided_at=iso(now) if status != "pending" else None))
    return request_id


def _close(conn: Connection, request_id: str, status: str, now: datetime) -> None:
    t = schema.promotion_requests
    conn.execute(sa.update(t).where(t.c.request_id == request_id).values(status=status, decided_at=iso(now)))


def _event(kind: str, outcome: Outcome, **extra: Any) -> dict[str, Any]:
    return {"event": kind, "world": outcome.world, "strategy_id": outcome.strategy_id,
            "request_id": outcome.request_id, "message": outcome.message, **extra}


def _apply(conn: Connection, policy: WorldPolicy, strategy_id: str, gate: GateResult, request_id: str, actor: str,
           now: datetime, snapshot_weight: float) -> int:
    run = (gate.evidence.get("paper_run") or {})
    version = set_stage(conn, policy=policy, strategy_id=strategy_id, expect="paper", to="live", actor=actor,
                        now=now, kind="promotion.applied", reason=f"request {request_id}: every gate passes",
                        run_id=run.get("run_id"), weight=snapshot_weight,
                        admitted=strategy_id if gate.allowed else None,
                        payload={"request_id": request_id, "evidence_hash": gate.evidence_hash,
                                 "approvals": list(gate.valid_approvals)})
    _close(conn, request_id, "applied", now)
    return version


def _request_for(conn: Connection, policy: WorldPolicy, strategy_id: str, gate: GateResult, view: RequestView | None,
                 *, actor: str, reason: str | None, now: datetime) -> str:
    """The request an apply is recorded under: the open one only if it was opened on exactly the
    evidence the gate just allowed (under auto_apply the gate does not compare them), else that one
    is voided and a new one opened, so an applied request always names the evidence applied."""
    if view is not None and view.evidence_hash == gate.evidence_hash:
        return view.request_id
    if view is not None:
        _close(conn, view.request_id, "void", now)
        ledger.append(conn, actor=actor, kind="promotion.voided", now=now, world=policy.world, subject=strategy_id,
                      reason="evidence_changed", payload={"request_id": view.request_id,
                                                          "old_evidence_hash": view.evidence_hash,
                                                          "new_evidence_hash": gate.evidence_hash})
    return _new_request(conn, policy=policy, strategy_id=strategy_id, gate=gate, requester=actor, reason=reason,
                        status="pending", now=now)


def _weight(conn: Connection, world: str, strategy_id: str) -> float:
    snap = latest_snapshot(conn, world, stage="paper")  # the snapshot the promotion rests on
    return float(snap.snapshot.weights.get(strategy_id, 0.0)) if snap is not None else 0.0


def _blocked(conn: Connection, policy: WorldPolicy, strategy_id: str, gate: GateResult, actor: str,
             reason: str | None, now: datetime) -> Outcome:
    request_id = _new_request(conn, policy=policy, strategy_id=strategy_id, gate=gate, requester=actor,
                              reason=reason, status="blocked", now=now)
    codes = [r.code for r in gate.reasons if r.code not in ("approval_required", "approvals_expired")] or gate.codes
    ledger.append(conn, actor=actor, kind="promotion.blocked", now=now, world=policy.world, subject=strategy_id,
                  reason=", ".join(codes), payload={"request_id": request_id, "reasons": [r.to_dict() for r in gate.reasons],
                                                    "evidence_hash": gate.evidence_hash})
    out = Outcome("blocked", policy.world, strategy_id, gate, request_id,
                  "blocked: " + "; ".join(f"{r.code} ({r.detail})" for r in gate.reasons), gate.exit_code)
    out.notify.append(_event("promotion.blocked", out, reasons=codes))
    return out


def promote(conn: Connection, policy: WorldPolicy, strategy_id: str, *, actor: str, reason: str | None,
            now: datetime, dry_run: bool = False, apply: bool = True) -> Outcome:
    """``qmtl promote``: decide, and open a request, apply, or record the block.

    With ``apply=False`` (rollback and resume asking for a strategy's way back to live) an allowed
    gate only opens the request: the way back is decided again, by approvers or the campaign loop.
    """
    world = policy.world
    if not dry_run:
        ledger.lock(conn)
    notes: list[dict[str, Any]] = []
    pending = pending_request(conn, world, strategy_id)
    view = request_view(conn, pending) if pending is not None else None
    gate = promotion_gate(gate_input(conn, policy, strategy_id, request=view), now)
    if view is not None and "evidence_changed" in gate.codes and not dry_run:
        _close(conn, view.request_id, "void", now)
        ledger.append(conn, actor=actor, kind="promotion.voided", now=now, world=world, subject=strategy_id,
                      reason="evidence_changed", payload={"request_id": view.request_id,
                                                          "old_evidence_hash": view.evidence_hash})
        notes.append({"event": "promotion.voided", "world": world, "strategy_id": strategy_id,
                      "request_id": view.request_id})
        view = None
        gate = promotion_gate(gate_input(conn, policy, strategy_id, request=None), now)
    if dry_run:
        status = "allowed" if gate.allowed else "blocked"
        return Outcome("planned", world, strategy_id, gate, view.request_id if view else None,
                       f"dry run: {status}" + ("" if gate.allowed else ": " + ", ".join(gate.codes)),
                       gate.exit_code)
    others = [r for r in gate.reasons if r.code not in ("approval_required", "approvals_expired")]
    if others:
        out = _blocked(conn, policy, strategy_id, gate, actor, reason, now)
        out.notify[:0] = notes
        return out
    if gate.allowed and apply:
        request_id = _request_for(conn, policy, strategy_id, gate, view, actor=actor, reason=reason, now=now)
        version = _apply(conn, policy, strategy_id, gate, request_id, actor, now, _weight(conn, world, strategy_id))
        out = Outcome("applied", world, strategy_id, gate, request_id,
                      f"{strategy_id} is live in {world} (activation set {version})", 0)
        out.notify = notes + [_event("promotion.applied", out, set_version=version)]
        return out
    if view is not None:
        return Outcome("pending", world, strategy_id, gate, view.request_id,
                       f"request {view.request_id} is pending: {len(gate.valid_approvals)} of "
                       f"{policy.live_promotion.required_approvals} approvals", 11, notes)
    request_id = _new_request(conn, policy=policy, strategy_id=strategy_id, gate=gate, requester=actor,
                              reason=reason, status="pending", now=now)
    ledger.append(conn, actor=actor, kind="promotion.requested", now=now, world=world, subject=strategy_id,
                  reason=reason or "live promotion requested",
                  payload={"request_id": request_id, "evidence_hash": gate.evidence_hash,
                           "required_approvals": policy.live_promotion.required_approvals})
    out = Outcome("pending", world, strategy_id, gate, request_id,
                  f"opened request {request_id}: needs {policy.live_promotion.required_approvals} approvals from "
                  f"{', '.join(policy.live_promotion.approver_names)}", 11)
    out.notify = notes + [_event("promotion.requested", out, evidence_hash=gate.evidence_hash)]
    return out


def load_request(conn: Connection, request_id: str) -> Any:
    """A request row; ``RequestNotFound`` when there is none."""
    t = schema.promotion_requests
    row = conn.execute(sa.select(t).where(t.c.request_id == request_id)).first()
    if row is None:
        raise RequestNotFound(f"no promotion request {request_id!r}", hint="qmtl promote --list shows open requests")
    return row


def _check_approver(policy: WorldPolicy, row: Any, actor: str, submitter: str | None) -> None:
    lp = policy.live_promotion
    if actor not in lp.approver_names:
        raise BlockedError(f"{actor} is not an approver in world {policy.world}",
                           hint=f"approvers: {', '.join(lp.approver_names) or 'none'}", code="not_an_approver")
    if actor == row.requester:
        raise BlockedError(f"{actor} opened request {row.request_id} and cannot approve or reject it",
                           hint="another approver must decide (four eyes)", code="requester_cannot_approve")
    if submitter is not None and actor == submitter:
        raise BlockedError(f"{actor} submitted {row.strategy_id} and cannot approve its promotion",
                           hint="another approver must decide (four eyes)", code="submitter_cannot_approve")


def _check_signature(policy: WorldPolicy, row: Any, actor: str, signature: str | None) -> None:
    lp = policy.live_promotion
    if not lp.require_signatures and signature is None:
        return
    key = lp.ssh_keys.get(actor)
    if key is None:
        raise BlockedError(f"{actor} has no ssh_key in world {policy.world}, so a signature cannot count",
                           hint="add the key to the approver's entry in the policy, or approve without --key",
                           code="signature_invalid")
    if signature is None:
        raise BlockedError(f"world {policy.world} requires approvals signed with the approver's SSH key",
                           hint="qmtl approve REQUEST --reason ... --key ~/.ssh/id_ed25519", code="signature_required")
    message = approval_message(world=row.world_id, strategy_id=row.strategy_id, request_id=row.request_id,
                               evidence_hash=row.evidence_hash)
    problem = signature_problem(key, signature, message)
    if problem is not None:
        raise BlockedError(f"the signature on {actor}'s approval of {row.request_id} does not count: {problem}",
                           hint=f"sign with the key listed for {actor} in the policy", code="signature_invalid")


def _vote(conn: Connection, row: Any, *, actor: str, decision: str, reason: str, now: datetime,
          signature: str | None = None) -> None:
    """Record an approver's decision on the request's evidence: a ledger entry, and a row of the
    approvals table naming it — new, or the approver's earlier one on the same evidence brought up to
    date (a renewal after ``approval_ttl``, or a change of mind)."""
    payload: dict[str, Any] = {"request_id": row.request_id, "evidence_hash": row.evidence_hash}
    if signature is not None:
        payload["signature"] = signature
    entry = ledger.append(conn, actor=actor, kind="promotion.approved" if decision == "approve" else "promotion.rejected",
                          now=now, world=row.world_id, subject=row.strategy_id, reason=reason, payload=payload)
    a = schema.approvals
    key = (a.c.request_id == row.request_id) & (a.c.approver == actor) & (a.c.evidence_hash == row.evidence_hash)
    values = {"decision": decision, "reason": reason, "created_at": iso(now), "ledger_seq": entry.seq}
    if conn.execute(sa.select(a.c.id).where(key)).first() is None:
        conn.execute(sa.insert(a).values(request_id=row.request_id, approver=actor,
                                         evidence_hash=row.evidence_hash, **values))
    else:
        conn.execute(sa.update(a).where(key).values(**values))


def decide(conn: Connection, policy: WorldPolicy, row: Any, *, actor: str, decision: str, reason: str,
           now: datetime, signature: str | None = None) -> Outcome:
    """``qmtl approve`` / ``qmtl reject`` on a pending request. An approval under
    ``require_signatures`` (or one that carries a signature) is refused unless ``signature`` verifies
    for this approver, request and evidence; the signature goes into the ledger entry."""
    ledger.lock(conn)
    row = load_request(conn, row.request_id)  # re-read under the lock: a concurrent reject or apply wins
    world, strategy_id = row.world_id, row.strategy_id
    if row.status != "pending":
        raise ConflictError(f"request {row.request_id} is {row.status}, not pending", code="request_closed",
                            hint="qmtl promote --list shows open requests")
    submitter = conn.execute(sa.select(schema.strategies.c.submitter).where(
        schema.strategies.c.world_id == world, schema.strategies.c.strategy_id == strategy_id)).scalar()
    _check_approver(policy, row, actor, submitter)
    view = request_view(conn, row)
    gate = promotion_gate(gate_input(conn, policy, strategy_id, request=view), now)
    if "evidence_changed" in gate.codes:
        _close(conn, row.request_id, "void", now)
        ledger.append(conn, actor=actor, kind="promotion.voided", now=now, world=world, subject=strategy_id,
                      reason="evidence_changed", payload={"request_id": row.request_id,
                                                          "old_evidence_hash": row.evidence_hash,
                                                          "new_evidence_hash": gate.evidence_hash})
        out = Outcome("voided", world, strategy_id, gate, row.request_id,
                      f"the evidence changed since request {row.request_id} was opened ({row.evidence_hash[:12]} -> "
                      f"{gate.evidence_hash[:12]}); the request is void, open a new one with qmtl promote", 4)
        out.notify.append(_event("promotion.voided", out))
        return out
    if decision == "reject":
        _vote(conn, row, actor=actor, decision="reject", reason=reason, now=now)
        _close(conn, row.request_id, "rejected", now)
        out = Outcome("rejected", world, strategy_id, gate, row.request_id, f"request {row.request_id} rejected", 0)
        out.notify.append(_event("promotion.rejected", out, actor=actor, reason=reason))
        return out
    _check_signature(policy, row, actor, signature)
    ttl = policy.live_promotion.approval_ttl
    already = any(a.approver == actor and a.decision == "approve" and a.evidence_hash == row.evidence_hash
                  and a.created_at + ttl >= now for a in view.approvals)  # an expired one may be renewed
    notify: list[dict[str, Any]] = []
    if not already:
        _vote(conn, row, actor=actor, decision="approve", reason=reason, now=now, signature=signature)
        notify.append({"event": "promotion.approved", "world": world, "strategy_id": strategy_id,
                       "request_id": row.request_id, "actor": actor, "reason": reason})
        view = request_view(conn, row)
        gate = promotion_gate(gate_input(conn, policy, strategy_id, request=view), now)
    if gate.allowed:
        version = _apply(conn, policy, strategy_id, gate, row.request_id, actor, now, _weight(conn, world, strategy_id))
        out = Outcome("applied", world, strategy_id, gate, row.request_id,
                      f"approved; {strategy_id} is live in {world} (activation set {version})", 0)
        out.notify = notify + [_event("promotion.applied", out, set_version=version)]
        return out
    note = "already approved by you (counts once); " if already else "approved; "
    out = Outcome("pending", world, strategy_id, gate, row.request_id,
                  note + f"{len(gate.valid_approvals)} of {policy.live_promotion.required_approvals} approvals"
                  + ("" if set(gate.codes) <= {"approval_required"} else
                     "; still blocked: " + ", ".join(c for c in gate.codes if c != "approval_required")),
                  gate.exit_code, notify)
    return out


def list_requests(conn: Connection, *, world: str | None, include_closed: bool,
                  history: bool = False) -> list[dict[str, Any]]:
    """Requests (pending only unless ``include_closed``), newest first, with approvals so far.

    ``history``: each approval also lists every decision its approver recorded on the request, from
    the ledger, oldest first (a renewal updates the approval in place), so ``requests_at`` can tell
    what stood at an earlier time."""
    t = schema.promotion_requests
    q = sa.select(t).order_by(t.c.created_at.desc())
    if world is not None:
        q = q.where(t.c.world_id == world)
    if not include_closed:
        q = q.where(t.c.status == "pending")
    votes = _votes(conn, world) if history else {}
    out = []
    for row in conn.execute(q):
        view = request_view(conn, row)
        out.append({"request_id": row.request_id, "world": row.world_id, "strategy_id": row.strategy_id,
                    "status": row.status, "requester": row.requester, "reason": row.reason,
                    "created_at": row.created_at, "decided_at": row.decided_at,
                    "evidence_hash": row.evidence_hash,
                    "policy_version": (row.evidence or {}).get("policy_version"),
                    "reasons": (row.evidence or {}).get("reasons", []),
                    "blocked_reason": row.blocked_reason, "blocked_at": row.blocked_at,
                    "approvals": [{"approver": a.approver, "decision": a.decision, "reason": a.reason,
                                   "evidence_hash": a.evidence_hash, "at": iso(a.created_at),
                                   **({"history": votes.get((row.request_id, a.approver, a.evidence_hash), [])}
                                      if history else {})} for a in view.approvals]})
    return out


def _votes(conn: Connection, world: str | None) -> dict[tuple[str, str, str], list[dict[str, str]]]:
    """Every approve/reject the ledger records, by (request, approver, evidence hash), oldest first."""
    led = schema.ledger
    query = (sa.select(led.c.actor, led.c.kind, led.c.ts, led.c.reason, led.c.payload)
             .where(led.c.kind.in_(tuple(_DECISION_KINDS))).order_by(led.c.seq))
    if world is not None:
        query = query.where(led.c.world_id == world)
    out: dict[tuple[str, str, str], list[dict[str, str]]] = {}
    for r in conn.execute(query):
        payload = r.payload or {}
        key = (str(payload.get("request_id")), r.actor, str(payload.get("evidence_hash")))
        out.setdefault(key, []).append({"decision": _DECISION_KINDS[r.kind], "reason": r.reason or "",
                                        "at": iso(parse_instant(r.ts))})
    return out


def requests_at(requests: Iterable[Mapping[str, Any]], at: datetime) -> list[dict[str, Any]]:
    """``list_requests`` documents as they stood at ``at``: only requests opened by then, each with
    the approvals given by then and its status then (``pending`` if decided later); pure.

    An approval renewed after ``at`` (``approval_ttl``) stands as it was given before ``at``, when the
    documents carry each approval's ``history`` (``list_requests(history=True)``); without it the
    approval is dated by its renewal and shows as not yet given (fewer approvals, never more)."""
    cut = iso(at)
    out = []
    for r in requests:
        if (r.get("created_at") or "") > cut:
            continue
        decided = r.get("decided_at")
        later = decided is not None and decided > cut
        blocked_at = r.get("blocked_at")
        out.append({**r, "status": "pending" if later else r.get("status"),
                    "decided_at": None if later else decided,
                    "approvals": [a for a in (_approval_at(x, cut) for x in r.get("approvals", [])) if a],
                    **({"blocked_reason": None, "blocked_at": None}
                       if blocked_at is not None and blocked_at > cut else {})})
    return out


def _approval_at(approval: Mapping[str, Any], cut: str) -> dict[str, Any] | None:
    """The approval as it stood at ``cut`` (its latest decision by then), or ``None`` if not yet given."""
    known = [v for v in approval.get("history") or () if v["at"] <= cut]
    if known:
        return {**approval, **known[-1]}
    return dict(approval) if not approval.get("history") and (approval.get("at") or "") <= cut else None


def apply_if_allowed(conn: Connection, policy: WorldPolicy, strategy_id: str, *, expected_evidence: str | None,
                     actor: str, now: datetime) -> Outcome:
    """The campaign loop's ``apply_live``: apply only if the gate allows it on the planned evidence."""
    ledger.lock(conn)
    pending = pending_request(conn, policy.world, strategy_id)
    view = request_view(conn, pending) if pending is not None else None
    gate = promotion_gate(gate_input(conn, policy, strategy_id, request=view), now)
    if expected_evidence is not None and gate.evidence_hash != expected_evidence:
        raise ConflictError(f"the evidence for {strategy_id} changed since the plan", code="stale_plan",
                            hint="run the loop again")
    if not gate.allowed:
        return _blocked(conn, policy, strategy_id, gate, actor, "campaign loop", now)
    request_id = _request_for(conn, policy, strategy_id, gate, view, actor=actor, reason="auto_apply", now=now)
    version = _apply(conn, policy, strategy_id, gate, request_id, actor, now, _weight(conn, policy.world, strategy_id))
    out = Outcome("applied", policy.world, strategy_id, gate, request_id,
                  f"{strategy_id} is live in {policy.world} (activation set {version})", 0)
    out.notify.append(_event("promotion.applied", out, set_version=version))
    return out
