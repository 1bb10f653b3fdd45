"""Recording policy versions, and governing which one is in force.

A new content hash of a world's policy file becomes a recorded version and a ledger entry. Who may
change the rules must not be whoever edits the file: a new version of a world with strategies in
paper or live is recorded as a *proposal*, and the version in force stays the newest adopted one
(kept in the store, whatever the file says) until ``required_approvals`` approvers of the version
in force approve the proposal. A world with nothing in paper or live, or never recorded before,
adopts a new version directly. There is no "tightening" shortcut: whether a change is safer is a
judgement about gates, windows, slots and people at once, so every change to a running world is
approved; to stop trading at once, ``qmtl world halt`` needs no approval. Recording happens only on
commands that act (and ``qmtl world validate --record``), never on reads.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from qmtl_core import ledger
from qmtl_core.errors import BlockedError, ConflictError, NotFoundError, PolicyVersionConflict
from qmtl_core.policy import WorldPolicy
from qmtl_core.store import schema
from qmtl_core.timeutil import iso


@dataclass(frozen=True)
class PolicyRecord:
    """A recorded policy version of a world."""

    world_id: str
    policy_version: int
    content_hash: str
    source_path: str
    recorded_at: str
    recorded_by: str
    status: str = "adopted"
    adopted_at: str | None = None
    adopted_by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return dict(self.__dict__)


def _record(row: Any) -> PolicyRecord:
    return PolicyRecord(row.world_id, row.policy_version, row.content_hash, row.source_path,
                        row.recorded_at, row.recorded_by, row.status, row.adopted_at, row.adopted_by)


as_record = _record


def latest_policy(conn: Connection, world_id: str) -> Any:
    """The newest recorded policy row of a world (any status), or ``None``."""
    t = schema.policy_versions
    return conn.execute(sa.select(t).where(t.c.world_id == world_id)
                        .order_by(t.c.policy_version.desc()).limit(1)).first()


def in_force_row(conn: Connection, world_id: str) -> Any:
    """The row of the version in force: the newest adopted one, or ``None``."""
    t = schema.policy_versions
    return conn.execute(sa.select(t).where(t.c.world_id == world_id, t.c.status == "adopted")
                        .order_by(t.c.policy_version.desc()).limit(1)).first()


_IN_FORCE_HASH = (sa.select(schema.policy_versions.c.content_hash)
                  .where(schema.policy_versions.c.world_id == sa.bindparam("w"),
                         schema.policy_versions.c.status == "adopted")
                  .order_by(schema.policy_versions.c.policy_version.desc()).limit(1))


def in_force_hash(conn: Connection, world_id: str) -> str | None:
    """The content hash of the version in force (``None``: none adopted): one indexed read (its
    statement built once), for a writer to confirm the policy it decided with is still in force."""
    return conn.execute(_IN_FORCE_HASH, {"w": world_id}).scalar()


def policy_in_force(conn: Connection, world_id: str) -> WorldPolicy | None:
    """The policy in force as the store keeps it (``None`` when the world was never recorded): what
    every decision and the kill switch work from, whatever state the world's file is in."""
    row = in_force_row(conn, world_id)
    return None if row is None else WorldPolicy.model_validate(row.document)


def policy_history(conn: Connection, world_id: str) -> list[PolicyRecord]:
    """Every recorded policy version of a world, oldest first."""
    t = schema.policy_versions
    rows = conn.execute(sa.select(t).where(t.c.world_id == world_id).order_by(t.c.policy_version))
    return [_record(r) for r in rows]


def ensure_world_row(conn: Connection, world_id: str, now: datetime) -> None:
    """Create the world's row if this is the first time the store sees it."""
    t = schema.worlds
    if conn.execute(sa.select(t.c.world_id).where(t.c.world_id == world_id)).first() is None:
        conn.execute(sa.insert(t).values(world_id=world_id, created_at=iso(now), halted=False))


def has_running_strategies(conn: Connection, world_id: str) -> bool:
    """Whether any strategy of the world is in paper or live (its policy changes are governed)."""
    st = schema.strategies
    return conn.execute(sa.select(st.c.strategy_id).where(st.c.world_id == world_id,
                                                          st.c.stage.in_(("paper", "live"))).limit(1)).first() is not None


def _diff(world_id: str, old: Any, source_text: str, policy_version: int) -> str:
    return "".join(difflib.unified_diff(
        (old.source_text if old is not None else "").splitlines(keepends=True),
        source_text.splitlines(keepends=True),
        fromfile=f"{world_id} v{old.policy_version}" if old is not None else "/dev/null",
        tofile=f"{world_id} v{policy_version}"))


