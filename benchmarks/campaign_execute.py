"""Benchmark `campaign-loop --execute`: actions executed per second, on SQLite and on PostgreSQL.

The store is the campaign tick benchmark's (`benchmarks/campaign_tick.py`'s `Builder`: worlds of
1,000 strategies bulk-inserted, runs, heads, a risk snapshot and the activation set of its paper
and live strategies per world), with a mix in which
about 10 % of the strategies are due for an action: 8 % ready to promote to paper, 1 % gated under
an older policy version and 1 % in paper whose snapshot holds a day their run has not seen (both
re-evaluated). The rest wait (paper windows still open, live strategies monitored) and a few are
blocked (each block is written to the ledger once, as the loop does on its first pass).

Measured: one pass of the loop over every world, executing, exactly as `qmtl world campaign-loop
--once --execute` runs it (`WorldService.campaign_iteration`: per world the lease, tick, every due
action in its own write transaction with its idempotency key and ledger entries, further rounds
until nothing is due, then the blocks). The same pass on a second store measures the plan alone
(`--once` without `--execute`), the reference for what executing adds. The ledger is verified after
the run. Goal: at least 300 actions/s on SQLite; PostgreSQL is reported beside it.

    .venv/bin/python benchmarks/campaign_execute.py [--worlds 100] [--strategies 1000] [--no-postgres]
    [--profile N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from _timing import timed  # noqa: E402
from campaign_tick import Builder, world_name  # noqa: E402  (the tick benchmark's store)
from qmtl_core import ledger, risk  # noqa: E402
from qmtl_core.process import tune_gc  # noqa: E402
from qmtl_core.service import WorldService, _campaign, _service  # noqa: E402

GOAL = 300.0
#: (share of a world, stage, kind) as in campaign_tick.KINDS: 10 % due for an action.
DUE_MIX = (
    (0.08, "backtest", "ready"),        # -> promote_to_paper
    (0.01, "backtest", "old_policy"),   # -> evaluate (policy_changed)
    (0.01, "paper", "paper_new"),       # -> evaluate (new data in the snapshot)
    (0.02, "backtest", "failing"),      # -> blocked (written once)
    (0.01, "backtest", "short"),        # -> blocked (written once)
    (0.37, "paper", "paper_short"),     # -> observe (window still open)
    (0.50, "live", "live"),             # -> observe (live monitoring)
)


def build(root: Path, worlds: list[str], per_world: int, url: str | None = None) -> Builder:
    builder = Builder(root, n_returns=10, kinds=DUE_MIX, url=url, activations=True)
    for world in worlds:
        builder.add_world(world, per_world)
    return builder


#: The loop's steps timed separately (the rest is policy loading, leases and notifications).
PHASES = ("load_state", "tick", "execute_promotions", "execute", "record_blocks")


def one_pass(service: WorldService, worlds: list[str], execute: bool,
             phases: dict[str, float] | None = None) -> tuple[float, Counter[str]]:
    """Seconds for one loop pass over ``worlds``, and the actions by outcome (``action:reason`` too)."""
    _service._POLICY_CACHE.clear()  # cold, as a cron `--once` process starts
    risk._VALIDATED.clear()
    outcomes: Counter[str] = Counter()
    real = {name: getattr(_campaign, name) for name in PHASES}
    if phases is not None:
        for name in PHASES:
            setattr(_campaign, name, timed(phases, name, real[name]))
    try:
        start = time.perf_counter()
        results = service.campaign_iteration(worlds, execute=execute, holder="bench",
                                             lease_ttl=timedelta(minutes=10))
        elapsed = time.perf_counter() - start
    finally:
        for name in PHASES:
            setattr(_campaign, name, real[name])
    for world in results:
        if world.status not in ("executed", "planned"):
            raise SystemExit(f"{world.world}: {world.status} {world.error}: {world.message}")
        outcomes.update(doc["outcome"] for doc in world.actions)
        outcomes.update(f"{doc['action']}:{doc['reason']}" for doc in world.actions)
    return elapsed, outcomes


def measure(label: str, make_url: Any, worlds: list[str], per_world: int, profile: int) -> tuple[float, bool]:
    """Build two identical stores; time the plan on one and the execution on the other."""
    with tempfile.TemporaryDirectory(prefix="qmtl-exec-bench-") as tmp:
        t0 = time.perf_counter()
        planned_store = build(Path(tmp) / "plan", worlds, per_world, make_url("plan"))
        executed_store = build(Path(tmp) / "exec", worlds, per_world, make_url("exec"))
        built = time.perf_counter() - t0
        plan_seconds, planned = one_pass(planned_store.service(), worlds, execute=False)
        planned = Counter({k: v for k, v in planned.items() if ":" not in k})
        service = executed_store.service()
        phases = dict.fromkeys(PHASES, 0.0)
        if profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            seconds, outcomes = prof.runcall(one_pass, service, worlds, True, phases)
        else:
            seconds, outcomes = one_pass(service, worlds, execute=True, phases=phases)
        with executed_store.store.read() as conn:
            chain = ledger.verify(conn)
        verified = f"{chain.entries} entries verify" if chain.ok else f"BROKEN at {chain.first_broken_seq}: {chain.problem}"
        planned_store.store.dispose()
        executed_store.store.dispose()
    kinds = {k: v for k, v in outcomes.items() if ":" in k}
    outcomes = Counter({k: v for k, v in outcomes.items() if ":" not in k})
    executed = outcomes["executed"]
    rate = executed / seconds
    print(f"{label}: {len(worlds)} worlds x {per_world} strategies (stores built in {built:.1f} s)")
    print(f"  plan only (--once):        {plan_seconds:7.2f} s  {sum(planned.values())} actions planned or reported")
    print(f"  execute (--once --execute): {seconds:6.2f} s  {executed} executed "
          f"({', '.join(f'{k} {v}' for k, v in sorted(outcomes.items()))})")
    print(f"  split: {', '.join(f'{k} {v:.2f} s' for k, v in phases.items())}")
    print(f"  the worlds left: {', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}")
    print(f"  {rate:,.0f} actions/s; the execution took {seconds / plan_seconds:.1f}x the plan-only pass (the "
          f"reference, same run), {(seconds - plan_seconds) / max(executed, 1) * 1000:.2f} ms an action over it; "
          f"ledger: {verified}")
    if profile:
        pstats.Stats(prof).sort_stats("tottime").print_stats(profile)
    return rate, chain.ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, default=100)
    parser.add_argument("--strategies", type=int, default=1000, help="per world")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print the N costliest functions")
    args = parser.parse_args()
    tune_gc()  # the process set up as the CLI sets itself up
    worlds = [world_name(i, "exec") for i in range(args.worlds)]
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} cores")
    rate, ok = measure("SQLite", lambda name: None, worlds, args.strategies, args.profile)
    if not args.no_postgres:
        from tests._pg import PgCluster  # the throwaway cluster the tests use (fsync off, as there)

        cluster = PgCluster().start()
        try:
            ok &= measure("PostgreSQL", lambda name: cluster.new_database(), worlds, args.strategies, args.profile)[1]
        finally:
            cluster.stop()
    verdict = "met" if rate >= GOAL else "NOT met"
    print(f"goal >= {GOAL:.0f} actions/s on SQLite: {verdict} ({rate:,.0f}/s)")
    return 0 if ok else 1  # a missed goal is a finding; a ledger that does not verify is a failure


if __name__ == "__main__":
    raise SystemExit(main())
