"""Recording policy versions: a new content hash becomes a policy version and a ledger entry."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from qmtl_core import ledger
from qmtl_core.errors import PolicyVersionConflict
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

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return dict(self.__dict__)


def _record(row: Any) -> PolicyRecord:
    return PolicyRecord(row.world_id, row.policy_version, row.content_hash, row.source_path,
                        row.recorded_at, row.recorded_by)


def latest_policy(conn: Connection, world_id: str) -> Any:
    """The newest recorded policy row of a world, or ``None``."""
    t = schema.policy_versions
    return conn.execute(sa.select(t).where(t.c.world_id == world_id)
                        .order_by(t.c.policy_version.desc()).limit(1)).first()


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


def record_policy(conn: Connection, *, world_id: str, policy_version: int, content_hash: str,
                  document: dict[str, Any], source_path: str, source_text: str, actor: str,
                  now: datetime) -> tuple[PolicyRecord, bool]:
    """Record the policy if its content is new; returns ``(record, created)``.

    Runs in a write transaction and takes the ledger lock first, so two processes seeing the same
    new file record it once. Changed content under an unchanged or older ``policy_version`` is a
    conflict: approvals and runs are bound to the version, so it must move forward.
    """
    ledger.lock(conn)
    ensure_world_row(conn, world_id, now)
    latest = latest_policy(conn, world_id)
    if latest is not None and latest.content_hash == content_hash:
        return _record(latest), False
    if latest is not None and policy_version <= latest.policy_version:
        raise PolicyVersionConflict(
            f"{source_path}: the policy changed but policy_version is {policy_version}, "
            f"not above the recorded {latest.policy_version}",
            hint=f"set policy_version: {latest.policy_version + 1}")
    diff = "".join(difflib.unified_diff(
        (latest.source_text if latest is not None else "").splitlines(keepends=True),
        source_text.splitlines(keepends=True),
        fromfile=f"{world_id} v{latest.policy_version}" if latest is not None else "/dev/null",
        tofile=f"{world_id} v{policy_version}"))
    values = dict(world_id=world_id, policy_version=policy_version, content_hash=content_hash,
                  source_path=source_path, source_text=source_text, document=document,
                  recorded_at=iso(now), recorded_by=actor)
    conn.execute(sa.insert(schema.policy_versions).values(**values))
    ledger.append(conn, actor=actor, kind="policy.recorded" if latest is None else "policy.changed",
                  now=now, world=world_id, subject=f"policy_version {policy_version}",
                  reason="new policy content",
                  payload={"policy_version": policy_version, "content_hash": content_hash,
                           "previous_version": latest.policy_version if latest is not None else None,
                           "diff": diff})
    return _record(conn.execute(sa.select(schema.policy_versions).where(
        schema.policy_versions.c.world_id == world_id,
        schema.policy_versions.c.policy_version == policy_version)).one()), True
