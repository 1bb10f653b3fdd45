"""Who waits for whom among write transactions, and in which order (so no two wait for each other).

Every write appends to the ledger, whose head row orders the appends. An evaluation holds the head
only from its append to its commit, not while it reads and computes, so two evaluations of
different strategies run side by side. What an evaluation reads before its append is protected by
two narrower locks, taken as its first statement:

- **writers** (one per store): an evaluation holds it *shared*; every other read-then-write flow
  (governance, the campaign loop, policy recording, risk snapshots: ``ledger.lock``) holds it
  *exclusive*, so such a flow never interleaves with an evaluation and sees the store exactly as if
  writers ran one at a time, as before;
- **strategy** (one per world and strategy): exclusive, so two evaluations of one strategy (the
  same run key posted twice, two runs racing for the run head) run one after the other, and the
  second makes revision 2 instead of failing on a unique key.

The order is always writers → strategy → ledger head. A transaction that already holds writers
exclusive takes the other two at once (nobody else can hold a strategy lock meanwhile).

PostgreSQL: transaction-scoped advisory locks (released at commit or rollback). SQLite: no-ops,
since ``BEGIN IMMEDIATE`` already gives each write transaction the whole database.
"""

from __future__ import annotations

import hashlib

import sqlalchemy as sa
from sqlalchemy.engine import Connection

# The subquery runs before the outer expression, so the shared lock is always taken first.
_EVALUATION = sa.text("SELECT pg_advisory_xact_lock(:strategy) "
                      "FROM (SELECT pg_advisory_xact_lock_shared(:writers)) AS writers_first")
_EXCLUSIVE = sa.text("SELECT pg_advisory_xact_lock(:writers)")


def _key(*parts: str) -> int:
    """A signed 64-bit advisory lock key for ``parts`` (a collision only makes two keys wait for
    each other, never lets two holders in at once)."""
    digest = hashlib.sha256("\x1f".join(("qmtl", *parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


WRITERS_KEY = _key("writers")


def _postgresql(conn: Connection) -> bool:
    return conn.dialect.name == "postgresql"


def writers_exclusive(conn: Connection) -> None:
    """Wait until no evaluation is in flight and keep new ones out until this transaction ends."""
    if _postgresql(conn):
        conn.execute(_EXCLUSIVE, {"writers": WRITERS_KEY})


def evaluation(conn: Connection, world: str, strategy_id: str) -> None:
    """Take an evaluation's locks: writers shared, then the strategy's exclusive."""
    if _postgresql(conn):
        conn.execute(_EVALUATION, {"writers": WRITERS_KEY, "strategy": _key("strategy", world, strategy_id)})


__all__ = ["WRITERS_KEY", "evaluation", "writers_exclusive"]
