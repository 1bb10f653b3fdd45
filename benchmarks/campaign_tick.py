"""Benchmark the campaign tick: 100 worlds x 1,000 strategies in a SQLite store, every world ticked.

The store is built directly (world YAMLs in a temp worlds dir; strategies, evaluation runs, run
revisions and one risk snapshot per world bulk-inserted with SQLAlchemy Core into
``qmtl_core.store.schema``), with a realistic mix: backtest strategies ready to promote, failing,
with too short a window or with no run, runs gated under an older policy version, paper strategies
whose snapshot holds new data, whose window is incomplete or complete, and live ones. 20 % of the
runs have a second revision.

Measured: ``WorldService.campaign_tick(world)`` for every world (policy load + ``load_state`` +
``tick``), i.e. the whole read-only tick the cron loop starts each iteration with; every pass
starts cold (no policy parsed, no snapshot validated: what a cron ``--once`` process meets), in a
process set up as the CLI sets itself up (``qmtl_core.process.tune_gc``). Prints strategies
per second and the split, then two scaling checks on fresh stores:

- linear in strategies: 20 worlds of 250, 500 and 1,000 strategies (time per strategy stays flat);
- flat in history length: the same worlds with 10 and with 2,000 returns stored in every run
  revision (the tick must read neither run revisions nor snapshot documents, only ``run_heads``
  and snapshot summaries; every SQL statement is checked).

Goal: the whole tick over 100 x 1,000 under 5 s on SQLite.

    .venv/bin/python benchmarks/campaign_tick.py [--worlds 100] [--strategies 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy import event

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from _timing import timed  # noqa: E402
from qmtl_core.config import Settings  # noqa: E402
from qmtl_core.policy import load_policy_text  # noqa: E402
from qmtl_core.policy._engine import evaluate_gates  # noqa: E402
from qmtl_core import risk  # noqa: E402
from qmtl_core.process import tune_gc  # noqa: E402
from qmtl_core.risk import parse_snapshot, summarize  # noqa: E402
from qmtl_core.service import WorldService  # noqa: E402
from qmtl_core.service import _campaign, _service  # noqa: E402
from qmtl_core.store import open_store, schema  # noqa: E402
from qmtl_core.timeutil import iso  # noqa: E402

GOAL_SECONDS = 5.0
NOW = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)
POLICY = """\
world: {world}
description: campaign tick benchmark world
policy_version: 2
allow_live: true
periods_per_year: 252
rules:
  - {{id: sharpe, metric: sharpe, min: 0.8, stages: [backtest]}}
  - {{id: drawdown, metric: max_drawdown, max: 0.30}}
  - {{id: trades, metric: n_trades, min: 30, severity: soft, stages: [backtest]}}
  - {{id: history, metric: effective_history_years, min: 2, stages: [backtest]}}
  - {{id: paper_sharpe, metric: sharpe, min: 0.5, stages: [paper, live]}}
  - {{id: tail, metric: cvar_95, max: 0.05, severity: info}}
selection:
  top_k: {{metric: sharpe, k: 5}}
  correlation: {{max: 0.8}}
campaign:
  backtest: {{window: 730d, min_observations: 500}}
  paper: {{window: 30d, min_observations: 20}}
  live: {{monitor_window: 30d}}
governance:
  live_promotion:
    mode: manual_approval
    approvers: [alice, bob, carol]
    required_approvals: 2
