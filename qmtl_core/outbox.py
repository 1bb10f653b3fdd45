"""Durable webhook notifications: a transactional outbox.

An event is written to ``notification_outbox`` in the same transaction as the change it announces,
so it exists exactly when the change does: a process killed after the commit loses nothing. After
the commit, and again whenever a qmtl process next changes something or runs the campaign loop,
``flush`` delivers what is due: rows are claimed for ``CLAIM_SECONDS`` (one deliverer at a time),
POSTed with an ``Idempotency-Key`` header equal to the event's ``event_id`` (also in the body), and
settled. A failed pass is recorded in the ledger (``notification.failed``) and retried later, up to
``MAX_ATTEMPTS`` in all. The one window left, a crash after the receiver answered and before the
row was settled, re-sends the same ``event_id`` after the claim expires; receivers deduplicate on it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from qmtl_core import ledger
from qmtl_core.governance._notify import Delivery
from qmtl_core.store import Store, schema
from qmtl_core.timeutil import iso

MAX_ATTEMPTS = 12
CLAIM_SECONDS = 120
#: Wait before the next pass after a failed one (by how many passes failed so far).
RETRY_AFTER = (timedelta(minutes=1), timedelta(minutes=5), timedelta(minutes=30), timedelta(hours=2))

Deliver = Callable[[str, Sequence[dict[str, Any]]], list[Delivery]]


def enqueue(conn: Connection, *, url: str, world: str | None, events: Sequence[dict[str, Any]], actor: str,
            now: datetime) -> list[str]:
    """Write ``events`` for delivery to ``url`` inside the caller's transaction; their event ids."""
    ids = []
    for event in events:
        event_id = uuid.uuid4().hex
        conn.execute(sa.insert(schema.notification_outbox).values(
            event_id=event_id, world_id=world, url=url, status="pending", attempts=0, created_at=iso(now),
            next_attempt_at=iso(now),
            event={**event, "event_id": event_id, "ts": now.isoformat(), "actor": actor}))
        ids.append(event_id)
    return ids


def _claim(conn: Connection, now: datetime, limit: int) -> list[Any]:
    t = schema.notification_outbox
    due = ((t.c.status == "pending") & (t.c.next_attempt_at <= iso(now))
           & (t.c.claimed_until.is_(None) | (t.c.claimed_until < iso(now))))
    rows = conn.execute(sa.select(t).where(due).order_by(t.c.id).limit(limit)
                        .with_for_update(skip_locked=True)).all()
    if rows:
        conn.execute(sa.update(t).where(t.c.id.in_([r.id for r in rows]))
                     .values(claimed_until=iso(now + timedelta(seconds=CLAIM_SECONDS))))
    return rows


def _settle(conn: Connection, row: Any, result: Delivery, *, actor: str, now: datetime) -> dict[str, Any]:
    t = schema.notification_outbox
    attempts = int(row.attempts) + result.attempts
    if result.ok:
        conn.execute(sa.update(t).where(t.c.id == row.id).values(
            status="delivered", attempts=attempts, delivered_at=iso(now), claimed_until=None, last_error=None))
    else:
        final = attempts >= MAX_ATTEMPTS
        wait = RETRY_AFTER[min(attempts // 3, len(RETRY_AFTER) - 1)]
        conn.execute(sa.update(t).where(t.c.id == row.id).values(
            status="failed" if final else "pending", attempts=attempts, claimed_until=None,
            last_error=result.error, next_attempt_at=iso(now + wait)))
        ledger.append(conn, actor=actor, kind="notification.failed", now=now, world=row.world_id,
                      subject=result.event,
                      reason=f"{result.error} after {result.attempts} attempt(s)"
                             + ("; giving up" if final else f"; retrying after {iso(now + wait)[:19]}Z"),
                      payload={"url": row.url, "event": result.event, "event_id": row.event_id,
                               "attempts": attempts, "final": final})
    return {"event": result.event, "event_id": row.event_id, "ok": result.ok, "attempts": result.attempts,
            "error": result.error}


def flush(store: Store, deliver: Deliver, *, actor: str, now: Callable[[], datetime],
          limit: int = 100) -> list[dict[str, Any]]:
    """Deliver every due event once (claimed, sent, settled); what happened to each."""
    with store.write() as conn:
        rows = _claim(conn, now(), limit)
    out = []
    for row in rows:
        (result,) = deliver(row.url, [row.event])
        with store.write() as conn:
            out.append(_settle(conn, row, result, actor=actor, now=now()))
    return out


def pending(conn: Connection) -> list[dict[str, Any]]:
    """Events not delivered yet (for status and tests)."""
    t = schema.notification_outbox
    return [dict(r._mapping) for r in conn.execute(sa.select(t).where(t.c.status == "pending").order_by(t.c.id))]
