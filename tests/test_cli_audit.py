"""``qmtl audit log`` and ``qmtl audit verify`` on both backends, in-process and as a subprocess."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
import sqlalchemy as sa

from qmtl_core import ledger
from qmtl_core.store import open_store, schema
from tests._tamper import as_owner
from tests.cli_helpers import qmtl, qmtl_process

pytestmark = pytest.mark.usefixtures("cli_mode")


@pytest.fixture
def filled(store_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("QMTL_DATABASE_URL", store_url)
    store = open_store(store_url)
    for i, world in enumerate(["alpha", "beta", "alpha"]):
        with store.write() as conn:
            ledger.append(conn, actor="alice", kind=f"test.k{i}", world=world, subject=f"s{i}",
                          reason="r", now=datetime(2026, 1, 10 + i, tzinfo=timezone.utc))
    store.dispose()
    return store_url


def test_audit_log_json_and_filters(filled: str) -> None:
    doc = qmtl("audit", "log", "--json").json()
    assert [e["seq"] for e in doc["entries"]] == [1, 2, 3]
    assert set(doc["entries"][0]) >= {"seq", "ts", "actor", "world", "kind", "subject", "reason",
                                     "hash", "prev_hash"}
    assert [e["seq"] for e in qmtl("--json", "audit", "log", "--world", "alpha").json()["entries"]] == [1, 3]
    since = qmtl("audit", "log", "--since", "2026-01-11T00:00Z", "--json").json()["entries"]
    assert [e["seq"] for e in since] == [2, 3]
    human = qmtl("audit", "log")
    assert human.exit_code == 0 and "test.k1" in human.stdout


def test_audit_log_rejects_naive_since(filled: str) -> None:
    ran = qmtl("audit", "log", "--since", "2026-01-11T00:00")
    assert ran.exit_code == 2 and "time zone" in ran.stderr


def test_audit_verify_ok_then_tampered(filled: str) -> None:
    ok = qmtl("audit", "verify", "--json")
    assert ok.exit_code == 0 and ok.json()["ok"] is True and ok.json()["entries"] == 3
    store = open_store(filled)
    with as_owner(store) as conn:
        conn.execute(sa.update(schema.ledger).where(schema.ledger.c.seq == 2).values(actor="mallory"))
    store.dispose()
    bad = qmtl_process("audit", "verify")
    assert bad.exit_code == 4
    assert "entry 2" in bad.stderr and bad.stderr.count("\n") == 1
    doc = qmtl("audit", "verify", "--json")
    assert doc.exit_code == 4 and doc.json()["details"]["first_broken_seq"] == 2
