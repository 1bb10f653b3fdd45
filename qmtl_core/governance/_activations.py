"""Activation sets: what is paper and live in a world, versioned so rollback restores the last one.

Every change writes a whole new set (``set_version`` + 1) that copies every other strategy's row
unchanged, moves the strategy's stage in ``strategies`` to match, records the decision envelope
and appends a ledger entry whose payload carries the resulting set — all in the caller's one
transaction. A crash at any point leaves the old set or the new one, never a mix, and
``qmtl world history --at`` can answer from the ledger alone. Several strategies moved together
(``set_stages``, the loop's promotions to paper) make one set, each with its own ledger entry, the
last of which carries the set: the cost of a set is the world's size, so it is paid once a batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from qmtl_core import ledger
from qmtl_core.canonical import content_hash
from qmtl_core.errors import ConflictError, InternalError
from qmtl_core.governance._decision import derive_decision
from qmtl_core.policy import WorldPolicy
from qmtl_core.store import schema
from qmtl_core.timeutil import iso


@dataclass(frozen=True)
class Activation:
    """One strategy's row in an activation set."""

    strategy_id: str
    stage: str
    weight: float
    run_id: str | None
    etag: str
    activated_at: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"strategy_id": self.strategy_id, "stage": self.stage, "weight": self.weight,
                "run_id": self.run_id, "etag": self.etag, "activated_at": self.activated_at}


def current_set(conn: Connection, world: str) -> tuple[int, dict[str, Activation]]:
    """The newest activation set of a world: ``(set_version, {strategy: activation})``."""
    sets = schema.activation_sets
    version = conn.execute(sa.select(sa.func.max(sets.c.set_version)).where(sets.c.world_id == world)).scalar()
    if version is None:
        return 0, {}
    return int(version), read_set(conn, world, int(version))


def book_members(conn: Connection, policy: WorldPolicy) -> frozenset[str]:
    """The strategies a candidate's portfolio metrics are measured against: the world's live
    activations, and its paper ones too with ``risk.portfolio_book: live_and_paper``."""
    stages = {"live"} if policy.risk.portfolio_book == "live" else {"live", "paper"}
    return frozenset(sid for sid, a in current_set(conn, policy.world)[1].items() if a.stage in stages)


def read_set(conn: Connection, world: str, version: int) -> dict[str, Activation]:
    """The rows of one activation set."""
    acts = schema.activations
    rows = conn.execute(sa.select(acts).where(acts.c.world_id == world, acts.c.set_version == version)
                        .order_by(acts.c.strategy_id))
    return {r.strategy_id: Activation(r.strategy_id, r.stage, float(r.weight), r.run_id, r.etag, r.activated_at)
            for r in rows}


def _activation_etag(world: str, a: dict[str, Any]) -> str:
    return content_hash({"world": world, "strategy_id": a["strategy_id"], "stage": a["stage"],
                         "weight": a["weight"], "run_id": a["run_id"]})


def live_allowed(conn: Connection, policy: WorldPolicy) -> bool:
    """Whether anything may be live in the world now: ``allow_live`` and not halted."""
    halted = conn.execute(sa.select(schema.worlds.c.halted).where(schema.worlds.c.world_id == policy.world)).scalar()
    return policy.allow_live and not halted


def as_paper(world: str, a: Activation, now: datetime) -> Activation:
    """The paper row a live activation is restored to when it may not be live."""
    values = {"strategy_id": a.strategy_id, "stage": "paper", "weight": a.weight, "run_id": a.run_id}
    return Activation(a.strategy_id, "paper", a.weight, a.run_id, _activation_etag(world, values), iso(now))


