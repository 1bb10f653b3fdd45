"""Engines for the two backends: embedded SQLite (WAL) and shared PostgreSQL."""

from __future__ import annotations

import json
import re
from typing import Any
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

from qmtl_core.errors import ConfigError

#: How long a SQLite writer waits for the lock before giving up (ms).
SQLITE_BUSY_TIMEOUT_MS = 60_000
#: Execution option marking a connection whose transaction will write.
WRITE_OPTION = "qmtl_write"


def json_loads(text: str | bytes) -> Any:
    """Decode a JSON column: orjson (several times faster on the campaign tick's hot path), falling
    back to the standard library for the non-standard tokens (NaN) it refuses."""
    import orjson

    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, safe to print."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def backend_of(url: str) -> str:
    """``sqlite`` or ``postgresql``; anything else is a configuration error."""
    scheme = url.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme in ("sqlite", "postgresql"):
        return scheme
    raise ConfigError(f"unsupported database URL {redact_url(url)!r}",
                      hint="use sqlite:///PATH or postgresql+psycopg://USER@HOST:PORT/DB")


def create_engine(url: str) -> Engine:
    """An engine configured for qmtl's transaction discipline on the URL's backend."""
    backend = backend_of(url)
    if backend == "sqlite":
        return _sqlite_engine(url)
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    return sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5,
                            json_deserializer=json_loads)


def _sqlite_engine(url: str) -> Engine:
    path = url.split("sqlite:///", 1)[1] if url.startswith("sqlite:///") else ""
    if path and path != ":memory:":
        Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
                              json_deserializer=json_loads)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        # Take transaction control from pysqlite so BEGIN IMMEDIATE below is really ours.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # type: ignore[no-untyped-def]
        # A writer takes the write lock up front: read-then-write transactions would otherwise
        # fail with SQLITE_BUSY on upgrade instead of waiting their turn.
        if conn.get_execution_options().get(WRITE_OPTION):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")

    return engine