risk: {{snapshot_max_age: 15m, decision_ttl: 10m}}
"""
METRICS = ("total_return", "cagr", "annual_volatility", "sharpe", "sortino", "max_drawdown", "calmar",
           "win_rate", "profit_factor", "tail_ratio", "n_observations", "effective_history_years",
           "skew", "kurtosis", "var_95", "cvar_95", "psr", "n_trades")

# Strategy kinds: (share of a world, stage). Each kind leads tick to a different action.
KINDS = (
    (0.30, "backtest", "ready"),          # window and gates satisfied -> promote_to_paper
    (0.05, "backtest", "old_policy"),     # gated under policy_version 1 -> evaluate (policy_changed)
    (0.10, "backtest", "failing"),        # blocking rule fails -> blocked validation_failed
    (0.10, "backtest", "short"),          # 300 days of data -> blocked backtest_window_incomplete
    (0.05, "backtest", "no_run"),         # never measured -> blocked insufficient_data
    (0.10, "paper", "paper_done"),        # 35 days observed, matching the snapshot -> governance
    (0.10, "paper", "paper_short"),       # 12 days observed -> observe window_incomplete
    (0.10, "paper", "paper_new"),         # the snapshot holds a day the run has not seen -> evaluate
    (0.10, "live", "live"),               # observe live_monitoring
)


def world_name(i: int, prefix: str = "bench") -> str:
    return f"{prefix}-{i:03d}"


def _templates(rng: np.random.Generator, passing: bool, stage: str, count: int = 16) -> list[dict[str, Any]]:
    """Metric dicts with the rule results the policy gives them (realistic JSON documents)."""
    policy = load_policy_text(POLICY.format(world="t"))
    out = []
    for _ in range(count):
        m = {name: float(rng.normal(0.5, 0.3)) for name in METRICS}
        m.update(sharpe=float(rng.uniform(0.9, 2.0) if passing else rng.uniform(-0.5, 0.4)),
                 max_drawdown=float(rng.uniform(0.05, 0.25)), n_trades=float(rng.integers(30, 400)),
                 effective_history_years=float(rng.uniform(2.2, 8.0)), cvar_95=float(rng.uniform(0.01, 0.04)))
        gates = evaluate_gates(policy, m, stage=stage)
        out.append({"metrics": m, "status": gates.status, "rule_results": [r.to_dict() for r in gates.rules],
                    "metric_sources": {k: "request.returns" for k in m}})
    return out


class Builder:
    """Bulk-inserts a benchmark store; every row as ``WorldService`` would have written it."""

    def __init__(self, root: Path, n_returns: int, past_runs: int = 0, seed: int = 11,
                 kinds: tuple[tuple[float, str, str], ...] = KINDS, url: str | None = None,
                 activations: bool = False) -> None:
        self.root = root
        self.worlds_dir = root / "worlds"
        self.worlds_dir.mkdir(parents=True, exist_ok=True)
        self.kinds = kinds
        self.activations = activations  # the world's activation set of its paper and live strategies
        self.url = url or f"sqlite:///{root / 'qmtl.db'}"
        self.store = open_store(self.url)
        rng = np.random.default_rng(seed)
        self.tpl = {(p, st): _templates(rng, p, st) for p in (True, False) for st in ("backtest", "paper", "live")}
        start = NOW - timedelta(days=n_returns)
        self.returns = [[iso(start + timedelta(days=d)), round(float(r), 10)]
                        for d, r in enumerate(rng.normal(0.0005, 0.01, n_returns))]
        self.past_runs = past_runs
        self.run_pk = 0
        self.rev_pk = 0
        self.n_strategies = 0

    def add_world(self, world: str, n: int) -> None:
        (self.worlds_dir / f"{world}.yaml").write_text(POLICY.format(world=world))
        strategies, runs, revisions, heads = [], [], [], []
        snap_returns: dict[str, list[dict[str, Any]]] = {}
        weights: list[str] = []
        bounds = np.cumsum([share for share, _, _ in self.kinds]) * n
        kinds = [self.kinds[int(np.searchsorted(bounds, i, side="right"))] for i in range(n)]
        for i, (_, stage, kind) in enumerate(kinds):
            sid = f"{kind}-{i:05d}"
            strategies.append(dict(world_id=world, strategy_id=sid, stage=stage, name=sid,
                                   submitter="bench", submitted_at=iso(NOW - timedelta(days=900)),
                                   updated_at=iso(NOW - timedelta(days=40))))
            if stage == "backtest":
                if kind == "no_run":
                    continue
                days = 300 if kind == "short" else 800
                self._run(runs, revisions, heads, world, sid, "backtest", i, passing=kind != "failing",
                          start=NOW - timedelta(days=days + 60), end=NOW - timedelta(days=60),
                          n_obs=int(days * 252 / 365), policy_version=1 if kind == "old_policy" else 2)
            else:
                self._run(runs, revisions, heads, world, sid, "backtest", i, passing=True,
                          start=NOW - timedelta(days=900), end=NOW - timedelta(days=100), n_obs=550,
                          policy_version=2)
                weights.append(sid)
            if stage == "paper":
                seen = {"paper_done": 35, "paper_short": 12, "paper_new": 24}[kind]
                points = seen + (1 if kind == "paper_new" else 0)
                series = [NOW - timedelta(days=points - d, minutes=30) for d in range(points)]
                snap_returns[sid] = [{"ts": iso(t), "r": 0.001 * ((d % 5) - 1.5)} for d, t in enumerate(series)]
                self._run(runs, revisions, heads, world, sid, "paper", i, passing=True, start=series[0],
                          end=series[seen - 1], n_obs=seen, policy_version=2)
            elif stage == "live":
                self._run(runs, revisions, heads, world, sid, "paper", i, passing=True,
                          start=NOW - timedelta(days=90), end=NOW - timedelta(days=55), n_obs=35,
                          policy_version=2)
                self._run(runs, revisions, heads, world, sid, "live", i, passing=True,
                          start=NOW - timedelta(days=50), end=NOW - timedelta(days=1), n_obs=50,
                          policy_version=2)
        snapshot = parse_snapshot({
            "world_id": world, "version": f"{world}-v1", "as_of": iso(NOW - timedelta(minutes=5)),
            "ttl_sec": 900, "weights": {sid: 1.0 / len(weights) for sid in weights},
            "realized_returns": snap_returns, "provenance": {"actor": "risk-engine", "stage": "paper"}})
        with self.store.write() as conn:
            conn.execute(sa.insert(schema.worlds).values(world_id=world, created_at=iso(NOW), halted=False))
            self._bulk(conn, schema.strategies, strategies)
            if self.activations:
                self._activation_set(conn, world, strategies)
            self._bulk(conn, schema.evaluation_runs, runs)
            self._bulk(conn, schema.run_revisions, revisions)
            self._bulk(conn, schema.run_heads, heads)
            conn.execute(sa.insert(schema.risk_snapshots).values(
                world_id=world, version=snapshot.version, as_of=iso(snapshot.as_of), ttl_sec=snapshot.ttl_sec,
                content_hash=snapshot.content_hash, document=snapshot.canonical(), summary=summarize(snapshot),
                recorded_at=iso(NOW - timedelta(minutes=4)), recorded_by="bench",
                stage="paper", evidence_class="hub"))  # as a trusted producer's paper snapshot is stored
            if conn.dialect.name == "postgresql":  # ids were given: move the sequences past them
                for table in ("evaluation_runs", "run_revisions"):
                    conn.execute(sa.text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                         f"(SELECT max(id) FROM {table}))"))
        self.n_strategies += n

    def _run(self, runs: list[dict[str, Any]], revisions: list[dict[str, Any]], heads: list[dict[str, Any]],
             world: str, sid: str, stage: str, i: int, *, passing: bool, start: datetime, end: datetime, n_obs: int,
             policy_version: int) -> None:
        # ``past_runs`` earlier runs of the same stage (one a day before, as a daily loop leaves
        # them), then the current one; the tick must act on the current one only.
        tpls = self.tpl[(passing, stage)]
        for back in range(self.past_runs, -1, -1):
            self.run_pk += 1
            n_revs = 2 if i % 5 == 0 else 1
            at = end - timedelta(days=back)
            run_id = f"{stage}-{at:%Y%m%dT%H%M%S}Z"
            runs.append(dict(id=self.run_pk, world_id=world, strategy_id=sid, stage=stage, run_id=run_id,
                             latest_revision=n_revs, created_at=iso(at), updated_at=iso(at)))
            for rev in range(1, n_revs + 1):
                self.rev_pk += 1
                tpl = tpls[(i + rev + back) % len(tpls)]
                if back == 0 and rev == n_revs:  # the head record_run keeps: latest revision of the latest run
                    heads.append(dict(
                        world_id=world, strategy_id=sid, stage=stage, run_pk=self.run_pk, run_id=run_id,
                        revision=rev, status=tpl["status"], policy_version=policy_version,
                        content_hash=hashlib.sha256(f"{self.rev_pk}".encode()).hexdigest(),
                        window_start=iso(start), window_end=iso(at), n_observations=max(n_obs - back, 1),
                        metrics=tpl["metrics"], rule_results=tpl["rule_results"], updated_at=iso(at)))
                revisions.append(dict(
                    id=self.rev_pk, run_pk=self.run_pk, revision=rev, status=tpl["status"],
                    policy_version=policy_version, policy_hash="0" * 64, metrics=tpl["metrics"],
                    metric_sources=tpl["metric_sources"], rule_results=tpl["rule_results"],
                    window={"start": iso(start), "end": iso(at), "n_observations": max(n_obs - back, 1),
                            "source": "request.returns"},
                    returns=self.returns, reason="bench",
                    content_hash=hashlib.sha256(f"{self.rev_pk}".encode()).hexdigest(),
                    recorded_at=iso(at), recorded_by="bench"))

    @staticmethod
    def _activation_set(conn: Any, world: str, strategies: list[dict[str, Any]]) -> None:
        """Set version 1: every paper and live strategy active, as the promotions left it."""
        active = [s for s in strategies if s["stage"] != "backtest"]
        at = iso(NOW - timedelta(days=40))
        conn.execute(sa.insert(schema.activation_sets).values(world_id=world, set_version=1, created_at=at,
                                                              created_by="bench", reason="bench", etag="0" * 64))
        Builder._bulk(conn, schema.activations, [
            dict(world_id=world, set_version=1, strategy_id=s["strategy_id"], stage=s["stage"],
                 weight=1.0 / len(active), run_id=None, etag=hashlib.sha256(s["strategy_id"].encode()).hexdigest(),
                 activated_at=at) for s in active])

    @staticmethod
    def _bulk(conn: Any, table: sa.Table, rows: list[dict[str, Any]], chunk: int = 2000) -> None:
        for k in range(0, len(rows), chunk):
            conn.execute(sa.insert(table), rows[k:k + chunk])

    def service(self) -> WorldService:
        settings = Settings(home=self.root, worlds_dir=self.worlds_dir, database_url=self.url)
        return WorldService(settings, store=self.store, clock=lambda: NOW)


def build(root: Path, worlds: list[str], per_world: int, n_returns: int, past_runs: int = 0) -> Builder:
    builder = Builder(root, n_returns, past_runs)
    for w in worlds:
        builder.add_world(w, per_world)
    return builder


@contextmanager
def watch_sql(engine: sa.Engine) -> Iterator[list[str]]:
    """Collect every SQL statement the engine runs inside the block."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def reads_history(statements: list[str]) -> bool:
    """Whether any statement reads what grows with history: run revisions (and their returns) or a
    snapshot's document. The tick reads ``run_heads`` and the snapshot's summary instead."""
    return any(re.search(r"\brun_revisions\b|\brisk_snapshots\.document\b", s)
               for s in statements if s.lstrip().upper().startswith("SELECT"))


