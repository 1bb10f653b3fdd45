"""Control events as the server streams them: derived from ledger entries, which every host shares."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from qmtl_core.ledger import LedgerEntry, _row_to_entry
from qmtl_core.store import schema

_TYPES = {
    "risk.snapshot_updated": "risk_snapshot_updated",
    "promotion.applied": "activation_updated",
    "strategy.promoted": "activation_updated",
    "strategy.demoted": "activation_updated",
    "world.rollback": "activation_updated",
    "world.halted": "decision_updated",
    "world.resumed": "decision_updated",
    "run.recorded": "evaluation_recorded",
}
_DOMAIN = {"backtest": "backtest", "paper": "dryrun", "live": "live", "retired": "backtest"}


def event_from_entry(entry: LedgerEntry) -> dict[str, Any]:
    """The event a ledger entry announces (type, world, execution domain when a stage moved)."""
    payload = entry.payload or {}
    to = payload.get("to") or payload.get("stage")
    return {"type": _TYPES.get(entry.kind, entry.kind), "kind": entry.kind, "seq": entry.seq, "ts": entry.ts,
            "world_id": entry.world, "execution_domain": _DOMAIN.get(str(to)) if to else None,
            "actor": entry.actor, "subject": entry.subject, "reason": entry.reason, "payload": payload}


def entries_after(conn: Connection, seq: int, *, world: str | None = None, limit: int = 500) -> list[LedgerEntry]:
    """Ledger entries with ``seq`` above ``seq`` (optionally one world's), oldest first."""
    t = schema.ledger
    q = sa.select(t).where(t.c.seq > seq)
    if world is not None:
        q = q.where(t.c.world_id == world)
    return [_row_to_entry(r) for r in conn.execute(q.order_by(t.c.seq).limit(limit))]
