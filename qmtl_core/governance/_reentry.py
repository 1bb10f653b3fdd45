"""The kill switch, rollback and resume: the ways out of live, and why none of them is a way in.

Halting a world takes every live strategy back to paper in a new activation set (so nothing is live
in any table, not only in the decision envelopes) and needs nothing but the world id. Rollback and
resume never make a strategy live on their own: a row that would go live again is restored to
paper and a promotion request is opened for it through the one gate (``promote`` with
``apply=False``), which approvers or the campaign loop then decide like any other. A world whose
policy in force sets ``allow_live: false`` has its live rows withdrawn the same way.

Each flow runs in the caller's write transaction with the ledger lock taken first, and returns a
result; notifications are the caller's, after commit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from qmtl_core import ledger
from qmtl_core.canonical import content_hash
from qmtl_core.errors import ConflictError
from qmtl_core.governance._activations import (
    Activation,
    as_paper,
    current_set,
    read_set,
    record_decisions,
    write_set,
)
from qmtl_core.governance._requests import Outcome, promote
from qmtl_core.policy import WorldPolicy
from qmtl_core.store import schema
from qmtl_core.timeutil import iso


@dataclass(frozen=True)
class Reentry:
    """A strategy that would have gone live again, what was done instead."""

    strategy_id: str
    status: str  # pending | blocked (a request opened, or the block recorded)
    request_id: str | None
    message: str
    exit_code: int

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"strategy_id": self.strategy_id, "status": self.status, "request_id": self.request_id,
                "message": self.message, "exit_code": self.exit_code}


@dataclass
class SwitchResult:
    """What halt, resume or rollback did to a world."""

    world: str
    changed: dict[str, str | None] = field(default_factory=dict)
    set_version: int | None = None
    reentries: list[Reentry] = field(default_factory=list)
    notify: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"world": self.world, "changed": dict(self.changed), "set_version": self.set_version,
                "reentries": [r.to_dict() for r in self.reentries], **self.extra}


def _halted(conn: Connection, world: str) -> bool:
    w = schema.worlds
    return bool(conn.execute(sa.select(w.c.halted).where(w.c.world_id == world)).scalar())


def _ensure_world_row(conn: Connection, world: str, now: datetime) -> None:
    w = schema.worlds
    if conn.execute(sa.select(w.c.world_id).where(w.c.world_id == world)).first() is None:
        conn.execute(sa.insert(w).values(world_id=world, created_at=iso(now), halted=False))


def reopen(conn: Connection, policy: WorldPolicy, strategy_id: str, *, actor: str, now: datetime,
           why: str) -> tuple[Reentry, list[dict[str, Any]]]:
    """Ask the gate for a paper strategy's way back to live: a request is opened (or the block
    recorded); never applied here."""
    out: Outcome = promote(conn, policy, strategy_id, actor=actor, reason=why, now=now, apply=False)
    if out.status == "blocked":
        message = f"{strategy_id} stays in paper; {out.message}"
    else:
        lp = policy.live_promotion
        needs = (f"needs {lp.required_approvals} approvals from {', '.join(lp.approver_names)}"
                 if lp.mode == "manual_approval" else "the campaign loop applies it once every gate passes")
        message = f"{strategy_id} restored to paper; request {out.request_id} opened ({needs})"
    return Reentry(strategy_id, out.status, out.request_id, message, out.exit_code), out.notify


def halt(conn: Connection, world: str, policy: WorldPolicy | None, *, actor: str, now: datetime,
         reason: str) -> SwitchResult:
    """The kill switch: set the persisted flag and take every live strategy back to paper.

    ``policy`` is the policy in force as the store keeps it (``None`` for a world the store has
    never recorded, which has no activations); the world's file is never read, so a missing,
    broken or unversioned file cannot stop it.
    """
    ledger.lock(conn)
    _ensure_world_row(conn, world, now)
    if _halted(conn, world):
        return SwitchResult(world, extra={"halted": True, "changed_flag": False})
    w = schema.worlds
    conn.execute(sa.update(w).where(w.c.world_id == world).values(
        halted=True, halted_reason=reason, halted_by=actor, halted_at=iso(now)))
    version, rows = current_set(conn, world)
    was_live = sorted(sid for sid, a in rows.items() if a.stage == "live")
    result = SwitchResult(world, extra={"halted": True, "changed_flag": True, "was_live": was_live})
    payload = {"halted": True, "was_live": was_live}
    if policy is not None and was_live:
        result.set_version = write_set(conn, policy=policy, rows=rows, changed={}, actor=actor, now=now,
                                       kind="world.halted", subject=world, reason=reason, payload=payload)
        result.changed = {sid: "paper" for sid in was_live}
    else:
        if was_live:  # live rows with no recorded policy cannot exist; fail closed if they ever do
            _withdraw_without_policy(conn, world, rows, actor=actor, now=now)
            result.changed = {sid: "paper" for sid in was_live}
        ledger.append(conn, actor=actor, kind="world.halted", now=now, world=world, subject=world, reason=reason,
                      payload={**payload, "activations": [a.to_dict() for a in current_set(conn, world)[1].values()]})
    if policy is not None:
        record_decisions(conn, policy, now=now)
    result.notify.append({"event": "world.halted", "world": world, "reason": reason, "was_live": was_live})
    return result


def _withdraw_without_policy(conn: Connection, world: str, rows: dict[str, Activation], *, actor: str,
                             now: datetime) -> None:
    sets, acts, st = schema.activation_sets, schema.activations, schema.strategies
    version, _ = current_set(conn, world)
    new = {sid: as_paper(world, a, now) if a.stage == "live" else a for sid, a in rows.items()}
    conn.execute(sa.insert(sets).values(world_id=world, set_version=version + 1, created_at=iso(now),
                                        created_by=actor, reason="halted",
                                        etag=content_hash({"world": world, "rows": sorted(
                                            (a.strategy_id, a.etag) for a in new.values())})))
    conn.execute(sa.insert(acts), [{"world_id": world, "set_version": version + 1, "strategy_id": a.strategy_id,
                                    "stage": a.stage, "weight": a.weight, "run_id": a.run_id, "etag": a.etag,
                                    "activated_at": a.activated_at} for a in new.values()])
    for sid, a in rows.items():
        if a.stage == "live":
            conn.execute(sa.update(st).where(st.c.world_id == world, st.c.strategy_id == sid)
                         .values(stage="paper", updated_at=iso(now)))


def _live_at_last_halt(conn: Connection, world: str) -> list[str]:
    last = ledger.entries(conn, world=world, kind="world.halted", limit=1)
    return list((last[-1].payload or {}).get("was_live") or []) if last else []


def resume(conn: Connection, policy: WorldPolicy, *, actor: str, now: datetime, reason: str) -> SwitchResult:
    """Lift the kill switch. Strategies that were live when the world was halted stay in paper and
    get a promotion request each: resuming decides nothing about live."""
    world = policy.world
    ledger.lock(conn)
    if not _halted(conn, world):
        return SwitchResult(world, extra={"halted": False, "changed_flag": False})
    w = schema.worlds
    conn.execute(sa.update(w).where(w.c.world_id == world).values(
        halted=False, halted_reason=None, halted_by=None, halted_at=None))
    _, rows = current_set(conn, world)
    back = [sid for sid in _live_at_last_halt(conn, world) if sid in rows and rows[sid].stage == "paper"]
    ledger.append(conn, actor=actor, kind="world.resumed", now=now, world=world, subject=world, reason=reason,
                  payload={"halted": False, "activations": [a.to_dict() for a in rows.values()],
                           "requests_for": back})
    record_decisions(conn, policy, now=now)
    result = SwitchResult(world, extra={"halted": False, "changed_flag": True})
    result.notify.append({"event": "world.resumed", "world": world, "reason": reason})
    for sid in back:
        entry, notes = reopen(conn, policy, sid, actor=actor, now=now, why=f"resume: {reason}")
        result.reentries.append(entry)
        result.notify.extend(notes)
    return result


def rollback(conn: Connection, policy: WorldPolicy, *, actor: str, now: datetime, reason: str) -> SwitchResult:
    """Restore the previous activation set as a new set; stages follow it. A row that would go live
    again is restored to paper with a request opened; a strategy live in both sets keeps its
    current (gate-admitted) row."""
    world = policy.world
    ledger.lock(conn)
    version, rows = current_set(conn, world)
    if version < 2:
        raise ConflictError(f"world {world} has no previous activation set to roll back to",
                            hint="qmtl world history shows the activation changes", code="nothing_to_roll_back")
    previous = read_set(conn, world, version - 1)
    target: dict[str, Activation] = {}
    back: list[str] = []
    for sid, a in previous.items():
        live_now = sid in rows and rows[sid].stage == "live"
        if a.stage == "live" and live_now:
            target[sid] = rows[sid]
        elif a.stage == "live":
            target[sid] = as_paper(world, a, now)
            back.append(sid)
        else:
            target[sid] = a
    changed: dict[str, str | None] = {}
    for sid in set(rows) | set(target):
        before = rows[sid].stage if sid in rows else None
        after = target[sid].stage if sid in target else None
        if before != after:
            changed[sid] = after
    new_version = write_set(conn, policy=policy, rows=target, changed=changed, actor=actor, now=now,
                            kind="world.rollback", subject=f"activation set {version} -> {version - 1}",
                            reason=reason, payload={"restored_set": version - 1, "from_set": version,
                                                    "requests_for": sorted(back)})
    _, written = current_set(conn, world)  # as written: a halt or allow_live: false keeps rows in paper
    moved = {sid: written[sid].stage if sid in written else None for sid in set(rows) | set(written)}
    result = SwitchResult(world, {sid: to for sid, to in sorted(moved.items())
                                  if to != (rows[sid].stage if sid in rows else None)},
                          new_version, extra={"from_set": version, "restored_set": version - 1})
    result.notify.append({"event": "world.rollback", "world": world, "from_set": version,
                          "restored_set": version - 1, "set_version": new_version})
    for sid in sorted(back):
        entry, notes = reopen(conn, policy, sid, actor=actor, now=now, why=f"rollback: {reason}")
        result.reentries.append(entry)
        result.notify.extend(notes)
    return result


def withdraw_live(conn: Connection, policy: WorldPolicy, *, actor: str, now: datetime, reason: str) -> SwitchResult:
    """Under a policy with ``allow_live: false``, take every live strategy back to paper (the
    policy's own words made true in every table). Nothing is written when nothing is live."""
    world = policy.world
    ledger.lock(conn)
    _, rows = current_set(conn, world)
    live = sorted(sid for sid, a in rows.items() if a.stage == "live")
    result = SwitchResult(world)
    if policy.allow_live or not live:
        return result
    result.set_version = write_set(conn, policy=policy, rows=rows, changed={}, actor=actor, now=now,
                                   kind="policy.enforced", subject=f"policy_version {policy.policy_version}",
                                   reason=reason, payload={"allow_live": False, "withdrawn": live})
    result.changed = {sid: "paper" for sid in live}
    return result