def tick_all(service: WorldService, worlds: list[str]) -> tuple[float, dict[str, float], Counter[tuple[str, str]]]:
    """Tick every world once; total seconds, split (load_state, tick; policy load = the rest), actions."""
    phases = {"load_state": 0.0, "tick": 0.0}
    real_load, real_tick = _campaign.load_state, _campaign.tick
    _campaign.load_state = timed(phases, "load_state", real_load)  # type: ignore[assignment]
    _campaign.tick = timed(phases, "tick", real_tick)  # type: ignore[assignment]
    counts: Counter[tuple[str, str]] = Counter()
    # Cold, as a cron `campaign-loop --once` process starts: no policy parsed, no snapshot validated.
    _service._POLICY_CACHE.clear()
    risk._VALIDATED.clear()
    try:
        t0 = time.perf_counter()
        for w in worlds:
            for action in service.campaign_tick(w):
                counts[(action.action, action.reason)] += 1
        total = time.perf_counter() - t0
    finally:
        _campaign.load_state, _campaign.tick = real_load, real_tick  # type: ignore[assignment]
    phases["policy load"] = total - phases["load_state"] - phases["tick"]
    return total, phases, counts


def measure(builder: Builder, worlds: list[str], repeat: int) -> tuple[float, dict[str, float], Counter[tuple[str, str]], bool]:
    """Median of ``repeat`` whole ticks (after one warm-up), and whether ``returns`` was read."""
    service = builder.service()
    with watch_sql(builder.store.engine) as statements:
        tick_all(service, worlds[:1])
    read = reads_history(statements)
    results = [tick_all(service, worlds) for _ in range(repeat)]
    totals = [r[0] for r in results]
    mid = results[totals.index(sorted(totals)[len(totals) // 2])]
    return statistics.median(totals), mid[1], mid[2], read


def profile(service: WorldService, world: str, top: int) -> None:
    """Print where one world's tick spends its time (own time per function)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.runcall(service.campaign_tick, world)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
    print(f"profile of one world's tick ({world}), by own time:")
    for line in lines[start:]:
        print("  " + line.replace(str(ROOT) + "/", ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, default=100)
    parser.add_argument("--strategies", type=int, default=1000, help="per world")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--returns", type=int, default=10, help="returns stored per run revision in the main store")
    parser.add_argument("--scale-worlds", type=int, default=20, help="worlds in each scaling store")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also print the N most expensive functions of one world's tick (cProfile)")
    args = parser.parse_args()
    ok = True
    tune_gc()  # as the qmtl CLI does at start (qmtl_cli.app.main)

    with tempfile.TemporaryDirectory(prefix="qmtl-bench-") as tmp:
        root = Path(tmp)
        worlds = [world_name(i) for i in range(args.worlds)]
        t0 = time.perf_counter()
        builder = build(root / "main", worlds, args.strategies, args.returns)
        print(f"store: {args.worlds} worlds x {args.strategies} strategies = {builder.n_strategies} strategies, "
              f"{builder.run_pk} runs, {builder.rev_pk} revisions ({args.returns} returns each), "
              f"{args.worlds} risk snapshots; built in {time.perf_counter() - t0:.1f} s, "
              f"{(root / 'main' / 'qmtl.db').stat().st_size / 1e6:.0f} MB")
        total, phases, counts, read = measure(builder, worlds, args.repeat)
        rate = builder.n_strategies / total
        print(f"whole tick, every world: median {total:.2f} s over {args.repeat} runs = {rate:,.0f} strategies/s")
        print("  split: " + ", ".join(f"{k} {v:.2f} s" for k, v in phases.items()))
        print("  actions: " + ", ".join(f"{a}/{r} {n}" for (a, r), n in sorted(counts.items())))
        print(f"  run revisions or snapshot documents read: {'YES' if read else 'no'}")
        full = args.worlds * args.strategies >= 100_000
        projected = total * 100_000 / builder.n_strategies
        met = projected < GOAL_SECONDS
        print(f"goal (whole tick over 100 x 1,000 < {GOAL_SECONDS:.0f} s on SQLite): {'met' if met else 'NOT met'}"
              + ("" if full else f" (projected from this smaller store: {projected:.1f} s)"))
        ok = ok and met and not read
        if args.profile:
            profile(builder.service(), worlds[0], args.profile)
        builder.store.dispose()

        print(f"linear in strategies ({args.scale_worlds} worlds each, {args.returns} returns per revision):")
        per: list[float] = []
        for n in (250, 500, 1000):
            names = [world_name(i, f"s{n}") for i in range(args.scale_worlds)]
            b = build(root / f"scale{n}", names, n, args.returns)
            t, _, _, _ = measure(b, names, args.repeat)
            per.append(t / b.n_strategies * 1e6)
            print(f"  {n:5d} per world: {t:.3f} s, {per[-1]:.1f} us per strategy")
            b.store.dispose()
        print(f"  per-strategy cost 1000 vs 250: {per[-1] / per[0]:.2f}x (1.0 = linear)")

        print(f"flat in history length ({args.scale_worlds // 4 or 1} worlds x {args.strategies} strategies):")
        flat: list[float] = []
        names = [world_name(i, "hist") for i in range(args.scale_worlds // 4 or 1)]
        for n_returns in (10, 2000):
            t0 = time.perf_counter()
            b = build(root / f"hist{n_returns}", names, args.strategies, n_returns)
            built = time.perf_counter() - t0
            t, _, _, read = measure(b, names, args.repeat)
            flat.append(t)
            size = (root / f"hist{n_returns}" / "qmtl.db").stat().st_size / 1e6
            print(f"  {n_returns:5d} returns per revision: {t:.3f} s (store {size:.0f} MB, built in {built:.0f} s; "
                  f"revisions or documents read: {'YES' if read else 'no'})")
            ok = ok and not read
            b.store.dispose()
        print(f"  2000 vs 10 returns: {flat[1] / flat[0]:.2f}x (1.0 = flat)")

        print(f"flat in past runs ({len(names)} worlds x {args.strategies} strategies, {args.returns} returns "
              "per revision; a daily loop leaves one run per day and stage):")
        past: list[float] = []
        for n_past in (0, 29):
            names = [world_name(i, f"past{n_past}") for i in range(args.scale_worlds // 4 or 1)]
            b = build(root / f"past{n_past}", names, args.strategies, args.returns, past_runs=n_past)
            t, _, counts, _ = measure(b, names, args.repeat)
            past.append(t)
            print(f"  {n_past + 1:3d} runs per strategy and stage ({b.run_pk} runs): {t:.3f} s")
            b.store.dispose()
        print(f"  30 vs 1 runs: {past[1] / past[0]:.2f}x (1.0 = flat)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
