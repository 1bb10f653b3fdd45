"""The store opens, migrates and maps errors the same way on SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa

from qmtl_core.errors import StoreUnavailable, StoreVersionError
from qmtl_core.store import current_version, head_version, migrate, open_store, schema
from qmtl_core.store._store import Store
from qmtl_core.store.migrations import MIGRATIONS, Migration

FIXTURES = Path(__file__).parent / "fixtures"


def test_new_store_is_at_head_and_has_every_table(store_url: str) -> None:
    store = open_store(store_url)
    with store.read() as conn:
        assert current_version(conn) == head_version()
        names = set(sa.inspect(conn).get_table_names())
    assert set(schema.metadata.tables) <= names
    store.dispose()


def test_reopening_applies_nothing(store_url: str) -> None:
    open_store(store_url).dispose()
    store = Store(store_url)
    with store.write() as conn:
        assert migrate(conn) == []
    store.dispose()


def test_sqlite_store_uses_wal(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'q.db'}")
    with store.read() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    store.dispose()


def test_frozen_v1_store_opens_with_this_version(tmp_path: Path) -> None:
    """A store written by qmtl 0.1.0 must open (and be migrated) by every later qmtl."""
    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.executescript((FIXTURES / "store_v1.sqlite.sql").read_text())
    con.close()
    store = open_store(f"sqlite:///{path}")
    with store.read() as conn:
        assert current_version(conn) == head_version()
        inspector = sa.inspect(conn)
        for table in schema.metadata.tables.values():
            columns = {c["name"] for c in inspector.get_columns(table.name)}
            assert {c.name for c in table.columns} <= columns, table.name
    store.dispose()


def test_older_store_runs_pending_steps_in_order(store_url: str) -> None:
    applied: list[int] = []
    store = open_store(store_url)

    def step(n: int) -> Migration:
        def apply(conn: sa.Connection) -> None:
            applied.append(n)
            conn.execute(sa.text(f"CREATE TABLE extra_{n} (x INTEGER)"))
        return Migration(n, f"step {n}", apply)

    steps = [*MIGRATIONS, step(head_version() + 1), step(head_version() + 2)]
    with store.write() as conn:
        assert migrate(conn, steps) == [head_version() + 1, head_version() + 2]
    with store.read() as conn:
        assert current_version(conn) == head_version() + 2
        assert sa.inspect(conn).has_table(f"extra_{head_version() + 2}")
    assert applied == [head_version() + 1, head_version() + 2]
    store.dispose()


def test_store_newer_than_qmtl_is_refused(store_url: str) -> None:
    store = open_store(store_url)
    with store.write() as conn:
        conn.execute(sa.insert(schema.schema_version).values(
            version=head_version() + 5, description="future", applied_at="2030-01-01T00:00:00.000000Z",
            qmtl_version="9.9"))
    store.dispose()
    with pytest.raises(StoreVersionError) as info:
        open_store(store_url)
    assert info.value.exit_code == 2
    assert "newer" in info.value.message


def test_unreachable_postgres_is_fail_closed_with_redacted_password() -> None:
    with pytest.raises(StoreUnavailable) as info:
        open_store("postgresql+psycopg://bob:secret@127.0.0.1:1/none?connect_timeout=2")
    assert info.value.exit_code == 12
    assert "secret" not in info.value.one_line()
    assert "***" in info.value.one_line()


def test_unsupported_url_is_bad_input() -> None:
    from qmtl_core.errors import ConfigError

    with pytest.raises(ConfigError):
        open_store("mysql://x@y/z")