def version_diff(conn: Connection, world_id: str, old_version: int, new_version: int) -> str | None:
    """The unified diff between two recorded versions of a world's policy file, as recorded; ``None``
    when either version was never recorded (nothing to show is said, never guessed)."""
    t = schema.policy_versions
    rows = {r.policy_version: r for r in conn.execute(sa.select(t.c.policy_version, t.c.source_text).where(
        t.c.world_id == world_id, t.c.policy_version.in_((old_version, new_version))))}
    if old_version not in rows or new_version not in rows:
        return None
    return _diff(world_id, rows[old_version], rows[new_version].source_text, new_version)


def record_policy(conn: Connection, *, world_id: str, policy_version: int, content_hash: str,
                  document: dict[str, Any], source_path: str, source_text: str, actor: str,
                  now: datetime) -> tuple[PolicyRecord, bool]:
    """Record the policy if its content is new; returns ``(record, created)``.

    Runs in a write transaction and takes the ledger lock first, so two processes seeing the same
    new file record it once. Changed content under an unchanged or older ``policy_version`` is a
    conflict: approvals and runs are bound to the version, so it must move forward. The new version
    is adopted directly when the world has nothing in paper or live (or was never recorded), else
    recorded as a proposal attributed to ``actor`` (earlier open proposals are superseded).
    """
    ledger.lock(conn)
    ensure_world_row(conn, world_id, now)
    latest = latest_policy(conn, world_id)
    in_force = in_force_row(conn, world_id)
    for known in (latest, in_force):
        if known is not None and known.content_hash == content_hash:
            return _record(known), False
    if latest is not None and policy_version <= latest.policy_version:
        raise PolicyVersionConflict(
            f"{source_path}: the policy changed but policy_version is {policy_version}, "
            f"not above the recorded {latest.policy_version}",
            hint=f"set policy_version: {latest.policy_version + 1}")
    t = schema.policy_versions
    adopt = in_force is None or not has_running_strategies(conn, world_id)
    conn.execute(sa.update(t).where(t.c.world_id == world_id, t.c.status == "proposed").values(status="superseded"))
    conn.execute(sa.insert(t).values(
        world_id=world_id, policy_version=policy_version, content_hash=content_hash, source_path=source_path,
        source_text=source_text, document=document, recorded_at=iso(now), recorded_by=actor,
        status="adopted" if adopt else "proposed", adopted_at=iso(now) if adopt else None,
        adopted_by=actor if adopt else None))
    kind = "policy.recorded" if latest is None else ("policy.changed" if adopt else "policy.proposed")
    reason = "new policy content" if adopt else (
        f"proposed: the world has paper or live strategies, so version {in_force.policy_version} stays in force "
        "until approved")
    ledger.append(conn, actor=actor, kind=kind, now=now, world=world_id, subject=f"policy_version {policy_version}",
                  reason=reason,
                  payload={"policy_version": policy_version, "content_hash": content_hash,
                           "previous_version": in_force.policy_version if in_force is not None else None,
                           "status": "adopted" if adopt else "proposed",
                           "diff": _diff(world_id, in_force, source_text, policy_version)})
    return _record(conn.execute(sa.select(t).where(t.c.world_id == world_id,
                                                   t.c.policy_version == policy_version)).one()), True


@dataclass(frozen=True)
class PolicyApproval:
    """One approval of a proposed policy version."""

    approver: str
    reason: str
    at: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"approver": self.approver, "reason": self.reason, "at": self.at}


def _approvals(conn: Connection, world_id: str, version: int, content_hash: str) -> list[PolicyApproval]:
    """The approvals of a version that count: a row of ``policy_approvals`` only where a
    ``policy.approved`` ledger entry by the same approver records it for this content (the hash it
    had then, if schema v9 rehashed it), so a row written behind qmtl's back adopts nothing."""
    a, led = schema.policy_approvals, schema.ledger
    hashes = {content_hash}
    vouched: set[str] = set()
    for kind, actor, payload in conn.execute(
            sa.select(led.c.kind, led.c.actor, led.c.payload).where(
                led.c.world_id == world_id, led.c.subject == f"policy_version {version}",
                led.c.kind.in_(("policy.approved", "policy.rehashed"))).order_by(led.c.seq.desc())):
        payload = payload or {}
        if kind == "policy.rehashed" and payload.get("content_hash") in hashes:
            hashes.add(str(payload.get("previous_hash")))
        elif kind == "policy.approved" and payload.get("content_hash") in hashes:
            vouched.add(actor)
    return [PolicyApproval(r.approver, r.reason, r.created_at) for r in conn.execute(
        sa.select(a).where(a.c.world_id == world_id, a.c.policy_version == version,
                           a.c.content_hash == content_hash).order_by(a.c.id)) if r.approver in vouched]


