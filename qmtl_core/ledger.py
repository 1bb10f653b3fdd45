"""The audit ledger: an append-only, hash-chained record of every state change.

``hash = sha256(prev_hash + canonical JSON of the entry)``, where the entry is
``{seq, ts, actor, world, kind, subject, reason, payload}``. ``seq`` counts from 1 without gaps and
the ``ledger_head`` row holds the tail, so an edited, deleted, inserted or reordered row (including
a deleted last row) breaks verification at the first affected entry.
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from qmtl_core.canonical import canonical_json, exact_json_loads, sha256_hex
from qmtl_core.store import locks, schema
from qmtl_core.timeutil import iso

GENESIS_HASH = "0" * 64
_HEAD_ID = 1

# The append's statements, built once (SQLAlchemy neither builds nor keys them again per entry).
_LOCKED_HEAD = (sa.select(schema.ledger_head.c.seq, schema.ledger_head.c.hash)
                .where(schema.ledger_head.c.id == _HEAD_ID).with_for_update())
_INSERT = sa.insert(schema.ledger)
_MOVE_HEAD = (sa.update(schema.ledger_head).where(schema.ledger_head.c.id == _HEAD_ID)
              .values(seq=sa.bindparam("head_seq"), hash=sa.bindparam("head_hash")))
# PostgreSQL: the insert and the head's move in one round trip while the head is held, not two.
_INSERT_AND_MOVE_HEAD = _MOVE_HEAD.add_cte(sa.insert(schema.ledger).values(
    {c: sa.bindparam(c.name, type_=c.type) for c in schema.ledger.c}).cte("appended"))


@dataclass(frozen=True)
class LedgerEntry:
    """One ledger row."""

    seq: int
    ts: str
    actor: str
    world: str | None
    kind: str
    subject: str | None
    reason: str | None
    payload: dict[str, Any] | None
    prev_hash: str
    hash: str

    def body(self) -> dict[str, Any]:
        """The hashed part of the entry."""
        return {"seq": self.seq, "ts": self.ts, "actor": self.actor, "world": self.world,
                "kind": self.kind, "subject": self.subject, "reason": self.reason,
                "payload": self.payload}

    def to_dict(self) -> dict[str, Any]:
        """JSON form for ``qmtl audit log --json``."""
        return {**self.body(), "prev_hash": self.prev_hash, "hash": self.hash}


def entry_hash(prev_hash: str, body: dict[str, Any]) -> str:
    """The chain hash of an entry given its predecessor's hash."""
    return sha256_hex(prev_hash + canonical_json(body))


def _lock_head(conn: Connection) -> tuple[int, str]:
    """Lock the chain's tail for this transaction (FOR UPDATE on PostgreSQL; SQLite's writer
    lock is already held by BEGIN IMMEDIATE) and return ``(seq, hash)``."""
    head = schema.ledger_head
    row = conn.execute(_LOCKED_HEAD).first()
    if row is not None:
        return int(row.seq), str(row.hash)
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql  # loaded with the dialect in use; SQLite never needs it

        stmt = postgresql.insert(head).values(id=_HEAD_ID, seq=0, hash=GENESIS_HASH)
        conn.execute(stmt.on_conflict_do_nothing(index_elements=["id"]))
    else:
        conn.execute(sa.insert(head).prefix_with("OR IGNORE").values(id=_HEAD_ID, seq=0,
                                                                     hash=GENESIS_HASH))
    row = conn.execute(_LOCKED_HEAD).one()
    return int(row.seq), str(row.hash)


def lock(conn: Connection) -> None:
    """Serialise this write transaction with every other ledger writer, evaluations included.

    Call it first in a transaction that reads state and then appends, so the read cannot go stale
    before the append. It waits for evaluations in flight and keeps new ones out
    (``locks.writers_exclusive``), then holds the head until commit. An evaluation does not call
    it: it takes ``locks.evaluation`` and holds the head only from its append on.
    """
    locks.writers_exclusive(conn)
    _lock_head(conn)


