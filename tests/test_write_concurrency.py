"""Concurrent writers after the ledger head stopped being the first lock (``qmtl_core/store/locks.py``).

An evaluation holds the head only from its append to its commit. What it reads before that is kept
still by an evaluation lock (writers shared, the strategy exclusive). These tests race real threads
on both backends (PostgreSQL is where the locks are real; SQLite serialises every writer) and check
what each lock protects: one run key posted at once gives consecutive revisions, the run head stays on
the latest run, governance flows interleave with evaluations without a deadlock or a lost write, and
the chain still verifies.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from qmtl_core import ledger
from qmtl_core.runs import list_runs
from qmtl_core.store import locks, schema
from tests._service import Clock, make_service

W = "demo-momentum"
THREADS = 8


@pytest.fixture
def svc(store_url: str, worlds_dir: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    service = make_service(store_url, worlds_dir, tmp_path / "home", Clock())
    service.load_world(W)  # the policy recorded once, before the race
    yield service
    service.close()


def _race(work: list[Callable[[], Any]]) -> list[Any]:
    """Run every callable on its own thread, released together; their results (or exceptions)."""
    start = threading.Barrier(len(work))
    results: list[Any] = [None] * len(work)

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = work[i]()
        except Exception as exc:  # noqa: BLE001 (reported by the assertion below)
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(work))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a writer is stuck (deadlock?)"
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors
    return results


def _verified(svc) -> int:  # type: ignore[no-untyped-def]
    with svc.store.read() as conn:
        result = ledger.verify(conn)
    assert result.ok, result.to_dict()
    return result.head_seq


@pytest.mark.parametrize("strategy_known", [False, True], ids=["new-strategy", "known-strategy"])
def test_one_run_key_posted_at_once_makes_consecutive_revisions(svc, strategy_known: bool) -> None:  # type: ignore[no-untyped-def]
    if strategy_known:  # the race is then on the run key alone, not on the strategy's row too
        svc.record_evaluation(W, strategy_id="s1", stage="paper", run_id="p1", metrics={"sharpe": 1.0})
    before = _verified(svc)
    revs = _race([lambda i=i: svc.record_evaluation(W, strategy_id="s1", stage="backtest", run_id="r1",
                                                    metrics={"sharpe": 1.0 + i / 100})
                  for i in range(THREADS)])
    assert sorted(r.revision for r in revs) == list(range(1, THREADS + 1))
    with svc.store.read() as conn:
        run = conn.execute(sa.select(schema.evaluation_runs).where(schema.evaluation_runs.c.run_id == "r1")).one()
        stored = conn.execute(sa.select(schema.run_revisions.c.revision, schema.run_revisions.c.metrics)
                              .where(schema.run_revisions.c.run_pk == run.id)
                              .order_by(schema.run_revisions.c.revision)).all()
        head = conn.execute(sa.select(schema.run_heads).where(schema.run_heads.c.stage == "backtest")).one()
        kinds = [e.kind for e in ledger.entries(conn)][before:]
    assert run.latest_revision == THREADS and [r.revision for r in stored] == list(range(1, THREADS + 1))
    # The head is the last revision written, with that revision's own metrics.
    assert (head.run_pk, head.revision) == (run.id, THREADS)
    assert head.metrics == stored[-1].metrics
    assert kinds == ["run.recorded"] * THREADS
    assert _verified(svc) == before + THREADS


def test_the_same_content_posted_at_once_is_one_revision(svc) -> None:  # type: ignore[no-untyped-def]
    revs = _race([lambda: svc.record_evaluation(W, strategy_id="s1", stage="backtest", run_id="r1",
                                                metrics={"sharpe": 1.2})
                  for _ in range(THREADS)])
    assert {r.revision for r in revs} == {1} and sum(r.created for r in revs) == 1
    with svc.store.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(schema.run_revisions)).scalar() == 1


def test_runs_of_one_strategy_at_once_leave_the_head_on_the_latest(svc) -> None:  # type: ignore[no-untyped-def]
    _race([lambda i=i: svc.record_evaluation(W, strategy_id="s1", stage="backtest", run_id=f"r{i}",
                                             metrics={"sharpe": 1.0 + i / 100})
           for i in range(THREADS)])
    with svc.store.read() as conn:
        latest = list_runs(conn, world_id=W, strategy_id="s1", stage="backtest")[0]
        head = conn.execute(sa.select(schema.run_heads)).one()
    assert (head.run_id, head.revision, head.metrics) == (latest.run_id, latest.revision, latest.metrics)
    _verified(svc)


def test_evaluations_and_governance_flows_interleave_without_loss(svc) -> None:  # type: ignore[no-untyped-def]
    """Halts (``ledger.lock`` flows: writers exclusive) race evaluations of many strategies: every
    write lands once, in one unbroken chain, and the world ends as the last flow left it."""
    before = _verified(svc)
    evaluations = [lambda i=i: [svc.record_evaluation(W, strategy_id=f"s{i}", stage="backtest", run_id=f"r{n}",
                                                      metrics={"sharpe": 1.0 + n / 10}) for n in range(3)]
                   for i in range(THREADS - 2)]
    switches = [lambda: [svc.set_halted(W, halted=h, reason="drill") for h in (True, False, True, False)]
                for _ in range(2)]
    _race(evaluations + switches)
    with svc.store.read() as conn:
        runs = conn.execute(sa.select(sa.func.count()).select_from(schema.evaluation_runs)).scalar()
        kinds = [e.kind for e in ledger.entries(conn)][before:]
    assert runs == 3 * (THREADS - 2)
    assert kinds.count("run.recorded") == 3 * (THREADS - 2)
    assert kinds.count("world.halted") + kinds.count("world.resumed") >= 2  # repeats of a state are no-ops
    assert _verified(svc) == before + len(kinds)


@pytest.mark.postgres
def test_an_evaluation_waits_only_for_its_own_strategy_and_governance_for_every_evaluation(
        pg_cluster: Any, worlds_dir: Path, tmp_path: Path) -> None:
    """The lock order itself: while one transaction holds s1's evaluation lock, an evaluation of s2
    completes, one of s1 waits, and a ``ledger.lock`` flow waits; all finish once it commits."""
    svc = make_service(pg_cluster.new_database(), worlds_dir, tmp_path / "home", Clock())
    try:
        svc.load_world(W)
        holder = svc.store.engine.connect()
        holder.begin()
        locks.evaluation(holder, W, "s1")

        def locked_flow() -> None:
            with svc.store.write() as conn:
                ledger.lock(conn)
                ledger.append(conn, actor="t", kind="test.locked", now=svc.clock())

        other = threading.Thread(target=lambda: svc.record_evaluation(W, strategy_id="s2", stage="backtest",
                                                                      metrics={"sharpe": 1.0}))
        same = threading.Thread(target=lambda: svc.record_evaluation(W, strategy_id="s1", stage="backtest",
                                                                     metrics={"sharpe": 1.0}))
        governance = threading.Thread(target=locked_flow)
        other.start()
        other.join(timeout=60)
        assert not other.is_alive(), "an evaluation of another strategy waited for s1's lock"
        same.start()
        governance.start()
        time.sleep(1.0)
        assert same.is_alive() and governance.is_alive()
        with svc.store.read() as conn:
            assert [e.kind for e in ledger.entries(conn)][-1] == "run.recorded"  # s2's only
        holder.commit()
        holder.close()
        for t in (same, governance):
            t.join(timeout=60)
            assert not t.is_alive()
        with svc.store.read() as conn:
            kinds = sorted(e.kind for e in ledger.entries(conn))[-3:]
            assert ledger.verify(conn).ok
        assert kinds == ["run.recorded", "run.recorded", "test.locked"]
    finally:
        svc.close()


def test_a_policy_version_adopted_on_another_host_is_noticed_by_the_next_evaluation(
        svc, store_url: str, worlds_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The facade remembers the policy in force between evaluations, and confirms it inside each
    write: once another host (its own worlds directory) adopts version 2, this host's next evaluation
    is not recorded under version 1; it meets the version conflict its older file is."""
    from qmtl_core.errors import PolicyVersionConflict

    first = svc.record_evaluation(W, strategy_id="s1", stage="backtest", run_id="r1", metrics={"sharpe": 1.0})
    assert first.policy_version == 1
    other_dir = tmp_path / "other-host-worlds"
    other_dir.mkdir()
    text = (worlds_dir / f"{W}.yaml").read_text()
    (other_dir / f"{W}.yaml").write_text(text.replace("policy_version: 1", "policy_version: 2")
                                         .replace("min: 0.8, stages: [backtest]", "min: 0.9, stages: [backtest]"))
    other = make_service(store_url, other_dir, tmp_path / "other-home", Clock())
    try:
        assert other.load_world(W).policy.policy_version == 2  # adopted: nothing in paper or live
    finally:
        other.close()
    with pytest.raises(PolicyVersionConflict):
        svc.record_evaluation(W, strategy_id="s1", stage="backtest", run_id="r2", metrics={"sharpe": 1.0})
    with svc.store.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(schema.evaluation_runs)).scalar() == 1
    # With this host's file brought up to date, evaluations carry on under version 2 at once.
    (worlds_dir / f"{W}.yaml").write_text((other_dir / f"{W}.yaml").read_text())
    assert svc.record_evaluation(W, strategy_id="s1", stage="backtest", run_id="r2",
                                 metrics={"sharpe": 1.0}).policy_version == 2
