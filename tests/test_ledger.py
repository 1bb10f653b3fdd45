"""The ledger's hash chain: appends, the four kinds of tampering, concurrent writers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from qmtl_core import ledger
from qmtl_core.canonical import canonical_json, exact_json_loads
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


# --- The stored bytes are the hashed bytes (schema v8), and no hash ever changed -------------------

#: Payloads covering every JSON value the ledger stores, including the ones a decoder or a database
#: re-spells: an integer beyond 64 bits (orjson reads it as a float), -0.0 and 1e+300 (JSONB writes
#: them as 0.0 and 301 digits), exponents, escapes, non-ASCII and astral characters.
GOLDEN_PAYLOADS: list[dict | None] = [
    None, {},
    {"i": 1, "x": 0.1, "big": 12345678901234567890123, "neg": -0.0, "tiny": 1e-07, "huge": 1e+300},
    {"b": [1, 2.5, None, True, False, "ü\u2028\"\\\n\t\x01\x7f"], "a": {"z": {}, "é": []}, "😀": "ok"},
    {"request_id": "pr-1", "evidence_hash": "ab" * 32,
     "signature": "-----BEGIN SSH SIGNATURE-----\nAAA\n-----END SSH SIGNATURE-----"},
]
#: The chain hashes of those entries as qmtl computed them before payloads were stored as canonical
#: text (625dbf8): changing how entries are stored or verified must not change a single one.
GOLDEN_HASHES = [
    "391d91a36a6d97b54b5e7f10ce00f74a95e4fce899d62cc459605be348053079",
    "f225efcc72bafdac285d2f11cc541f7c2f7b02ddcc48d497880c32292399c14b",
    "600db57a9fe7712c413a8e45a85e0df4de789ac8f2666e22c7520e0ddfd868d0",
    "b8df53577e056ffc666e79640576dbd9a84fee37f93a3e3835d436e8633c8f40",
    "fe32bf41ac3df9caa39c4689d0a49f80aed865c69cf3472a1c4a45a8494e5cc9",
]


def _fill_golden(store_url: str):  # type: ignore[no-untyped-def]
    store = open_store(store_url)
    for i, payload in enumerate(GOLDEN_PAYLOADS):
        with store.write() as conn:
            ledger.append(conn, actor="alice" if i % 2 else 'bøb "q"', kind="test.golden", now=NOW,
                          world=None if i == 2 else "w", subject=None if i == 1 else f"s{i}",
                          reason=None if i == 3 else "r\u00e9ason\n", payload=payload)
    return store


def test_golden_hashes_hold_and_payloads_read_back_exactly(store_url: str) -> None:
    store = _fill_golden(store_url)
    with store.read() as conn:
        rows = ledger.entries(conn)
        result = ledger.verify(conn)
    assert [e.hash for e in rows] == GOLDEN_HASHES
    assert result.ok, result
    # What a reader decodes is exactly what was hashed: the wide integer stays an integer, -0.0 keeps its sign.
    assert [e.payload for e in rows] == GOLDEN_PAYLOADS
    big = rows[2].payload
    assert isinstance(big["big"], int) and math.copysign(1, big["neg"]) == -1
    store.dispose()


def test_payloads_are_stored_as_their_canonical_text(store_url: str) -> None:
    store = _fill_golden(store_url)
    t = schema.ledger
    with store.read() as conn:
        stored = [text for (text,) in conn.execute(sa.select(sa.type_coerce(t.c.payload, sa.Text)).order_by(t.c.seq))]
        rows = ledger.entries(conn)
    assert stored == [None if p is None else canonical_json(p) for p in GOLDEN_PAYLOADS]
    for row, text in zip(rows, stored):
        body_text = ledger.stored_body_text(row.seq, row.ts, row.actor, row.world, row.kind, row.subject,
                                            row.reason, text)
        assert body_text == canonical_json(row.body())
    store.dispose()


def _respell(store, seq: int, text: str | None) -> None:  # type: ignore[no-untyped-def]
    t = schema.ledger
    with as_owner(store) as conn:
        conn.execute(sa.update(t).where(t.c.seq == seq).values(payload=sa.type_coerce(text, sa.Text)))


def test_rows_stored_before_canonical_text_still_verify(store_url: str) -> None:
    """A row written before schema v8 holds its payload as the database spelled it (SQLite: Python's
    default ``json.dumps``, PostgreSQL: JSONB's text); it is checked by decoding and re-encoding."""
    store = _fill(store_url)
    legacy = json.dumps({"i": 2, "x": 0.2})  # '{"i": 2, "x": 0.2}', the old SQLite spelling
    _respell(store, 3, legacy)
    result = _verify(store)
    assert result.ok, result
    _respell(store, 3, json.dumps({"i": 2, "x": 0.25}))  # and an edit in the old spelling is still caught
    result = _verify(store)
    assert not result.ok and result.first_broken_seq == 3 and "edited" in result.problem
    store.dispose()


@pytest.mark.parametrize("text", ["", "not json", '{"i": NaN}', '{"i": Infinity}', '"\\ud800"', "null", "[]"])
def test_unreadable_or_foreign_payload_text_is_an_edited_entry_not_a_crash(store_url: str, text: str) -> None:
    store = _fill(store_url)
    _respell(store, 2, text)
    result = _verify(store)
    assert not result.ok and result.first_broken_seq == 2 and "edited" in result.problem
    store.dispose()


def test_null_payload_cannot_be_replaced_by_empty_text(store_url: str) -> None:
    """An entry with no payload hashes ``"payload":null``; an empty stored text must not pass for it."""
    store = open_store(store_url)
    with store.write() as conn:
        ledger.append(conn, actor="a", kind="k", now=NOW)
    _respell(store, 1, "")
    result = _verify(store)
    assert not result.ok and result.first_broken_seq == 1
    store.dispose()


def test_a_sqlite_column_edited_to_another_type_is_caught(tmp_path: Path) -> None:
    """SQLite stores whatever type it is given: an integer actor or time, a blob payload."""
    store = _fill(f"sqlite:///{tmp_path / 's.db'}")
    t = schema.ledger
    for column, value in (("actor", 7), ("payload", b'{"i":9,"x":0.1}'), ("ts", 20260131)):
        with store.write() as conn:
            before = dict(conn.execute(sa.select(t).where(t.c.seq == 2)).one()._mapping)
            conn.exec_driver_sql(f"UPDATE ledger SET {column} = ? WHERE seq = 2", (value,))
        result = _verify(store)
        assert not result.ok and result.first_broken_seq == 2, (column, result)
        with store.write() as conn:
            conn.execute(sa.delete(t).where(t.c.seq == 2))
            conn.execute(sa.insert(t).values(**before))
        assert _verify(store).ok
    store.dispose()


ASCII_AND_MORE = st.text(st.characters(codec="utf-8"), max_size=12)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | ASCII_AND_MORE,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ASCII_AND_MORE, inner, max_size=4),
    max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(seq=st.integers(min_value=1, max_value=2**62), ts=ASCII_AND_MORE, actor=ASCII_AND_MORE,
       world=st.none() | ASCII_AND_MORE, kind=ASCII_AND_MORE, subject=st.none() | ASCII_AND_MORE,
       reason=st.none() | ASCII_AND_MORE, payload=st.none() | st.dictionaries(ASCII_AND_MORE, JSON_VALUES, max_size=5))