def append(conn: Connection, *, actor: str, kind: str, now: datetime, world: str | None = None,
           subject: str | None = None, reason: str | None = None,
           payload: dict[str, Any] | None = None) -> LedgerEntry:
    """Append one entry inside the caller's write transaction and return it."""
    seq, prev_hash = _lock_head(conn)
    body_payload = None if payload is None else _json_roundtrip(payload)
    entry_body = {"seq": seq + 1, "ts": iso(now), "actor": actor, "world": world, "kind": kind,
                  "subject": subject, "reason": reason, "payload": body_payload}
    digest = entry_hash(prev_hash, entry_body)
    row = {"seq": seq + 1, "ts": entry_body["ts"], "actor": actor, "world_id": world, "kind": kind,
           "subject": subject, "reason": reason, "payload": body_payload, "prev_hash": prev_hash, "hash": digest}
    moved = {"head_seq": seq + 1, "head_hash": digest}
    if conn.dialect.name == "postgresql":
        conn.execute(_INSERT_AND_MOVE_HEAD, {**row, **moved})
    else:
        conn.execute(_INSERT, row)
        conn.execute(_MOVE_HEAD, moved)
    return LedgerEntry(seq + 1, entry_body["ts"], actor, world, kind, subject, reason,
                       body_payload, prev_hash, digest)


def _json_roundtrip(payload: dict[str, Any]) -> dict[str, Any]:
    # What is hashed must be exactly what a reader gets back from the database.
    return json.loads(canonical_json(payload))


class Draft(NamedTuple):
    """An entry for ``append_many``: what ``append`` takes besides the actor and the time."""

    kind: str
    world: str | None = None
    subject: str | None = None
    reason: str | None = None
    payload: dict[str, Any] | None = None


def append_many(conn: Connection, drafts: Sequence[Draft], *, actor: str, now: datetime) -> list[LedgerEntry]:
    """``append`` for several entries, in order, inside the caller's write transaction: the same chain
    and the same bytes as appending them one by one, with the head read once, the entries inserted
    in one statement and the head moved once (the campaign loop writes hundreds in a pass)."""
    if not drafts:
        return []
    seq, prev_hash = _lock_head(conn)
    ts = iso(now)
    rows: list[dict[str, Any]] = []
    out: list[LedgerEntry] = []
    for draft in drafts:
        seq += 1
        body_payload = None if draft.payload is None else _json_roundtrip(draft.payload)
        body = {"seq": seq, "ts": ts, "actor": actor, "world": draft.world, "kind": draft.kind,
                "subject": draft.subject, "reason": draft.reason, "payload": body_payload}
        digest = entry_hash(prev_hash, body)
        rows.append(dict(seq=seq, ts=ts, actor=actor, world_id=draft.world, kind=draft.kind, subject=draft.subject,
                         reason=draft.reason, payload=body_payload, prev_hash=prev_hash, hash=digest))
        out.append(LedgerEntry(seq, ts, actor, draft.world, draft.kind, draft.subject, draft.reason,
                               body_payload, prev_hash, digest))
        prev_hash = digest
    conn.execute(sa.insert(schema.ledger), rows)
    conn.execute(sa.update(schema.ledger_head).where(schema.ledger_head.c.id == _HEAD_ID)
                 .values(seq=seq, hash=prev_hash))
    return out


def _row_to_entry(row: Any) -> LedgerEntry:
    return LedgerEntry(int(row.seq), row.ts, row.actor, row.world_id, row.kind, row.subject,
                       row.reason, row.payload, row.prev_hash, row.hash)


def entries(conn: Connection, *, world: str | None = None, since: datetime | None = None,
            kind: str | None = None, limit: int | None = None) -> list[LedgerEntry]:
    """Entries in chain order, optionally filtered; ``limit`` keeps the newest ``limit``."""
    t = schema.ledger
    query = sa.select(t)
    if world is not None:
        query = query.where(t.c.world_id == world)
    if since is not None:
        query = query.where(t.c.ts >= iso(since))
    if kind is not None:
        query = query.where(t.c.kind.like(kind.replace("*", "%")))
    if limit is not None:
        query = query.order_by(t.c.seq.desc()).limit(limit)
        return [_row_to_entry(r) for r in reversed(conn.execute(query).all())]
    return [_row_to_entry(r) for r in conn.execute(query.order_by(t.c.seq))]


