"""Evaluation runs on both backends: revisions, metric sourcing order, paper never borrows backtest."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from qmtl_core.risk import parse_snapshot
from qmtl_core.runs import suggested_run_id
from qmtl_core.store import open_store, schema
from tests._service import Clock, daily, make_service

W = "demo-momentum"


@pytest.fixture
def clock() -> Clock:
    # After the last of the tests' daily returns (600 days from 2026-01-01): observations dated
    # ahead of the clock are refused (risk.future_tolerance).
    return Clock(datetime(2028, 1, 3, 12, tzinfo=timezone.utc))


@pytest.fixture
def svc(store_url: str, worlds_dir: Path, tmp_path: Path, clock: Clock):  # type: ignore[no-untyped-def]
    service = make_service(store_url, worlds_dir, tmp_path / "home", clock)
    yield service
    service.close()


def _snapshot(clock: Clock, *, version: str = "v1", stage: str = "paper", returns: dict | None = None,  # type: ignore[type-arg]
              weights: dict | None = None, ttl: int = 900, lag: timedelta = timedelta(0)) -> object:  # type: ignore[type-arg]
    realized = {sid: [{"ts": t.isoformat(), "r": r} for t, r in pts] for sid, pts in (returns or {}).items()}
    return parse_snapshot({"world_id": W, "version": version, "as_of": (clock.now - lag).isoformat(),
                           "ttl_sec": ttl, "weights": weights or {"s1": 1.0},
                           "realized_returns": realized, "provenance": {"actor": "risk-engine", "stage": stage}})


def _hub(svc):  # type: ignore[no-untyped-def]
    """The service as a trusted producer (a ``producer`` token): the only snapshots decided on."""
    return svc.as_actor("risk-engine", role="producer")


def test_same_key_same_content_is_a_no_op_and_new_content_a_revision(svc) -> None:  # type: ignore[no-untyped-def]
    first = svc.record_evaluation(W, strategy_id="s1", stage="backtest", run_id="r1", returns=daily(600))
    again = svc.record_evaluation(W, strategy_id="s1", stage="backtest", run_id="r1", returns=daily(600))
    assert (first.revision, first.created) == (1, True) and (again.revision, again.created) == (1, False)
    changed = svc.record_evaluation(W, strategy_id="s1", stage="backtest", run_id="r1", returns=daily(601))
    assert changed.revision == 2 and changed.window["n_observations"] == 601
    latest = svc.list_runs(W, strategy_id="s1")
    history = svc.list_runs(W, strategy_id="s1", history=True)
    assert [r.revision for r in latest] == [2] and [r.revision for r in history] == [2, 1]
    assert all(r.policy_version == 1 and r.rule_results for r in history)
    kinds = [e.kind for e in svc.audit_log(world=W)]
    assert kinds.count("run.recorded") == 2


def test_suggested_run_id_is_stable_and_data_based(svc) -> None:  # type: ignore[no-untyped-def]
    run = svc.record_evaluation(W, strategy_id="s1", stage="backtest", returns=daily(10))
    assert run.run_id == "backtest-20260110"
    t = daily(1)[0][0]
    assert suggested_run_id("paper", t.replace(hour=14, minute=30), t) == "paper-20260101T143000Z"


def test_request_metrics_win_over_request_returns(svc) -> None:  # type: ignore[no-untyped-def]
    run = svc.record_evaluation(W, strategy_id="s1", stage="backtest", returns=daily(600),
                                metrics={"sharpe": 9.0, "n_trades": 50})
    assert run.metrics["sharpe"] == 9.0 and run.metric_sources["sharpe"] == "request.metrics"
    assert run.metric_sources["max_drawdown"] == "request.returns"
    assert run.metric_sources["n_trades"] == "request.metrics"
    sharpe_rule = next(r for r in run.rule_results if r["id"] == "sharpe")
    assert sharpe_rule["source"] == "request.metrics" and sharpe_rule["observed"] == 9.0


def test_paper_run_sources_realized_returns_from_a_fresh_same_stage_snapshot(svc, clock: Clock) -> None:  # type: ignore[no-untyped-def]
    svc.record_evaluation(W, strategy_id="s1", stage="backtest", returns=daily(600))
    paper_returns = daily(25, start=clock.now - timedelta(days=25), seed=3)
    _hub(svc).put_risk_snapshot(_snapshot(clock, returns={"s1": paper_returns}))
    run = svc.record_evaluation(W, strategy_id="s1", stage="paper")
    assert run.status != "insufficient_data"
    assert run.metric_sources["sharpe"] == "risk_snapshot:v1"
    assert run.window["n_observations"] == 25 and run.window["source"] == "risk_snapshot:v1"


def test_paper_never_borrows_backtest(svc, clock: Clock) -> None:  # type: ignore[no-untyped-def]
    svc.record_evaluation(W, strategy_id="s1", stage="backtest", returns=daily(600))
    # A snapshot with *backtest* returns is not paper evidence either.
    _hub(svc).put_risk_snapshot(_snapshot(clock, stage="backtest", returns={"s1": daily(30)}))
    run = svc.record_evaluation(W, strategy_id="s1", stage="paper")
    assert run.status == "insufficient_data" and run.metrics == {}
    assert "no trusted paper risk snapshot" in run.reason and "no previous paper run" in run.reason


def test_stale_snapshot_falls_back_to_previous_same_stage_run(svc, clock: Clock) -> None:  # type: ignore[no-untyped-def]
    svc.record_evaluation(W, strategy_id="s1", stage="backtest", returns=daily(600))
    _hub(svc).put_risk_snapshot(_snapshot(clock, returns={"s1": daily(25, seed=4)}))
    first = svc.record_evaluation(W, strategy_id="s1", stage="paper", run_id="p1")
    clock.advance(hours=2)  # past the 900 s TTL
    later = svc.record_evaluation(W, strategy_id="s1", stage="paper", run_id="p2")
    assert later.metric_sources["sharpe"] == "previous_run:p1#1"
    assert later.metrics["sharpe"] == first.metrics["sharpe"]
    assert "risk_snapshot_expired" in later.reason


def test_nothing_to_source_is_insufficient_data_with_reasons(svc) -> None:  # type: ignore[no-untyped-def]
    run = svc.record_evaluation(W, strategy_id="s9", stage="live")
    assert run.status == "insufficient_data"
    assert "no trusted live risk snapshot for the world" in run.reason and "no previous live run" in run.reason


def test_cohort_goes_through_vectorised_path_and_matches_single(svc) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    from qmtl_core.datafiles import ReturnsTable

    series = {f"c{i}": daily(300, seed=i) for i in range(4)}
    stamps = tuple(t for t, _ in series["c0"])
    table = ReturnsTable(tuple(series), stamps, np.array([[r for _, r in s] for s in series.values()]))
    cohort = svc.evaluate_cohort(W, stage="backtest", returns=table)
    assert [r.strategy_id for r in cohort] == ["c0", "c1", "c2", "c3"]
    single = svc.record_evaluation(W, strategy_id="c2", stage="backtest", returns=series["c2"])
    assert single.run_id == cohort[2].run_id and single.created is False  # same evidence, same revision


def test_unknown_stage_and_world(svc) -> None:  # type: ignore[no-untyped-def]
    from qmtl_core.errors import UsageError, WorldNotFound

    with pytest.raises(UsageError):
        svc.record_evaluation(W, strategy_id="s1", stage="prod")
    with pytest.raises(WorldNotFound):
        svc.list_runs("nope")


_WORKER = """
import sys
from pathlib import Path
from datetime import datetime, timezone
from tests._service import Clock, make_service, daily
svc = make_service(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]),
                   Clock(datetime(2028, 1, 3, 12, tzinfo=timezone.utc)))  # after the returns, as the clock fixture
