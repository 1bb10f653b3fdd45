"""``qmtl world history``: what was live (and paper) in a world at a moment, and why — from the ledger.

Every activation change writes a ledger entry whose payload carries the whole resulting set, so the
answer is the last such entry at or before the moment, read from the hash-chained record rather
than from tables that later changes overwrite.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from qmtl_core.ledger import LedgerEntry
from qmtl_core.timeutil import iso

ACTIVATION_KINDS = ("promotion.applied", "strategy.promoted", "strategy.demoted", "world.rollback",
                    "world.halted", "world.resumed", "policy.enforced")
DECISION_KINDS = ACTIVATION_KINDS + ("promotion.requested", "promotion.approved", "promotion.rejected",
                                     "promotion.blocked", "promotion.voided")


def history_at(entries: list[LedgerEntry], at: datetime | None) -> dict[str, Any]:
    """The activation set and halt state at ``at`` (now when ``None``) and the entries that explain them."""
    cutoff = iso(at) if at is not None else None
    upto = [e for e in entries if cutoff is None or e.ts <= cutoff]
    activations: list[dict[str, Any]] = []
    halted = False
    cause: dict[str, LedgerEntry] = {}
    last_change: LedgerEntry | None = None
    for e in upto:
        payload = e.payload or {}
        if e.kind in ("world.halted", "world.resumed"):
            halted = e.kind == "world.halted"
        if e.kind in ACTIVATION_KINDS and "activations" in payload:
            activations = list(payload["activations"])
            last_change = e
            for sid in (payload.get("changed") or {}):
                cause[sid] = e
    approvals: dict[str, list[dict[str, Any]]] = {}
    for e in upto:
        if e.kind == "promotion.approved":
            approvals.setdefault(str((e.payload or {}).get("request_id")), []).append(
                {"actor": e.actor, "reason": e.reason, "ts": e.ts})
    rows = []
    for a in activations:
        why = cause.get(a["strategy_id"])
        request_id = (why.payload or {}).get("request_id") if why is not None else None
        rows.append({**a, "why": None if why is None else {
            "seq": why.seq, "kind": why.kind, "actor": why.actor, "ts": why.ts, "reason": why.reason,
            "request_id": request_id, "approvals": approvals.get(str(request_id), []) if request_id else []}})
    timeline = [e.to_dict() for e in upto if e.kind in DECISION_KINDS]
    return {"at": cutoff, "halted": halted, "activations": rows,
            "live": [r["strategy_id"] for r in rows if r["stage"] == "live"],
            "last_change": last_change.to_dict() if last_change else None, "timeline": timeline}