def write_set(conn: Connection, *, policy: WorldPolicy, rows: dict[str, Activation], changed: dict[str, str | None],
              actor: str, now: datetime, kind: str, subject: str, reason: str,
              payload: dict[str, Any] | None = None, admitted: str | None = None,
              current: tuple[int, dict[str, Activation]] | None = None,
              preceding: Sequence[SetEntry] = ()) -> int:
    """Store ``rows`` as the world's next set, move stages, record decisions, ledger it. Returns the version.

    The one gate into live is enforced here, where every activation is written: a row that becomes
    live must be the one strategy the promotion gate ``admitted`` in this transaction, and while the
    world is halted or sets ``allow_live: false`` no row is written as live at all (it is written
    as paper), so no caller, present or future, can make a strategy live on its own.

    ``current`` is the set the caller read under the ledger lock (read again when not given).
    ``preceding``: when one set moves several strategies (``set_stages``), each has its own ledger
    entry of ``kind``; those come first and the last entry carries the set.
    """
    world = policy.world
    ledger.lock(conn)
    version, current = current if current is not None else current_set(conn, world)
    rows, changed = dict(rows), dict(changed)
    may_be_live = live_allowed(conn, policy)
    for sid, a in list(rows.items()):
        if a.stage != "live":
            continue
        if not may_be_live:
            rows[sid] = as_paper(world, a, now)
            changed[sid] = "paper"
        elif sid != admitted and not (sid in current and current[sid].stage == "live"):
            raise InternalError(f"{sid} would become live in {world} without passing the promotion gate",
                                code="live_without_gate")
    new_version = version + 1
    set_etag = content_hash({"world": world, "rows": sorted((a.strategy_id, a.etag) for a in rows.values())})
    conn.execute(sa.insert(schema.activation_sets).values(world_id=world, set_version=new_version,
                                                          created_at=iso(now), created_by=actor,
                                                          reason=reason, etag=set_etag))
    if rows:
        conn.execute(sa.insert(schema.activations), [
            {"world_id": world, "set_version": new_version, "strategy_id": a.strategy_id, "stage": a.stage,
             "weight": a.weight, "run_id": a.run_id, "etag": a.etag, "activated_at": a.activated_at}
            for a in rows.values()])
    halted = bool(conn.execute(sa.select(schema.worlds.c.halted).where(schema.worlds.c.world_id == world)).scalar())
    st = schema.strategies
    moved = {sid: stage or "backtest" for sid, stage in changed.items()}
    for new_stage in sorted(set(moved.values())):  # one UPDATE per stage moved into, not per strategy
        ids = [sid for sid, stage in moved.items() if stage == new_stage]
        for chunk in _chunks(ids):
            conn.execute(sa.update(st).where(st.c.world_id == world, st.c.strategy_id.in_(chunk))
                         .values(stage=new_stage, updated_at=iso(now), stage_entered_at=iso(now)))
    _store_decisions(conn, policy, [
        derive_decision(policy, sid, stage=stage, live_active=stage == "live", halted=halted, now=now,
                        activation_etag=a.etag if (a := rows.get(sid)) else None) for sid, stage in moved.items()],
        now=now)
    ledger.append_many(conn, [
        *(ledger.Draft(kind, world, entry.subject, entry.reason, entry.payload) for entry in preceding),
        ledger.Draft(kind, world, subject, reason, {
            **(payload or {}), "set_version": new_version, "set_etag": set_etag, "changed": changed,
            "activations": [a.to_dict() for a in rows.values()]})], actor=actor, now=now)
    return new_version


def record_decision(conn: Connection, policy: WorldPolicy, strategy_id: str, *, stage: str | None,
                    live_active: bool, halted: bool, now: datetime, activation_etag: str | None = None) -> Any:
    """Derive the strategy's decision envelope and store it when it differs from the last one."""
    envelope = derive_decision(policy, strategy_id, stage=stage, live_active=live_active, halted=halted,
                               now=now, activation_etag=activation_etag)
    _store_decisions(conn, policy, [envelope], now=now)
    return envelope