def policy_status(conn: Connection, world_id: str) -> dict[str, Any]:
    """The version in force, and each open proposal with its diff against it and its approvals."""
    in_force = in_force_row(conn, world_id)
    if in_force is None:
        return {"world": world_id, "in_force": None, "governors": [], "required_approvals": None,
                "proposals": [], "governed": False}
    policy = WorldPolicy.model_validate(in_force.document)
    lp = policy.live_promotion
    t = schema.policy_versions
    proposals = []
    for row in conn.execute(sa.select(t).where(t.c.world_id == world_id, t.c.status == "proposed")
                            .order_by(t.c.policy_version)):
        proposals.append({**_record(row).to_dict(),
                          "approvals": [a.to_dict() for a in _approvals(conn, world_id, row.policy_version,
                                                                          row.content_hash)],
                          "diff": _diff(world_id, in_force, row.source_text, row.policy_version)})
    return {"world": world_id, "in_force": _record(in_force).to_dict(), "governors": list(lp.approver_names),
            "required_approvals": lp.required_approvals if lp.approvers else None,
            "proposals": proposals, "governed": has_running_strategies(conn, world_id)}


def approve_policy(conn: Connection, world_id: str, *, version: int, actor: str, reason: str,
                   now: datetime) -> tuple[dict[str, Any], WorldPolicy | None]:
    """Approve a proposed version as ``actor``; adopt it once ``required_approvals`` approvers of
    the version in force have. Returns ``(result, adopted policy or None)``."""
    ledger.lock(conn)
    t = schema.policy_versions
    row = conn.execute(sa.select(t).where(t.c.world_id == world_id, t.c.policy_version == version)).first()
    if row is None:
        raise NotFoundError(f"world {world_id} has no recorded policy version {version}",
                            hint=f"qmtl world policy status {world_id} lists the proposals", code="policy_not_found")
    if row.status != "proposed":
        raise ConflictError(f"policy version {version} of {world_id} is {row.status}, not proposed",
                            hint=f"qmtl world policy status {world_id} lists the proposals", code="not_proposed")
    in_force = in_force_row(conn, world_id)
    assert in_force is not None  # a proposal exists only beside a version in force
    lp = WorldPolicy.model_validate(in_force.document).live_promotion
    if actor not in lp.approver_names:
        raise BlockedError(f"{actor} is not an approver of {world_id}'s policy in force (version "
                           f"{in_force.policy_version})",
                           hint=f"approvers: {', '.join(lp.approver_names) or 'none (list approvers: in the policy in force)'}",
                           code="not_an_approver")
    if actor == row.recorded_by:
        raise BlockedError(f"{actor} proposed policy version {version} and cannot approve it",
                           hint="another approver must decide (four eyes)", code="proposer_cannot_approve")
    a = schema.policy_approvals
    already = conn.execute(sa.select(a.c.id).where(a.c.world_id == world_id, a.c.policy_version == version,
                                                   a.c.approver == actor)).first()
    if already is None:
        conn.execute(sa.insert(a).values(world_id=world_id, policy_version=version, approver=actor, reason=reason,
                                         content_hash=row.content_hash, created_at=iso(now)))
        ledger.append(conn, actor=actor, kind="policy.approved", now=now, world=world_id,
                      subject=f"policy_version {version}", reason=reason,
                      payload={"policy_version": version, "content_hash": row.content_hash,
                               "in_force": in_force.policy_version})
    approvers = [x.approver for x in _approvals(conn, world_id, version, row.content_hash) if x.approver in lp.approver_names
                 and x.approver != row.recorded_by]
    result = {"world": world_id, "policy_version": version, "approvals": approvers,
              "required_approvals": lp.required_approvals, "already": already is not None, "adopted": False}
    if len(approvers) < lp.required_approvals:
        return result, None
    conn.execute(sa.update(t).where(t.c.world_id == world_id, t.c.policy_version == version)
                 .values(status="adopted", adopted_at=iso(now), adopted_by=actor))
    conn.execute(sa.update(t).where(t.c.world_id == world_id, t.c.status == "proposed",
                                    t.c.policy_version < version).values(status="superseded"))
    ledger.append(conn, actor=actor, kind="policy.adopted", now=now, world=world_id,
                  subject=f"policy_version {version}", reason=f"approved by {', '.join(approvers)}",
                  payload={"policy_version": version, "content_hash": row.content_hash,
                           "previous_version": in_force.policy_version, "approvals": approvers,
                           "diff": _diff(world_id, in_force, row.source_text, version)})
    return {**result, "adopted": True}, WorldPolicy.model_validate(row.document)
