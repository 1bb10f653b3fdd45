"""Benchmark ``qmtl audit verify`` (plain and ``--deep``) over a 100,000-entry ledger in SQLite.

The ledger is made of realistic entries: evaluations (``run.recorded``), approvals with their
approvals-table rows, activation changes carrying their whole set, halts and tokens, so ``--deep``
has every kind of state to rebuild. It is written directly in batches (the chain hashed exactly as
``ledger.append`` does) so that building it does not dominate the run.

Prints the seconds for plain and deep verification, whether the goal (< 10 s each) is met, and the
ratio against a reference measured in the same run: hashing the same canonical entry bytes with
``hashlib.sha256`` in a loop, with no database (the floor any verifier of this chain must pay).
Then every payload is re-spelled the way a store before schema 8 holds it (Python's default
``json.dumps``), which verify checks by decoding and re-encoding, and plain verify is timed again.

    .venv/bin/python benchmarks/audit_verify.py [--entries 100000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from qmtl_core import ledger  # noqa: E402
from qmtl_core.audit import verify_store  # noqa: E402
from qmtl_core.canonical import canonical_json  # noqa: E402
from qmtl_core.store import open_store, schema  # noqa: E402
from qmtl_core.timeutil import iso  # noqa: E402

GOAL_SECONDS = 10.0
WORLDS = 20
STRATEGIES = 50


def _hex(label: str) -> str:
    """A realistic hash (random-looking hex, as every etag and evidence hash is)."""
    return hashlib.sha256(label.encode()).hexdigest()


def _entry(seq: int, at: datetime) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The body of entry ``seq`` and, for an approval, the approvals row that goes with it."""
    world = f"w{seq % WORLDS}"
    sid = f"s{seq % STRATEGIES}"
    kind_pick = seq % 50
    row = None
    if kind_pick == 0:
        version = seq // 50
        activations = [{"strategy_id": f"s{i}", "stage": "live" if i % 5 == 0 else "paper", "weight": 0.02,
                        "run_id": f"r{i}", "etag": _hex(f"a{i}"), "activated_at": iso(at)} for i in range(STRATEGIES)]
        kind, payload = "world.rollback", {"set_version": version, "set_etag": _hex(f"set{version}"), "changed": {},
                                           "activations": activations}
        world = "wset"
    elif kind_pick == 1:
        request = f"pr-{seq}"
        kind, payload = "promotion.approved", {"request_id": request, "evidence_hash": _hex(f"e{seq}")}
        row = {"request_id": request, "approver": "alice", "decision": "approve", "reason": "ok",
               "evidence_hash": _hex(f"e{seq}"), "created_at": iso(at), "ledger_seq": seq}
    else:
        kind, payload = "run.recorded", {"run_id": f"run-{seq}", "revision": 1, "status": "pass",
                                         "metrics": {"sharpe": 1.0 + seq % 7 / 10, "max_drawdown": 0.1},
                                         "content_hash": _hex(f"c{seq}")}
    body = {"seq": seq, "ts": iso(at), "actor": "alice" if row is not None else "bench", "world": world, "kind": kind, "subject": sid,
            "reason": "benchmark", "payload": payload}
    return body, row


def build(url: str, n: int) -> list[str]:
    """Write ``n`` chained entries (and the matching decision-table rows); return the canonical bytes
    hashed per entry, for the reference."""
    store = open_store(url)
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    prev = ledger.GENESIS_HASH
    texts: list[str] = []
    batch: list[dict[str, Any]] = []
    approvals: list[dict[str, Any]] = []
    sets: list[dict[str, Any]] = []
    acts: list[dict[str, Any]] = []
    with store.write() as conn:
        for seq in range(1, n + 1):
            body, approval = _entry(seq, t0 + timedelta(seconds=seq))
            text = prev + canonical_json(body)
            texts.append(text)
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
            batch.append({"seq": seq, "ts": body["ts"], "actor": body["actor"], "world_id": body["world"],
                          "kind": body["kind"], "subject": body["subject"], "reason": body["reason"],
                          "payload": body["payload"], "prev_hash": prev, "hash": digest})
            prev = digest
            if approval is not None:
                conn.execute(sa.insert(schema.promotion_requests).values(
                    request_id=approval["request_id"], world_id=body["world"], strategy_id=body["subject"],
                    evidence_hash=approval["evidence_hash"], evidence={}, requester="carol", status="pending",
                    created_at=body["ts"]))
                approvals.append(approval)
            if body["kind"] == "world.rollback":
                p = body["payload"]
                sets.append({"world_id": "wset", "set_version": p["set_version"], "created_at": body["ts"],
                             "created_by": "bench", "reason": "benchmark", "etag": p["set_etag"]})
                acts.extend({"world_id": "wset", "set_version": p["set_version"], **a} for a in p["activations"])
            if len(batch) >= 5000:
                conn.execute(sa.insert(schema.ledger), batch)
                batch.clear()
        if batch:
            conn.execute(sa.insert(schema.ledger), batch)
        conn.execute(sa.insert(schema.approvals), approvals)
        conn.execute(sa.insert(schema.activation_sets), sets)
        conn.execute(sa.insert(schema.activations), acts)
        conn.execute(sa.insert(schema.ledger_head).values(id=1, seq=n, hash=prev))
    store.dispose()
    return texts


def reference(texts: list[str]) -> float:
    """Hash every entry's bytes with hashlib, no database."""
    t0 = time.perf_counter()
    for text in texts:
        hashlib.sha256(text.encode("utf-8")).hexdigest()
    return time.perf_counter() - t0


def measure(url: str, *, deep: bool) -> float:
    store = open_store(url)
    t0 = time.perf_counter()
    with store.read() as conn:
        result = verify_store(conn, deep=deep)
    elapsed = time.perf_counter() - t0
    store.dispose()
    assert result.ok, (result.chain.problem, [d.line() for d in result.differences[:3]])
    return elapsed


def respell_as_before_schema_8(url: str) -> None:
    """Rewrite every payload in the spelling of a store written before schema 8."""
    store = open_store(url)
    t = schema.ledger
    with store.write() as conn:
        rows = conn.execute(sa.select(t.c.seq, t.c.payload)).all()
        conn.execute(sa.update(t).where(t.c.seq == sa.bindparam("s")).values(payload=sa.bindparam("p", type_=sa.Text)),
                     [{"s": seq, "p": json.dumps(payload)} for seq, payload in rows])
    store.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        t0 = time.perf_counter()
        texts = build(url, args.entries)
        print(f"built {args.entries:,} entries in {time.perf_counter() - t0:.1f} s")
        ref = statistics.median(reference(texts) for _ in range(args.repeat))
        plain = statistics.median(measure(url, deep=False) for _ in range(args.repeat))
        deep = statistics.median(measure(url, deep=True) for _ in range(args.repeat))
        respell_as_before_schema_8(url)
        legacy = statistics.median(measure(url, deep=False) for _ in range(args.repeat))
    print(f"reference (hashlib over the same bytes): {ref:.3f} s")
    for name, seconds in (("verify", plain), ("verify --deep", deep), ("verify, pre-v8 rows", legacy)):
        verdict = "met" if seconds < GOAL_SECONDS else "NOT met"
        print(f"{name:<20} {seconds:6.2f} s  ({args.entries / seconds:,.0f} entries/s, {seconds / ref:.1f}x the "
              f"reference; goal < {GOAL_SECONDS:g} s: {verdict})")


if __name__ == "__main__":
    main()
