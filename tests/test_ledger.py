"""The ledger's hash chain: appends, the four kinds of tampering, concurrent writers."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from qmtl_core import ledger
from qmtl_core.store import open_store, schema
from tests._tamper import as_owner

NOW = datetime(2026, 1, 31, tzinfo=timezone.utc)
ROOT = Path(__file__).resolve().parent.parent


def _fill(store_url: str, n: int = 5):
    store = open_store(store_url)
    for i in range(n):
        with store.write() as conn:
            ledger.append(conn, actor="alice", kind="test.event", now=NOW, world="w",
                          subject=f"s{i}", reason=f"because {i}", payload={"i": i, "x": 0.1 * i})
    return store


def test_appends_chain_and_verify(store_url: str) -> None:
    store = _fill(store_url)
    with store.read() as conn:
        rows = ledger.entries(conn)
        result = ledger.verify(conn)
    assert [e.seq for e in rows] == [1, 2, 3, 4, 5]
    assert rows[0].prev_hash == ledger.GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in zip(rows, rows[1:]))
    assert rows[2].hash == ledger.entry_hash(rows[1].hash, rows[2].body())
    assert result.ok and result.entries == 5 and result.head_seq == 5
    store.dispose()


def test_empty_ledger_verifies(store_url: str) -> None:
    store = open_store(store_url)
    with store.read() as conn:
        assert ledger.verify(conn).ok
    store.dispose()


def _verify(store) -> ledger.VerifyResult:  # type: ignore[no-untyped-def]
    with store.read() as conn:
        return ledger.verify(conn)


def test_edited_row_is_caught(store_url: str) -> None:
    store = _fill(store_url)
    with as_owner(store) as conn:
        conn.execute(sa.update(schema.ledger).where(schema.ledger.c.seq == 3)
                     .values(reason="nothing to see"))
    result = _verify(store)
    assert not result.ok and result.first_broken_seq == 3 and "edited" in result.problem
    store.dispose()


def test_edited_payload_is_caught(store_url: str) -> None:
    store = _fill(store_url)
    with as_owner(store) as conn:
        conn.execute(sa.update(schema.ledger).where(schema.ledger.c.seq == 2)
                     .values(payload={"i": 99, "x": 0.1}))
    result = _verify(store)
    assert not result.ok and result.first_broken_seq == 2
    store.dispose()


def test_deleted_row_is_caught(store_url: str) -> None:
    store = _fill(store_url)
    with as_owner(store) as conn:
        conn.execute(sa.delete(schema.ledger).where(schema.ledger.c.seq == 2))
    result = _verify(store)
    assert not result.ok and result.first_broken_seq == 2 and "missing" in result.problem
    store.dispose()


def test_deleted_last_row_is_caught(store_url: str) -> None:
    store = _fill(store_url)
    with as_owner(store) as conn:
        conn.execute(sa.delete(schema.ledger).where(schema.ledger.c.seq == 5))
    result = _verify(store)
    assert not result.ok and result.first_broken_seq == 5
    store.dispose()


def test_inserted_row_is_caught(store_url: str) -> None:
    """A forged row slipped in at seq 3, later rows renumbered to keep seq contiguous."""
    store = _fill(store_url)
    t = schema.ledger
    with as_owner(store) as conn:
        for seq in range(5, 2, -1):
            conn.execute(sa.update(t).where(t.c.seq == seq).values(seq=seq + 1))
        prev = conn.execute(sa.select(t.c.hash).where(t.c.seq == 2)).scalar_one()
        body = {"seq": 3, "ts": "2026-01-31T00:00:00.000000Z", "actor": "mallory", "world": "w",
                "kind": "test.event", "subject": "forged", "reason": "x", "payload": None}
        conn.execute(sa.insert(t).values(seq=3, ts=body["ts"], actor="mallory", world_id="w",
                                         kind="test.event", subject="forged", reason="x",
                                         payload=None, prev_hash=prev,
                                         hash=ledger.entry_hash(prev, body)))
    result = _verify(store)
    # The forged row chains correctly onto 2, so the break shows at the next (renumbered) row.
    assert not result.ok and result.first_broken_seq == 4
    store.dispose()


def test_reordered_rows_are_caught(store_url: str) -> None:
    store = _fill(store_url)
    t = schema.ledger
    with as_owner(store) as conn:
        conn.execute(sa.update(t).where(t.c.seq == 2).values(seq=-2))
        conn.execute(sa.update(t).where(t.c.seq == 3).values(seq=2))
        conn.execute(sa.update(t).where(t.c.seq == -2).values(seq=3))
    result = _verify(store)
    assert not result.ok and result.first_broken_seq == 2
    store.dispose()


WRITER = """
import sys
from datetime import datetime, timezone
from qmtl_core import ledger
from qmtl_core.store import Store
store = Store(sys.argv[1])
for i in range(int(sys.argv[3])):
    with store.write() as conn:
        ledger.append(conn, actor=f"writer-{sys.argv[2]}", kind="test.concurrent",
                      now=datetime.now(timezone.utc), payload={"i": i})
store.dispose()
"""


def test_concurrent_writers_never_fork_the_chain(store_url: str) -> None:
    open_store(store_url).dispose()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, store_url, str(w), "15"], cwd=ROOT)
             for w in range(8)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 8
    store = open_store(store_url)
    with store.read() as conn:
        result = ledger.verify(conn)
        rows = ledger.entries(conn)
    assert result.ok, result
    assert len(rows) == 120 and [e.seq for e in rows] == list(range(1, 121))
    assert {e.actor for e in rows} == {f"writer-{w}" for w in range(8)}
    store.dispose()


def test_entries_filters(store_url: str) -> None:
    store = _fill(store_url, 3)
    with store.write() as conn:
        ledger.append(conn, actor="bob", kind="policy.changed", now=datetime(2026, 3, 1, tzinfo=timezone.utc),
                      world="other")
    with store.read() as conn:
        assert [e.seq for e in ledger.entries(conn, world="other")] == [4]
        assert [e.seq for e in ledger.entries(conn, kind="policy.*")] == [4]
        assert [e.seq for e in ledger.entries(conn, since=datetime(2026, 2, 1, tzinfo=timezone.utc))] == [4]
        assert [e.seq for e in ledger.entries(conn, limit=2)] == [3, 4]
    store.dispose()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_payload_is_refused(store_url: str, value: float) -> None:
    store = open_store(store_url)
    with pytest.raises(ValueError):
        with store.write() as conn:
            ledger.append(conn, actor="a", kind="k", now=NOW, payload={"v": value})
    with store.read() as conn:
        assert ledger.entries(conn) == []
    store.dispose()
