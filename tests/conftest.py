"""Shared fixtures: an isolated QMTL_HOME per test and a store on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
from typing import Any
import shutil
from pathlib import Path

import pytest

from tests._pg import PgCluster

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_WORLDS = ROOT / "worlds"


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads or writes the user's ~/.qmtl or inherits qmtl settings from the shell."""
    for var in ("QMTL_HOME", "QMTL_WORLDS_DIR", "QMTL_SERVER", "QMTL_DATABASE_URL", "QMTL_TOKEN",
                "QMTL_JSON", "QMTL_DEBUG", "QMTL_CHECKPOINT_KEY", "QMTL_CHECKPOINT_VERIFIER", "QMTL_CHECKPOINT_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("QMTL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture(scope="session")
def pg_cluster():
    """One throwaway PostgreSQL cluster per test process (xdist worker)."""
    cluster = PgCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store URL on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("pg_cluster").new_database()


@pytest.fixture
def worlds_dir(tmp_path: Path) -> Path:
    """A private copy of the bundled example worlds."""
    target = tmp_path / "worlds"
    shutil.copytree(EXAMPLE_WORLDS, target, ignore=shutil.ignore_patterns("data"))
    return target


@pytest.fixture
def qmtl_env(tmp_path: Path, worlds_dir: Path, store_url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment for a CLI run against a fresh store on the parametrised backend."""
    monkeypatch.setenv("QMTL_WORLDS_DIR", str(worlds_dir))
    monkeypatch.setenv("QMTL_DATABASE_URL", store_url)
    return {**os.environ}


@pytest.fixture(params=["local", "remote"])
def cli_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """CLI tests that use this run twice: on the local store, and through the HTTP API (the real
    ``qmtl serve`` app behind an in-process transport, ``tests/_remote.py``)."""
    from tests import _remote, cli_helpers

    mode = str(request.param)
    monkeypatch.setattr(cli_helpers, "MODE", mode)
    if mode == "remote":
        import qmtl_cli._state

        monkeypatch.setattr(qmtl_cli._state, "TRANSPORT_FACTORY", _remote.factory)
    return mode


@pytest.fixture(autouse=True)
def _no_leaked_pg_connections(request: pytest.FixtureRequest) -> Any:
    """A PostgreSQL test fails when it leaves a connection open.

    A store that is never disposed (an error path that skips ``close()``) keeps its pooled psycopg
    connections; if a reference cycle holds them, the collector deletes them later inside an
    unrelated test, where ``-W error`` turns psycopg's ResourceWarning into a failure far from the
    cause. Collecting at the end of each PostgreSQL test pins the leak on the test that made it.
    """
    yield
    if request.node.get_closest_marker("postgres") is not None:
        import gc
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gc.collect()
        leaked = [w for w in caught if "was deleted while still open" in str(w.message)]
        if leaked:
            pytest.fail(f"{len(leaked)} PostgreSQL connection(s) left open by this test: a store was not "
                        "disposed (close the service or dispose the store, on error paths too)", pytrace=False)
        for w in caught:  # anything else the collection raised is still the test's warning
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