@dataclass
class VerifyResult:
    """Outcome of ``verify``: ok, or the first broken entry and what is wrong with it; plus, for each
    anchor (a signed checkpoint's ``(seq, hash)``), whether the chain holds that hash at that seq."""

    ok: bool
    entries: int
    head_seq: int
    first_broken_seq: int | None = None
    problem: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    anchors: list[dict[str, Any]] = field(default_factory=list)
    head_hash: str = GENESIS_HASH

    @property
    def anchors_ok(self) -> bool:
        """Whether every anchor was found in the chain."""
        return all(a["ok"] for a in self.anchors)

    def to_dict(self) -> dict[str, Any]:
        """JSON form for ``qmtl audit verify --json``."""
        return {"ok": self.ok and self.anchors_ok, "entries": self.entries, "head_seq": self.head_seq,
                "head_hash": self.head_hash, "first_broken_seq": self.first_broken_seq, "problem": self.problem,
                **({"details": self.details} if self.details else {}),
                **({"checkpoints": self.anchors} if self.anchors else {})}


def head(conn: Connection) -> tuple[int, str]:
    """The chain's tail as the head row records it: ``(seq, hash)``; ``(0, GENESIS_HASH)`` when empty."""
    row = conn.execute(sa.select(schema.ledger_head.c.seq, schema.ledger_head.c.hash)
                       .where(schema.ledger_head.c.id == _HEAD_ID)).first()
    return (int(row.seq), str(row.hash)) if row else (0, GENESIS_HASH)


#: The string encoder of ``json.dumps(..., ensure_ascii=False)``, i.e. of ``canonical_json``.
_encode_str = encode_basestring


def _str_or_null(value: str | None) -> str:
    return "null" if value is None else _encode_str(value)


def stored_body_text(seq: int, ts: str, actor: str, world: str | None, kind: str, subject: str | None,
                     reason: str | None, payload_text: str | None) -> str:
    """``canonical_json(body)`` built around the payload's stored text, with no decoding.

    It equals the hashed text when the payload is stored canonically (``schema.CanonicalJSON``),
    and the hash then vouches for those very bytes. The layout admits one reading only: every other
    value is a JSON string (whose quotes are escaped), an integer or ``null``, so a payload cannot
    borrow characters from its neighbours.
    """
    return (f'{{"actor":{_encode_str(actor)},"kind":{_encode_str(kind)},'
            f'"payload":{"null" if payload_text is None else payload_text},"reason":{_str_or_null(reason)},'
            f'"seq":{seq},"subject":{_str_or_null(subject)},"ts":{_encode_str(ts)},"world":{_str_or_null(world)}}}')


def _raw_batches(conn: Connection, batch: int = 10_000) -> Iterator[list[Any]]:
    """The chain in seq order, the payload as its stored text, ``batch`` rows at a time."""
    t = schema.ledger
    columns = (t.c.seq, t.c.ts, t.c.actor, t.c.world_id, t.c.kind, t.c.subject, t.c.reason,
               sa.type_coerce(t.c.payload, sa.Text), t.c.prev_hash, t.c.hash)
    last = None
    while True:
        query = sa.select(*columns).order_by(t.c.seq).limit(batch)
        if last is not None:
            query = query.where(t.c.seq > last)
        rows = conn.execute(query).all()
        if not rows:
            return
        yield rows
        last = rows[-1][0]