def _store_decisions(conn: Connection, policy: WorldPolicy, envelopes: Sequence[Any], *, now: datetime) -> None:
    """Store each envelope that differs from its strategy's last stored one: the last ones read in
    one statement and the new ones inserted in one, however many strategies a set moved."""
    d = schema.decisions
    last: dict[str, str] = {}
    for chunk in _chunks([e.strategy_id for e in envelopes]):
        newest = (sa.select(sa.func.max(d.c.id)).where(d.c.world_id == policy.world, d.c.strategy_id.in_(chunk))
                  .group_by(d.c.strategy_id))
        last.update((r.strategy_id, r.etag) for r in conn.execute(
            sa.select(d.c.strategy_id, d.c.etag).where(d.c.id.in_(newest.scalar_subquery()))))
    new = [dict(world_id=policy.world, strategy_id=e.strategy_id, effective_mode=e.effective_mode, reason=e.reason,
                as_of=iso(now), ttl_sec=e.ttl_sec, etag=e.etag, policy_version=e.policy_version, created_at=iso(now))
           for e in envelopes if last.get(e.strategy_id) != e.etag]
    if new:
        conn.execute(sa.insert(d), new)


def _chunks(ids: Sequence[str], size: int = 500) -> list[Sequence[str]]:
    """``ids`` in slices small enough for one statement's bound parameters on every backend."""
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def _decision_inputs(conn: Connection, policy: WorldPolicy,
                     strategy_id: str | None) -> list[tuple[str, str | None, bool, bool, str | None]]:
    """What a decision envelope is derived from, per strategy (one, known or not, or every one of
    the world): ``(strategy_id, stage, live_active, halted, activation_etag)``."""
    st = schema.strategies
    query = sa.select(st.c.strategy_id, st.c.stage).where(st.c.world_id == policy.world)
    if strategy_id is not None:
        query = query.where(st.c.strategy_id == strategy_id)
    stages: dict[str, str | None] = {r.strategy_id: r.stage for r in conn.execute(query.order_by(st.c.strategy_id))}
    if strategy_id is not None:
        stages.setdefault(strategy_id, None)
    halted = bool(conn.execute(sa.select(schema.worlds.c.halted).where(schema.worlds.c.world_id == policy.world))
                  .scalar())
    _, rows = current_set(conn, policy.world)
    return [(sid, stage, (a := rows.get(sid)) is not None and a.stage == "live", halted, a.etag if a else None)
            for sid, stage in stages.items()]


def record_decisions(conn: Connection, policy: WorldPolicy, *, now: datetime,
                     strategy_id: str | None = None) -> list[Any]:
    """``current_decisions``, each envelope stored when it changed: for the writers that move the
    kill switch or the stages (never for a read)."""
    out = []
    for sid, stage, live_active, halted, etag in _decision_inputs(conn, policy, strategy_id):
        out.append(record_decision(conn, policy, sid, stage=stage, live_active=live_active,
                                   halted=halted, now=now, activation_etag=etag))
    return out


def current_decisions(conn: Connection, policy: WorldPolicy, *, now: datetime,
                      strategy_id: str | None = None) -> list[Any]:
    """The decision envelopes now of one strategy (known to the world or not) or of every strategy
    of the world, derived and never stored: asking is a read (a reader must not be able to write
    rows by asking about made-up strategies). Envelopes are stored where they change: with every
    new activation set (``write_set``) and with the kill switch (``set_halt``)."""
    out = []
    for sid, stage, live_active, halted, etag in _decision_inputs(conn, policy, strategy_id):
        out.append(derive_decision(policy, sid, stage=stage, live_active=live_active,
                                   halted=halted, now=now, activation_etag=etag))
    return out


