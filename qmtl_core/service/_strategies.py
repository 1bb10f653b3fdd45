"""Registering a submitted strategy and announcing its queues, inside the caller's write transaction.

Both run under the ledger lock the caller took, so a submission (register, record its run,
announce its queues) is one transaction: any failure leaves no strategy row, no run and no ledger
entry (issue 16 item 13). Neither publishes anything: the caller publishes the returned events
after its transaction commits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from qmtl_core import controlbus, ledger, runs
from qmtl_core.canonical import content_hash
from qmtl_core.errors import ConflictError
from qmtl_core.governance._activations import set_stage
from qmtl_core.policy import WorldPolicy
from qmtl_core.service._events import ANNOUNCED
from qmtl_core.store import schema
from qmtl_core.timeutil import iso

__all__ = ["Registration", "announce", "code_binding", "register"]


@dataclass(frozen=True)
class Registration:
    """What a submission (or a feed of bars) sets on a strategy's row.

    ``meta`` is merged key by key; ``expect_meta`` maps meta keys to the values they must still hold
    (``None``: absent), else ``ConflictError`` (a concurrent writer got there first).
    """

    name: str | None = None
    code_hash: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    expect_meta: Mapping[str, Any] | None = None
    kind: str = "strategy.submitted"
    reason: str | None = None


def code_binding(code_hash: str | None, meta: Mapping[str, Any]) -> str:
    """What a strategy's evidence is bound to besides its runs: the code hash, the parameters and
    the data it was submitted with. Any change voids a promotion request and its approvals."""
    submission = meta.get("submission") or {}
    return content_hash({"code_hash": code_hash, "params": submission.get("params"),
                         "data": submission.get("data")})


#: What a change of code, parameters or data does to a strategy already observed (``register``).
REBOUND = {"paper": "the paper window restarts: evidence of the previous code no longer counts",
           "live": "code changed while live: back to paper, to earn its own paper window and approvals"}


def register(conn: Connection, *, policy: WorldPolicy, strategy_id: str, reg: Registration, actor: str,
             now: datetime) -> tuple[dict[str, Any], bool]:
    """Create or update the strategy's row; a ledger entry ``reg.kind`` only when something
    changed (an unchanged resubmission writes nothing). Returns the row and whether it changed.

    Evidence of other code never counts for this code (DESIGN §11): when the code binding of a
    strategy in paper changes, its paper stay restarts (observations before it never count, so not
    even ``auto_apply`` can apply on the old code's window), and a live one goes back to paper."""
    world = policy.world
    t = schema.strategies
    key = (t.c.world_id == world) & (t.c.strategy_id == strategy_id)
    created = conn.execute(sa.select(t.c.strategy_id).where(key)).first() is None
    row = runs.ensure_strategy(conn, world_id=world, strategy_id=strategy_id, now=now,
                               submitter=actor, name=reg.name)
    old_meta = dict(row.meta or {})
    for k, v in (reg.expect_meta or {}).items():
        if old_meta.get(k) != v:
            raise ConflictError(f"strategy {strategy_id} in {world} changed meanwhile ({k})",
                                hint="another process updated it; run the command again",
                                code="concurrent_update")
    values: dict[str, Any] = {}
    if reg.name is not None and reg.name != row.name:
        values["name"] = reg.name
    if reg.code_hash is not None and reg.code_hash != row.code_hash:
        values["code_hash"] = reg.code_hash
    new_meta = {**old_meta, **reg.meta}
    if new_meta != old_meta:
        values["meta"] = new_meta
    binding = code_binding(values.get("code_hash", row.code_hash), new_meta)
    if binding != row.code_binding:
        values["code_binding"] = binding
    rebound = row.code_binding is not None and "code_binding" in values and row.stage in REBOUND
    if rebound and row.stage == "paper":
        values["stage_entered_at"] = iso(now)
    if values or created:
        if values:
            conn.execute(sa.update(t).where(key).values(**values, updated_at=iso(now)))
        changed = sorted(set(values) - {"meta", "code_binding", "stage_entered_at"}) + sorted(
            k for k in new_meta if new_meta.get(k) != old_meta.get(k))
        said = reg.reason or ("first submission" if created else "changed: " + ", ".join(changed))
        ledger.append(conn, actor=actor, kind=reg.kind, now=now, world=world,
                      subject=f"{strategy_id} {reg.name or row.name or ''}".strip(),
                      reason=said + (f"; {REBOUND[row.stage]}" if rebound else ""),
                      payload={"strategy_id": strategy_id, "name": reg.name or row.name,
                               "code_hash": reg.code_hash or row.code_hash, "changed": changed,
                               **({"restarted": row.stage} if rebound else {})})
    if rebound and row.stage == "live":
        set_stage(conn, policy=policy, strategy_id=strategy_id, expect="live", to="paper", actor=actor,
                  now=now, kind="strategy.demoted", reason=REBOUND["live"])
    return dict(conn.execute(sa.select(t).where(key)).one()._mapping), bool(values) or created


def announce(conn: Connection, *, world: str, updates: Sequence[Mapping[str, Any]], actor: str,
             now: datetime) -> list[controlbus.ControlEvent]:
    """Record each update (``tags, interval, queues, match_mode, execution_domain``) as its
    ``tagquery.upsert`` and ``queue_update`` in the ledger (``tagquery.upserted`` /
    ``queue.updated``), so ``/events`` subscribers of every server sharing the store receive them.
    An event whose subject's last recorded etag is the same is a repeat and writes nothing (a
    resubmission changes nothing); a changed update is never dropped. Returns the events written."""
    events: list[controlbus.ControlEvent] = []
    for u in updates:
        common = {"tags": u.get("tags"), "interval": u.get("interval"),
                  "match_mode": u.get("match_mode", "any"), "world_id": world,
                  "execution_domain": u.get("execution_domain")}
        events += [controlbus.tagquery_upsert(**common),
                   controlbus.queue_update(**common, queues=u.get("queues") or [])]
    written = []
    t = schema.ledger
    for ev in events:
        kind, subject = ANNOUNCED[ev.type], "/".join(ev.subject[1:])
        last = conn.execute(sa.select(t.c.payload).where(t.c.world_id == world, t.c.kind == kind,
                                                         t.c.subject == subject)
                            .order_by(t.c.seq.desc()).limit(1)).scalar()
        if isinstance(last, dict) and last.get("etag") == ev.etag:
            continue
        ledger.append(conn, actor=actor, kind=kind, now=now, world=world, subject=subject,
                      reason=f"{ev.type} in {ev.execution_domain}",
                      payload={"etag": ev.etag, "data": dict(ev.payload)})
        written.append(ev)
    return written