rev = svc.record_evaluation("demo-momentum", strategy_id="s1", stage="backtest", run_id="same",
                            returns=daily(300 + int(sys.argv[4]) % 2))
print(rev.revision)
svc.close()
"""


def test_eight_processes_recording_the_same_run(store_url: str, worlds_dir: Path, tmp_path: Path) -> None:
    open_store(store_url).dispose()  # migrate once up front, as a deployed store would be
    root = Path(__file__).resolve().parent.parent
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, store_url, str(worlds_dir),
                               str(tmp_path / "home"), str(i)], cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(8)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    store = open_store(store_url)
    with store.read() as conn:
        runs = conn.execute(sa.select(schema.evaluation_runs)).all()
        revs = conn.execute(sa.select(schema.run_revisions.c.revision, schema.run_revisions.c.content_hash)
                            .order_by(schema.run_revisions.c.revision)).all()
    store.dispose()
    assert len(runs) == 1 and runs[0].latest_revision == len(revs)
    assert [r.revision for r in revs] == list(range(1, len(revs) + 1))
    # Two distinct contents alternate, so consecutive revisions always differ.
    assert all(a.content_hash != b.content_hash for a, b in zip(revs, revs[1:]))
    assert 1 <= len(revs) <= 8


@pytest.mark.usefixtures("cli_mode")
def test_cli_evaluate_strategy_and_runs_json(qmtl_env: dict[str, str], tmp_path: Path) -> None:
    from tests.cli_helpers import qmtl

    returns = tmp_path / "r.csv"
    returns.write_text("timestamp,s1\n" + "".join(f"2026-01-{d:02d},{0.001 * (-1) ** d + 0.002}\n"
                                                   for d in range(1, 29)))
    ran = qmtl("world", "evaluate", W, "--strategy", "s1", "--returns", str(returns), "--json")
    assert ran.exit_code == 10  # too little history for the backtest gates
    doc = ran.json()
    assert doc["run_id"] == "backtest-20260128" and doc["revision"] == 1 and doc["created"] is True
    runs = qmtl("world", "runs", W, "--json").json()["runs"]
    assert [(r["strategy_id"], r["revision"]) for r in runs] == [("s1", 1)]
    paper = qmtl("world", "evaluate", W, "--strategy", "s1", "--stage", "paper")
    assert paper.exit_code == 12 and "insufficient_data" in paper.stdout
    assert json.loads(qmtl("world", "runs", W, "--stage", "paper", "--json").stdout)["runs"][0]["status"] \
        == "insufficient_data"


def test_accepted_snapshot_emits_one_event(svc, clock: Clock) -> None:  # type: ignore[no-untyped-def]
    svc.record_evaluation(W, strategy_id="s1", stage="backtest", returns=daily(10))
    seen: list = []  # type: ignore[type-arg]
    svc.bus.subscribe(seen.append, world_id=W)
    _, created = _hub(svc).put_risk_snapshot(_snapshot(clock))
    _, again = _hub(svc).put_risk_snapshot(_snapshot(clock))
    assert (created, again) == (True, False)
    assert [e.type for e in seen] == ["risk_snapshot_updated"]
    assert seen[0].payload["world_id"] == W


# --- run heads (schema v3): the latest run per strategy and stage, kept with every record -----------
def _heads(svc) -> list[tuple]:  # type: ignore[no-untyped-def,type-arg]
    h = schema.run_heads
    with svc.store.read() as conn:
        return [tuple(r) for r in conn.execute(
            sa.select(h.c.world_id, h.c.strategy_id, h.c.stage, h.c.run_id, h.c.revision, h.c.status,
                      h.c.policy_version, h.c.content_hash, h.c.window_start, h.c.window_end,
                      h.c.n_observations, h.c.metrics, h.c.rule_results)
            .order_by(h.c.world_id, h.c.strategy_id, h.c.stage))]


def _latest_by_ranking(svc) -> list[tuple]:  # type: ignore[no-untyped-def,type-arg]
    """What the heads must equal: ``list_runs``' newest run per (strategy, stage), read the long way."""
    out = {}
    for run in svc.list_runs(W):  # newest first
        out.setdefault((run.strategy_id, run.stage), run)
    return sorted((W, r.strategy_id, r.stage, r.run_id, r.revision, r.status, r.policy_version, r.content_hash,
                   r.window["start"], r.window["end"], r.window["n_observations"], dict(r.metrics),
                   list(r.rule_results)) for r in out.values())