def set_stage(conn: Connection, *, policy: WorldPolicy, strategy_id: str, expect: str | tuple[str, ...], to: str,
              actor: str, now: datetime, kind: str, reason: str, run_id: str | None = None,
              weight: float = 0.0, payload: dict[str, Any] | None = None, admitted: str | None = None) -> int:
    """Move one strategy between stages as a new activation set; every other row is copied as is
    (``admitted``: the strategy the promotion gate allowed live, see ``write_set``)."""
    ledger.lock(conn)  # before reading the stage and the current set, so no concurrent change is lost
    st = schema.strategies
    row = conn.execute(sa.select(st.c.stage).where(st.c.world_id == policy.world,
                                                   st.c.strategy_id == strategy_id)).first()
    allowed = (expect,) if isinstance(expect, str) else expect
    if row is None or row.stage not in allowed:
        raise ConflictError(f"{strategy_id} is {row.stage if row else 'not known'} in {policy.world}, not "
                            f"{' or '.join(allowed)}", hint="check qmtl world campaign", code="stale_plan")
    version, current = current_set(conn, policy.world)
    rows = dict(current)
    if to in ("paper", "live"):
        values = {"strategy_id": strategy_id, "stage": to, "weight": float(weight), "run_id": run_id}
        rows[strategy_id] = Activation(strategy_id, to, float(weight), run_id,
                                       _activation_etag(policy.world, values), iso(now))
    else:
        rows.pop(strategy_id, None)
    return write_set(conn, policy=policy, rows=rows, changed={strategy_id: to}, actor=actor, now=now, kind=kind,
                     subject=f"{strategy_id} {row.stage} -> {to}", reason=reason,
                     payload={"strategy_id": strategy_id, "from": row.stage, "to": to, **(payload or {})},
                     admitted=admitted, current=(version, current))


@dataclass(frozen=True)
class StageMove:
    """One strategy of a ``set_stages`` batch: where it goes, why, and what its ledger entry adds."""

    strategy_id: str
    reason: str
    run_id: str | None = None
    payload: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SetEntry:
    """A ledger entry written with an activation set, ahead of the one that carries the set."""

    subject: str
    reason: str
    payload: dict[str, Any]


def set_stages(conn: Connection, *, policy: WorldPolicy, moves: Sequence[StageMove], expect: str, to: str,
               actor: str, now: datetime, kind: str) -> int:
    """``set_stage`` for several strategies at once, into paper: one new activation set.

    What makes the loop's promotions cost what they move, not the world's size: a set copies every
    row of the world and its ledger entry carries them all, so a round of ``k`` promotions writes
    that once, not ``k`` times. Each strategy still has its own ``kind`` entry (strategy, from, to,
    its evidence); the last one carries the set, as ``set_stage``'s does. All or nothing, like
    ``set_stage``: a strategy no longer in ``expect`` refuses the whole batch (``stale_plan``), so
    callers drop those first, under the ledger lock.
    """
    if to != "paper":
        raise InternalError(f"set_stages moves strategies into paper, not {to}", code="bad_batch")
    ledger.lock(conn)
    st = schema.strategies
    ids = [m.strategy_id for m in moves]
    stages = {r.strategy_id: r.stage for r in conn.execute(
        sa.select(st.c.strategy_id, st.c.stage).where(st.c.world_id == policy.world, st.c.strategy_id.in_(ids)))}
    stale = [sid for sid in ids if stages.get(sid) != expect]
    if stale or len(set(ids)) != len(ids) or not ids:
        raise ConflictError(f"{', '.join(stale) or 'the batch'} not {expect} in {policy.world} (or repeated)",
                            hint="check qmtl world campaign", code="stale_plan")
    version, current = current_set(conn, policy.world)
    rows = dict(current)
    entries = []
    for m in moves:
        values = {"strategy_id": m.strategy_id, "stage": to, "weight": 0.0, "run_id": m.run_id}
        rows[m.strategy_id] = Activation(m.strategy_id, to, 0.0, m.run_id, _activation_etag(policy.world, values),
                                         iso(now))
        entries.append(SetEntry(f"{m.strategy_id} {expect} -> {to}", m.reason,
                                {"strategy_id": m.strategy_id, "from": expect, "to": to, **m.payload}))
    last = entries[-1]
    return write_set(conn, policy=policy, rows=rows, changed={sid: to for sid in ids}, actor=actor, now=now,
                     kind=kind, subject=last.subject, reason=last.reason, payload=last.payload,
                     current=(version, current), preceding=entries[:-1])