def _holds(prev_hash: str, row: Any) -> bool:
    """Whether a row's content matches its hash: straight from the stored bytes when the payload is
    stored canonically, else (a row written before schema v8, or edited) by decoding and re-encoding
    it as ``append`` did. Content that cannot even be decoded or encoded does not hold."""
    seq, ts, actor, world, kind, subject, reason, payload_text, _, digest = row
    try:
        text = stored_body_text(seq, ts, actor, world, kind, subject, reason, payload_text)
        if sha256_hex(prev_hash + text) == digest:
            return True
    except (TypeError, ValueError):  # a non-text column value, a lone surrogate
        pass
    try:
        payload = None if payload_text is None else exact_json_loads(payload_text)
        body = {"seq": seq, "ts": ts, "actor": actor, "world": world, "kind": kind, "subject": subject,
                "reason": reason, "payload": payload}
        return entry_hash(prev_hash, body) == digest
    except (TypeError, ValueError):  # invalid JSON, NaN, a value canonical JSON refuses
        return False


def _check_anchor(label: str, seq: int, expected: str, found: str | None) -> dict[str, Any]:
    if found is None:
        problem = (f"the chain has no entry {seq} (it was truncated after the checkpoint was taken)")
    elif found != expected:
        problem = (f"entry {seq} has hash {found[:16]}..., the checkpoint says {expected[:16]}... "
                   "(the chain was rewritten)")
    else:
        problem = None
    return {"checkpoint": label, "seq": seq, "hash": expected, "ok": problem is None, "problem": problem}


def verify(conn: Connection, *, anchors: Mapping[str, tuple[int, str]] | None = None,
           visit: Callable[[LedgerEntry], None] | None = None,
           visit_kinds: Collection[str] | None = None) -> VerifyResult:
    """Walk the chain from the start; stop at the first entry that does not verify.

    ``anchors`` maps a label to a ``(seq, hash)`` the chain must hold (a signed checkpoint's head);
    ``visit`` sees every entry that verified (or only those of ``visit_kinds``), in order, with its
    payload decoded (``audit verify --deep`` rebuilds state from them in the same pass). Payloads of
    other entries are never decoded.
    """
    head_seq, head_hash = head(conn)
    wanted: dict[int, list[tuple[str, str]]] = {}
    for label, (seq, digest) in (anchors or {}).items():
        wanted.setdefault(seq, []).append((label, digest))
    checked = [_check_anchor(label, 0, digest, GENESIS_HASH) for label, digest in wanted.pop(0, [])]
    kinds = None if visit_kinds is None else frozenset(visit_kinds)
    prev_hash = GENESIS_HASH
    expected_seq = 1
    count = 0

    def broken(seq: int, problem: str, details: dict[str, Any] | None = None) -> VerifyResult:
        return VerifyResult(False, count, head_seq, seq, problem, details or {}, checked, head_hash)

    for rows in _raw_batches(conn):
        for row in rows:
            count += 1
            seq, entry_prev, digest = row[0], row[8], row[9]
            if not isinstance(seq, int):
                return broken(expected_seq, f"entry seq {seq!r} is not an integer (the entry was edited)")
            if seq != expected_seq:
                problem = ("an entry is missing before this one (deleted)" if seq > expected_seq
                           else "sequence out of order")
                return broken(expected_seq, problem, {"found_seq": seq})
            if entry_prev != prev_hash:
                return broken(seq, "prev_hash does not match the previous entry "
                                   "(an entry was inserted, deleted or reordered here)")
            if not _holds(prev_hash, row):
                return broken(seq, "content does not match its hash (the entry was edited)")
            if seq in wanted:
                checked.extend(_check_anchor(label, seq, anchor, digest) for label, anchor in wanted.pop(seq))
            if visit is not None and (kinds is None or row[4] in kinds):
                payload = None if row[7] is None else exact_json_loads(row[7])
                visit(LedgerEntry(seq, row[1], row[2], row[3], row[4], row[5], row[6], payload, entry_prev, digest))
            prev_hash = digest
            expected_seq += 1
    for seq, items in sorted(wanted.items()):
        checked.extend(_check_anchor(label, seq, digest, None) for label, digest in items)
    last_seq = expected_seq - 1
    if last_seq != head_seq or prev_hash != head_hash:
        return broken(last_seq + 1, f"the chain ends at {last_seq} but the head says {head_seq} "
                                    "(entries at the end were deleted, or the head was altered)")
    return VerifyResult(True, count, head_seq, anchors=checked, head_hash=head_hash)