def _record_history(svc, clock: Clock) -> None:  # type: ignore[no-untyped-def]
    svc.record_evaluation(W, strategy_id="s1", stage="backtest", run_id="a", returns=daily(600))
    clock.advance(hours=1)
    svc.record_evaluation(W, strategy_id="s1", stage="backtest", run_id="b", returns=daily(610))
    clock.advance(hours=1)
    # A new revision of the older run makes it the latest again (its updated_at moves).
    svc.record_evaluation(W, strategy_id="s1", stage="backtest", run_id="a", returns=daily(620))
    svc.record_evaluation(W, strategy_id="s2", stage="backtest", run_id="a", metrics={"sharpe": 0.1})
    svc.record_evaluation(W, strategy_id="s2", stage="paper", run_id="p", returns=daily(5))
    clock.advance(hours=1)
    svc.record_evaluation(W, strategy_id="s2", stage="paper", run_id="p", returns=daily(5))  # same content: no-op


def test_run_heads_follow_the_latest_run_of_each_stage(svc, clock: Clock) -> None:  # type: ignore[no-untyped-def]
    _record_history(svc, clock)
    heads = _heads(svc)
    assert heads == _latest_by_ranking(svc)
    assert [(h[1], h[2], h[3], h[4]) for h in heads] == [
        ("s1", "backtest", "a", 2), ("s2", "backtest", "a", 1), ("s2", "paper", "p", 1)]


