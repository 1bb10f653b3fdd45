"""Tampering with a store the way an attacker with its owner's rights could.

On PostgreSQL the ledger refuses UPDATE and DELETE through a trigger (schema v5); the table's owner
(qmtl's own role in most deployments) may still disable it, so tampering tests do exactly that.
It is why signed checkpoints kept outside the database matter: the trigger stops accidents and
under-privileged roles, not whoever owns the tables.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.engine import Connection

from qmtl_core.store import Store


@contextmanager
def as_owner(store: Store) -> Iterator[Connection]:
    """A write transaction in which the ledger's append-only trigger is off (re-enabled at the end)."""
    with store.write() as conn:
        pg = conn.dialect.name == "postgresql"
        if pg:
            conn.exec_driver_sql("ALTER TABLE ledger DISABLE TRIGGER USER")
        yield conn
        if pg:
            conn.exec_driver_sql("ALTER TABLE ledger ENABLE TRIGGER USER")
