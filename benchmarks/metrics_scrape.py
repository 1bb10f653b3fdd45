"""Benchmark a ``/metrics`` scrape against a fleet: 100 worlds x 1,000 strategies in a SQLite store.

The store is the campaign-tick benchmark's (``campaign_tick.Builder``), plus what a running fleet
adds: every paper and live strategy has been fed bars by ``qmtl run`` (its meta keeps the fed
series, ``--bars`` of them, and the order-gate counts), and the ledger holds ``--ledger`` entries per
strategy (runs recorded, feeds, some blocked promotions).

Measured, in one process and one run (ratios, since absolute times mean little on a shared machine):

- ``reference``: what a scrape costs without the store families: a ``SELECT 1`` on the store (what
  ``/healthz`` proves) plus a fixed-size exposition (the loop and HTTP families for every world,
  20 routes' latency histograms);
- ``cold``: a new process's first collection of the store families (the loop's ``--metrics-file``);
- ``serve``: a long-lived collector reading on every scrape, with nothing fed since the last one
  and with 1 % of the fleet fed since (order-gate counts are re-read only for those);
- ``order-gate counts``: the old way (each strategy's whole meta, fed bars included, decoded in
  Python) against extracting only the counts in SQL;
- ``cached``: a scrape within ``--metrics-max-age`` of the last collection (``qmtl serve``'s default).

    .venv/bin/python benchmarks/metrics_scrape.py [--worlds 100] [--strategies 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from campaign_tick import NOW, build, world_name  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402
from qmtl_core.process import tune_gc  # noqa: E402
from qmtl_core.store import schema  # noqa: E402
from qmtl_core.store.engine import json_loads  # noqa: E402
from qmtl_core.telemetry import HttpMetrics, LoopMetrics, StoreCollector, exposition  # noqa: E402
from qmtl_core.timeutil import iso  # noqa: E402


def add_fleet_history(store: Any, worlds: list[str], bars: int, ledger_per_strategy: int) -> tuple[int, int]:
    """Feeds in the meta of every paper/live strategy, and ledger entries; returns (fed, entries)."""
    stamps = [iso(NOW - timedelta(days=bars - d)) for d in range(bars)]
    closes = [round(100 + d * 0.01, 4) for d in range(bars)]
    fed_doc = {"bars": {"timestamp": stamps, "open": closes, "high": closes, "low": closes, "close": closes,
                        "volume": [1000.0] * bars},
               "runs": {"paper": {"run_id": "paper-from-x", "start": stamps[0]}},
               "orders_blocked": {"domain_dryrun": 3}}
    t, led = schema.strategies, schema.ledger
    fed = seq = 0
    with store.write() as conn:
        rows = conn.execute(sa.select(t.c.world_id, t.c.strategy_id, t.c.stage)).all()
        for world, sid, stage in rows:
            if stage in ("paper", "live"):
                conn.execute(sa.update(t).where(t.c.world_id == world, t.c.strategy_id == sid)
                             .values(meta={"feed": fed_doc}))
                fed += 1
        batch: list[dict[str, Any]] = []
        kinds = ("run.recorded", "strategy.fed", "promotion.blocked")
        for world, sid, _ in rows:
            for k in range(ledger_per_strategy):
                seq += 1
                kind = kinds[k % len(kinds)]
                batch.append(dict(seq=seq, ts=iso(NOW - timedelta(minutes=seq)), actor="bench", world_id=world,
                                  kind=kind, subject=sid,
                                  reason="world_halted, cooldown_active" if kind == "promotion.blocked" else "bench",
                                  payload={"strategy_id": sid}, prev_hash="0" * 64, hash="0" * 64))
                if len(batch) >= 5000:
                    conn.execute(sa.insert(led), batch)
                    batch = []
        if batch:
            conn.execute(sa.insert(led), batch)
    return fed, seq


def whole_meta_blocks(store: Any) -> dict[tuple[str, str], int]:
    """The order-gate family as it was read before: every meta document decoded in Python."""
    t = schema.strategies
    blocked: dict[tuple[str, str], int] = defaultdict(int)
    with store.read() as conn:
        for world, meta in conn.execute(sa.select(t.c.world_id, sa.cast(t.c.meta, sa.Text))
                                        .where(t.c.meta.is_not(None))):
            doc = json_loads(meta) or {}
            for key in ("feed", "shadow_feed"):
                for reason, n in ((doc.get(key) or {}).get("orders_blocked") or {}).items():
                    blocked[(world, reason)] += int(n)
    return dict(blocked)


def sql_blocks(collector: StoreCollector) -> dict[tuple[str, str], int]:
    with collector.store.read() as conn:
        family = list(collector._strategies(conn))[-1]
    return {(s.labels["world"], s.labels["reason"]): int(s.value) for s in family.samples
            if s.name.endswith("_total")}


def store_rows(store: Any) -> list[tuple[str, str, str]]:
    t = schema.strategies
    with store.read() as conn:
        return [tuple(r) for r in conn.execute(sa.select(t.c.world_id, t.c.strategy_id, t.c.stage))]


def touch(store: Any, keys: list[tuple[str, str]], n: int) -> None:
    """Mark ``keys`` updated, as a feed does (``updated_at`` moves)."""
    t = schema.strategies
    with store.write() as conn:
        for world, sid in keys:
            conn.execute(sa.update(t).where(t.c.world_id == world, t.c.strategy_id == sid)
                         .values(updated_at=iso(NOW + timedelta(seconds=n))))


def fixed_registry(worlds: list[str]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    loop, http = LoopMetrics(registry), HttpMetrics(registry)
    for w in worlds:
        loop.observe({"world": w, "status": "executed", "exit_code": 0,
                      "actions": [{"action": "observe", "outcome": "executed", "reason": "x"}]}, NOW)
    for r in range(20):
        for _ in range(5):
            http.observe("GET", f"/route/{r}", 200, 0.01 * r)
    return registry


def best(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, default=100)
    parser.add_argument("--strategies", type=int, default=1000)
    parser.add_argument("--bars", type=int, default=500, help="bars fed per paper/live strategy")
    parser.add_argument("--ledger", type=int, default=5, help="ledger entries per strategy")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    tune_gc()
    with tempfile.TemporaryDirectory() as tmp:
        worlds = [world_name(i) for i in range(args.worlds)]
        t0 = time.perf_counter()
        builder = build(Path(tmp), worlds, args.strategies, n_returns=10)
        fed, entries = add_fleet_history(builder.store, worlds, args.bars, args.ledger)
        print(f"store: {len(worlds)} worlds x {args.strategies} strategies, {fed} fed ({args.bars} bars each), "
              f"{entries} ledger entries; built in {time.perf_counter() - t0:.0f} s")
        store = builder.store
        fixed = fixed_registry(worlds)

        def reference() -> None:
            with store.read() as conn:
                conn.execute(sa.text("SELECT 1")).scalar()
            exposition(fixed)

        def registry_of(collector: StoreCollector) -> CollectorRegistry:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(collector)
            return registry

        def cold() -> None:  # a new process's first scrape (the loop's --metrics-file, a restarted serve)
            exposition(registry_of(StoreCollector(store, lambda: NOW)))

        serve = StoreCollector(store, lambda: NOW)  # one long-lived server, reading on every scrape
        serve_registry = registry_of(serve)
        exposition(serve_registry)
        fed_ids = [(w, sid) for w, sid, stage in store_rows(store) if stage in ("paper", "live")]
        bump = {"n": 0}

        def one_percent_fed() -> None:  # 1 % of the fleet fed since the last scrape
            bump["n"] += 1
            touch(store, fed_ids[bump["n"] % 100::100], bump["n"])
            exposition(serve_registry)

        cached_registry = registry_of(StoreCollector(store, lambda: NOW, max_age=5.0))
        exposition(cached_registry)  # the collection the next scrapes reuse

        assert whole_meta_blocks(store) == sql_blocks(StoreCollector(store, lambda: NOW)), "counts disagree"
        ref = best(reference, args.repeat * 5)
        cold_s = best(cold, args.repeat)
        warm_s = best(lambda: exposition(serve_registry), args.repeat)
        fed_s = best(one_percent_fed, args.repeat)
        old_blocks = best(lambda: whole_meta_blocks(store), args.repeat)
        new_blocks = best(lambda: sql_blocks(StoreCollector(store, lambda: NOW)), args.repeat)
        hit = best(lambda: exposition(cached_registry), args.repeat * 5)
        size = len(exposition(serve_registry))
    print(f"reference (SELECT 1 + fixed exposition of {len(exposition(fixed))} bytes): {ref * 1000:.1f} ms")
    print(f"scrape, cold (a new process; {size} bytes):   {cold_s * 1000:.1f} ms = {cold_s / ref:.1f}x reference")
    print(f"scrape, serve, nothing fed since:          {warm_s * 1000:.1f} ms = {warm_s / ref:.1f}x reference")
    print(f"scrape, serve, 1 % of the fleet fed since: {fed_s * 1000:.1f} ms = {fed_s / ref:.1f}x reference")
    print(f"order-gate counts, whole meta decoded in Python: {old_blocks * 1000:.1f} ms; extracted in SQL: "
          f"{new_blocks * 1000:.1f} ms ({old_blocks / new_blocks:.1f}x)")
    print(f"scrape within --metrics-max-age (cached):  {hit * 1000:.2f} ms = {hit / ref:.2f}x reference")
    print(json.dumps({"reference_s": ref, "cold_s": cold_s, "warm_s": warm_s, "one_percent_fed_s": fed_s,
                      "old_order_gate_s": old_blocks, "sql_order_gate_s": new_blocks, "cached_scrape_s": hit}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
