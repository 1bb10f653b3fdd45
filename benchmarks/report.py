"""Benchmark ``qmtl world report`` on a world of 1,000 strategies (goal: under 30 s).

The store is built through the ``WorldService`` facade in a temp dir (SQLite): 1,000 strategies
with three years of daily backtest returns recorded as one cohort, the campaign loop promoting the
passing ones to paper, 40 of those with 30 paper days evaluated from a risk snapshot, one taken
live by two approvals with 30 live days recorded, and one more awaiting approval.

Measured:
- the whole command as a user runs it (``qmtl world report bench --out ...`` in a subprocess:
  start-up, imports, reading, drawing, writing), the number that must stay under 30 s;
- in process, the split: reading through the facade (``collect``) and drawing (``render_html``),
  and the cost per strategy shown in full (one reused matplotlib figure) and per summary row
  (hand-built SVG sparkline).

    .venv/bin/python benchmarks/report.py [--strategies 1000] [--top 10]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from qmtl_core.config import Settings  # noqa: E402
from qmtl_core.datafiles import ReturnsTable  # noqa: E402
from qmtl_core.risk import parse_snapshot  # noqa: E402
from qmtl_core.service import WorldService  # noqa: E402

GOAL_SECONDS = 30.0
NOW = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)
POLICY = """\
world: bench
description: report benchmark world
policy_version: 1
allow_live: true
rules:
  - {id: sharpe, metric: sharpe, min: 0.5}
  - {id: drawdown, metric: max_drawdown, max: 0.35}
  - {id: history, metric: effective_history_years, min: 2, stages: [backtest]}
  - {id: tail, metric: cvar_95, max: 0.05, severity: info}
selection:
  top_k: {metric: sharpe, k: 5}
campaign:
  backtest: {window: 730d, min_observations: 500}
  paper: {window: 20d, min_observations: 15}
  live: {monitor_window: 30d}
governance:
  live_promotion:
    mode: manual_approval
    approvers: [alice, bob, carol]
    required_approvals: 2
    max_live_slots: 3
risk: {snapshot_max_age: 1h, decision_ttl: 10m}
"""


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


def build(home: Path, worlds: Path, n: int) -> WorldService:
    """The benchmark world, through the facade."""
    worlds.mkdir(parents=True)
    (worlds / "bench.yaml").write_text(POLICY)
    clock = Clock()
    svc = WorldService(Settings(home=home, worlds_dir=worlds, database_url=f"sqlite:///{home / 'qmtl.db'}"),
                       clock=clock, actor="cron")
    rng = np.random.default_rng(7)
    days = 756
    stamps = tuple(datetime(2022, 1, 3, tzinfo=timezone.utc) + timedelta(days=i) for i in range(days))
    drift = rng.normal(0.0003, 0.0006, (n, 1))
    ids = tuple(f"s{i:04d}" for i in range(n))
    svc.evaluate_cohort("bench", stage="backtest", returns=ReturnsTable(ids, stamps,
                                                                        drift + rng.normal(0, 0.01, (n, days))))
    svc.campaign_iteration(["bench"], execute=True, holder="bench", lease_ttl=timedelta(minutes=30))
    paper = [v.strategy_id for v in svc.campaign("bench") if v.stage == "paper"][:40]
    if len(paper) >= 2:
        # 30 paper days observed after entry (only those count), posted by a trusted producer.
        clock.now = NOW + timedelta(days=30)
        rets = {sid: [{"ts": (NOW + timedelta(days=i)).isoformat(), "r": float(rng.normal(0.002, 0.008))}
                      for i in range(30)] for sid in paper}
        svc.as_actor("risk", role="producer").put_risk_snapshot(parse_snapshot({
            "world_id": "bench", "version": "paper-30d", "as_of": clock.now.isoformat(), "ttl_sec": 3600,
            "weights": {sid: 1.0 / len(paper) for sid in paper}, "realized_returns": rets,
            "provenance": {"actor": "risk", "stage": "paper"}}))
        for sid in paper:
            svc.record_evaluation("bench", strategy_id=sid, stage="paper")
        first = svc.as_actor("carol").promote("bench", paper[0], reason="benchmark")
        if first.request_id:
            svc.as_actor("alice").decide_request(first.request_id, decision="approve", reason="ok")
            svc.as_actor("bob").decide_request(first.request_id, decision="approve", reason="ok")
            live = [(clock.now + timedelta(days=i), float(rng.normal(0.001, 0.01))) for i in range(30)]
            svc.record_evaluation("bench", strategy_id=paper[0], stage="live", returns=live)
        svc.as_actor("carol").promote("bench", paper[1], reason="benchmark")
    return svc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", type=int, default=1000)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qmtl-report-bench-") as tmp:
        home, worlds = Path(tmp) / "home", Path(tmp) / "worlds"
        home.mkdir()
        t = time.perf_counter()
        svc = build(home, worlds, args.strategies)
        print(f"built a world of {args.strategies} strategies in {time.perf_counter() - t:.1f} s (not measured)")

        from qmtl_core.report._collect import collect
        from qmtl_core.report._render import render_html

        t = time.perf_counter()
        report = collect(svc, "bench", top=args.top)
        read = time.perf_counter() - t
        t = time.perf_counter()
        html = render_html(report)
        draw = time.perf_counter() - t
        svc.close()
        full = len(report.full)
        stages = {s: sum(1 for x in report.strategies if x.stage == s) for s in ("backtest", "paper", "live")}
        print(f"in process: read {read:.2f} s, draw {draw:.2f} s ({full} in full, "
              f"{len(report.strategies) - full} summary rows; stages {stages}; page {len(html) / 1e6:.1f} MB)")

        out = Path(tmp) / "bench.html"
        env = {**os.environ, "QMTL_HOME": str(home), "QMTL_WORLDS_DIR": str(worlds), "NO_COLOR": "1"}
        env.pop("QMTL_DATABASE_URL", None)
        env.pop("QMTL_SERVER", None)
        t = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "qmtl_cli", "world", "report", "bench", "--out", str(out),
                               "--top", str(args.top)], env=env, capture_output=True, text=True)
        total = time.perf_counter() - t
        if done.returncode != 0:
            raise SystemExit(f"qmtl world report failed ({done.returncode}): {done.stderr}")
        verdict = "OK" if total < GOAL_SECONDS else "TOO SLOW"
        print(f"qmtl world report over {args.strategies} strategies: {total:.2f} s end to end "
              f"(goal < {GOAL_SECONDS:.0f} s: {verdict})")
        if total >= GOAL_SECONDS:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