def test_body_text_built_around_the_stored_payload_is_the_canonical_json(
        seq: int, ts: str, actor: str, world: str | None, kind: str, subject: str | None, reason: str | None,
        payload: dict | None) -> None:
    """``verify`` hashes the stored payload text inside a body it spells itself; for every value the
    ledger can hold, that is byte for byte what ``append`` hashed, and the text reads back exactly."""
    body = {"seq": seq, "ts": ts, "actor": actor, "world": world, "kind": kind, "subject": subject,
            "reason": reason, "payload": payload}
    payload_text = None if payload is None else canonical_json(payload)
    assert ledger.stored_body_text(seq, ts, actor, world, kind, subject, reason, payload_text) == canonical_json(body)
    if payload_text is not None:
        assert canonical_json(exact_json_loads(payload_text)) == payload_text


@pytest.mark.postgres
def test_a_v7_postgres_ledger_in_jsonb_is_migrated_and_still_verifies(pg_cluster) -> None:  # type: ignore[no-untyped-def]
    """Up to schema v7 PostgreSQL kept payloads as JSONB, which re-spells them; v8 turns the column
    into text without touching a row (the append-only trigger stays on), old rows verify by
    decoding and re-encoding, new ones straight from their bytes."""
    url = pg_cluster.new_database()
    store = _fill(url, 4)
    with store.write() as conn:  # back to the v7 layout, as an older qmtl left it
        conn.exec_driver_sql("ALTER TABLE ledger ALTER COLUMN payload TYPE JSONB USING payload::jsonb")
        conn.execute(sa.delete(schema.schema_version).where(schema.schema_version.c.version >= 8))
    store.dispose()
    store = open_store(url)
    t = schema.ledger
    with store.read() as conn:
        kind = conn.exec_driver_sql("SELECT data_type FROM information_schema.columns "
                                    "WHERE table_name = 'ledger' AND column_name = 'payload'").scalar()
        old = conn.execute(sa.select(sa.type_coerce(t.c.payload, sa.Text)).where(t.c.seq == 2)).scalar()
    assert kind == "text" and old == '{"i": 1, "x": 0.1}'  # JSONB's spelling, kept
    with store.write() as conn:
        ledger.append(conn, actor="bob", kind="test.event", now=NOW, payload={"i": 5, "x": 0.5})
    result = _verify(store)
    assert result.ok and result.entries == 5, result
    with as_owner(store) as conn:
        conn.execute(sa.update(t).where(t.c.seq == 2).values(payload=sa.type_coerce('{"i": 1, "x": 0.2}', sa.Text)))
    assert _verify(store).first_broken_seq == 2
    store.dispose()


