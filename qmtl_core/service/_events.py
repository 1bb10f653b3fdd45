"""Control events as the server streams them: derived from ledger entries, which every host shares.

Every message keeps the ledger's fields (``seq``, ``ts``, ``kind``, ``actor``, ``subject``,
``reason``, ``payload``), so a subscriber can resume with ``since=<seq>`` and audit what it saw.
The four control-bus types also carry ``data``, the exact payload of DESIGN §8 that the in-process
bus publishes (``qmtl_core.controlbus``), and its ``etag``:

- ``queue_update`` / ``tagquery.upsert`` from the ``queue.updated`` / ``tagquery.upserted`` entries
  a submission writes (``WorldService.announce_queues``), one event each;
- ``activation_updated`` from each entry that wrote an activation set, one event per strategy
  whose stage changed;
- ``decision_updated`` for each of those strategies and for every activation a halt or resume
  re-derived, with the decision envelope stored in the same transaction.

One entry may give several events; they share its ``seq`` and are sent together, in order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from qmtl_core import controlbus
from qmtl_core.domains import DecisionEnvelope
from qmtl_core.ledger import LedgerEntry, _row_to_entry
from qmtl_core.store import schema
from qmtl_core.timeutil import parse_instant

_TYPES = {
    "risk.snapshot_updated": "risk_snapshot_updated",
    "promotion.applied": "activation_updated",
    "strategy.promoted": "activation_updated",
    "strategy.demoted": "activation_updated",
    "world.rollback": "activation_updated",
    "world.halted": "decision_updated",
    "world.resumed": "decision_updated",
    "run.recorded": "evaluation_recorded",
    "queue.updated": "queue_update",
    "tagquery.upserted": "tagquery.upsert",
}
#: Ledger kinds a control-bus announcement is recorded under, by event type.
ANNOUNCED = {"queue_update": "queue.updated", "tagquery.upsert": "tagquery.upserted"}
_DOMAIN = {"backtest": "backtest", "paper": "dryrun", "live": "live", "retired": "backtest"}

#: (world, strategy, at) -> the decision envelope stored for it at that moment, if any.
DecisionLookup = Callable[[str, str, str], "DecisionEnvelope | None"]


def _base(entry: LedgerEntry, type_: str, domain: str | None) -> dict[str, Any]:
    return {"type": type_, "kind": entry.kind, "seq": entry.seq, "ts": entry.ts, "world_id": entry.world,
            "execution_domain": domain, "actor": entry.actor, "subject": entry.subject, "reason": entry.reason,
            "payload": entry.payload or {}}


def _control(entry: LedgerEntry, event: controlbus.ControlEvent) -> dict[str, Any]:
    return {**_base(entry, event.type, event.execution_domain), "etag": event.etag, "data": dict(event.payload)}


def event_from_entry(entry: LedgerEntry) -> dict[str, Any]:
    """The generic event a ledger entry announces (type, world, execution domain when a stage moved)."""
    payload = entry.payload or {}
    to = payload.get("to") or payload.get("stage")
    return _base(entry, _TYPES.get(entry.kind, entry.kind), _DOMAIN.get(str(to)) if to else None)


def events_from_entry(entry: LedgerEntry, decision: DecisionLookup) -> list[dict[str, Any]]:
    """Every event a ledger entry announces, control-bus payloads included (see the module doc)."""
    payload = entry.payload or {}
    world = entry.world or ""
    if entry.kind in ("queue.updated", "tagquery.upserted"):
        data = payload.get("data") or {}
        build = controlbus.queue_update if entry.kind == "queue.updated" else controlbus.tagquery_upsert
        args = {k: data[k] for k in ("tags", "interval", "match_mode", "world_id", "execution_domain")}
        if entry.kind == "queue.updated":
            args["queues"] = data["queues"]
        return [_control(entry, build(**args))]
    changed = payload.get("changed")
    if isinstance(changed, dict) and isinstance(payload.get("activations"), list):
        rows = {a["strategy_id"]: a for a in payload["activations"]}
        out = []
        for sid, stage in changed.items():
            row = rows.get(sid)
            out.append(_control(entry, controlbus.activation_updated(
                world_id=world, strategy_id=sid, stage=stage or "backtest", active=row is not None,
                weight=float(row["weight"]) if row else 0.0, run_id=row.get("run_id") if row else None,
                etag=row.get("etag") if row else None)))
            out.extend(_decision(entry, decision, sid))
        return out or [event_from_entry(entry)]
    if entry.kind in ("world.halted", "world.resumed"):
        out = []
        for a in payload.get("activations") or ():
            out.extend(_decision(entry, decision, a["strategy_id"]))
        return out or [event_from_entry(entry)]
    return [event_from_entry(entry)]


def _decision(entry: LedgerEntry, decision: DecisionLookup, strategy_id: str) -> list[dict[str, Any]]:
    envelope = decision(entry.world or "", strategy_id, entry.ts)
    return [] if envelope is None else [_control(entry, controlbus.decision_updated(envelope))]


def decision_at(conn: Connection, allow_live: Callable[[str], bool]) -> DecisionLookup:
    """A lookup of the decision envelope stored for a strategy at or before a moment;
    ``allow_live(world)`` is the world's policy setting (the stored row does not repeat it)."""
    d = schema.decisions

    def lookup(world: str, strategy_id: str, at: str) -> DecisionEnvelope | None:
        row = conn.execute(sa.select(d).where(d.c.world_id == world, d.c.strategy_id == strategy_id,
                                              d.c.created_at <= at).order_by(d.c.id.desc()).limit(1)).first()
        if row is None:
            return None
        return DecisionEnvelope(world_id=world, strategy_id=strategy_id, effective_mode=row.effective_mode,
                                reason=row.reason, as_of=parse_instant(row.as_of), ttl_sec=row.ttl_sec,
                                etag=row.etag, policy_version=row.policy_version,
                                allow_live=allow_live(world))
    return lookup


def entries_after(conn: Connection, seq: int, *, world: str | None = None, limit: int = 500) -> list[LedgerEntry]:
    """Ledger entries with ``seq`` above ``seq`` (optionally one world's), oldest first."""
    t = schema.ledger
    q = sa.select(t).where(t.c.seq > seq)
    if world is not None:
        q = q.where(t.c.world_id == world)
    return [_row_to_entry(r) for r in conn.execute(q.order_by(t.c.seq).limit(limit))]