def test_a_backdated_record_does_not_displace_a_newer_head(svc, clock: Clock) -> None:  # type: ignore[no-untyped-def]
    svc.record_evaluation(W, strategy_id="s1", stage="backtest", run_id="new", returns=daily(600))
    clock.advance(days=-1)  # a clock set back (another host, a replayed import)
    svc.record_evaluation(W, strategy_id="s1", stage="backtest", run_id="old", returns=daily(500))
    assert [(h[3], h[10]) for h in _heads(svc)] == [("new", 600)]
    assert _heads(svc) == _latest_by_ranking(svc)


def test_migrating_a_v2_store_fills_run_heads_and_the_latest_snapshot_summary(svc, clock: Clock,  # type: ignore[no-untyped-def]
                                                                              store_url: str) -> None:
    from qmtl_core.risk import latest_summary, summarize
    from qmtl_core.store import current_version, head_version, migrate
    from qmtl_core.store._store import Store

    _record_history(svc, clock)
    old = _snapshot(clock, version="v1", returns={"s2": daily(3)}, weights={"s1": 0.5, "s2": 0.5})
    _hub(svc).put_risk_snapshot(old)
    clock.advance(minutes=5)
    new = _snapshot(clock, version="v2", returns={"s2": daily(4)}, weights={"s1": 0.5, "s2": 0.5})
    _hub(svc).put_risk_snapshot(new)
    kept = _heads(svc)
    # Turn the store back into a v2 store: runs and snapshots, but no heads and no summaries.
    with svc.store.write() as conn:
        schema.run_heads.drop(conn)
        conn.execute(sa.text("ALTER TABLE risk_snapshots DROP COLUMN summary"))
        conn.execute(sa.delete(schema.schema_version).where(schema.schema_version.c.version > 2))
    svc.close()
    store = Store(store_url)
    with store.write() as conn:
        assert current_version(conn) == 2
        assert migrate(conn) == list(range(3, head_version() + 1))  # every later step runs too
    with store.read() as conn:
        summaries = dict(conn.execute(sa.select(schema.risk_snapshots.c.version, schema.risk_snapshots.c.summary)).all())
        assert summaries == {"v1": None, "v2": summarize(new)}  # only the latest is filled
        assert latest_summary(conn, W, stage="paper").series("s2") == (daily(4)[-1][0], 4)
    store.dispose()
    again = make_service(store_url, svc.settings.worlds_dir, svc.settings.home, clock)
    try:
        assert _heads(again) == kept
        # The campaign reads the filled heads: s1's view shows its latest run's metrics and window.
        s1 = next(v for v in again.campaign(W) if v.strategy_id == "s1")
        head = next(h for h in kept if h[1:3] == ("s1", "backtest"))
        assert dict(s1.metrics) == head[11] and s1.progress[0].n_observations == head[10] == 620
    finally:
        again.close()


@pytest.mark.parametrize("other_run", [False, True])
def test_heads_follow_a_run_whose_clock_went_back(svc, clock: Clock, other_run: bool) -> None:  # type: ignore[no-untyped-def]
    """A new revision of the head's own run recorded under a clock set back still moves the head
    (the gate must not decide on a superseded revision); if another run now sorts first, it is the head."""
    if other_run:
        svc.record_evaluation(W, strategy_id="s1", stage="paper", run_id="a", returns=daily(30, seed=3))
        clock.advance(minutes=1)
    svc.record_evaluation(W, strategy_id="s1", stage="paper", run_id="p", returns=daily(40, seed=1, mean=0.004))
    clock.advance(minutes=-5)  # NTP stepped the clock back, or another host wrote
    svc.record_evaluation(W, strategy_id="s1", stage="paper", run_id="p", returns=daily(40, seed=1, mean=-0.01))
    assert _heads(svc) == _latest_by_ranking(svc)
    from qmtl_core.governance._requests import paper_run_summary

    latest = svc.list_runs(W, strategy_id="s1", stage="paper")[0]
    with svc.store.read() as conn:
        head = paper_run_summary(conn, W, "s1")
    assert head is not None and (head.run_id, head.revision, head.status) == (
        latest.run_id, latest.revision, latest.status)
    assert (latest.run_id, latest.revision) == (("a", 1) if other_run else ("p", 2))