def test_append_many_writes_the_chain_one_append_at_a_time_would(store_url: str, tmp_path: Path) -> None:
    """The loop's batched writes (``append_many``) leave the very bytes and hashes of single appends."""
    one_by_one = _fill(store_url, 2)
    batched = _fill(f"sqlite:///{tmp_path / 'batched.db'}", 2)
    drafts = [ledger.Draft("test.batch", "w", f"b{i}", None if i % 2 else f"why {i}",
                           None if i == 1 else {"i": i, "nested": {"x": [0.5, None, "é"]}}) for i in range(4)]
    with one_by_one.write() as conn:
        singles = [ledger.append(conn, actor="bob", kind=d.kind, now=NOW, world=d.world, subject=d.subject,
                                 reason=d.reason, payload=d.payload) for d in drafts]
    with batched.write() as conn:
        assert ledger.append_many(conn, [], actor="bob", now=NOW) == []
        many = ledger.append_many(conn, drafts, actor="bob", now=NOW)
    assert many == singles and [e.seq for e in many] == [3, 4, 5, 6]
    for store in (one_by_one, batched):
        with store.read() as conn:
            assert [e.hash for e in ledger.entries(conn)][2:] == [e.hash for e in singles]
            assert ledger.verify(conn).ok and ledger.verify(conn).head_seq == 6
        with store.write() as conn:  # the head moved with the batch: the next append chains on
            assert ledger.append(conn, actor="c", kind="test.after", now=NOW).prev_hash == singles[-1].hash
        store.dispose()
