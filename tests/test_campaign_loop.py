"""The campaign loop against a real store: executes once, never repeats, leases, crashes, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from qmtl_core.datafiles import ReturnsTable
from qmtl_core.risk import parse_snapshot
from qmtl_core.store import open_store, schema
from qmtl_core.timeutil import parse_instant
from tests._service import Clock, make_service
from tests.cli_helpers import qmtl

ROOT = Path(__file__).resolve().parent.parent
WORLD = "camp"
POLICY = """\
world: camp
policy_version: 1
allow_live: false
rules:
  - {id: sharpe, metric: sharpe, min: 0.3}
  - {id: dd, metric: max_drawdown, max: 0.5}
campaign:
  backtest: {window: 300d, min_observations: 250}
  paper: {window: 10d, min_observations: 8}
risk: {snapshot_max_age: 1h}
"""
T0 = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def camp_dir(worlds_dir: Path) -> Path:
    (worlds_dir / "camp.yaml").write_text(POLICY)
    return worlds_dir


def _backtests(svc, n: int, *, good: bool = True) -> list[str]:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(7)
    mean = 0.003 if good else -0.003
    matrix = rng.normal(mean, 0.01, (n, 400))
    stamps = tuple(datetime(2024, 1, 1, tzinfo=timezone.utc) + timedelta(days=i) for i in range(400))
    ids = tuple(f"s{i:03d}" for i in range(n))
    svc.evaluate_cohort(WORLD, stage="backtest", returns=ReturnsTable(ids, stamps, matrix))
    return list(ids)


def _paper_snapshot(svc, ids: list[str], days: int, version: str) -> None:  # type: ignore[no-untyped-def]
    """``days`` daily paper returns from T0 (when the loop took the strategies to paper), posted
    by a trusted producer: only those count (DESIGN §11)."""
    now = svc.clock()
    returns = {sid: [{"ts": (T0 + timedelta(days=i)).isoformat(), "r": 0.002 * (1 if i % 3 else -0.5)}
                     for i in range(days)] for sid in ids}
    svc.as_actor("risk", role="producer").put_risk_snapshot(parse_snapshot({
        "world_id": WORLD, "version": version, "as_of": now.isoformat(), "ttl_sec": 3600,
        "weights": {sid: 1.0 / len(ids) for sid in ids}, "realized_returns": returns,
        "provenance": {"actor": "risk", "stage": "paper"}}))


def _loop(svc, *, execute: bool = True, holder: str = "test-holder"):  # type: ignore[no-untyped-def]
    return svc.campaign_iteration([WORLD], execute=execute, holder=holder, lease_ttl=timedelta(minutes=5))[0]


def _count(svc, table: sa.Table, **where: str) -> int:  # type: ignore[no-untyped-def]
    with svc.store.read() as conn:
        q = sa.select(sa.func.count()).select_from(table)
        for k, v in where.items():
            q = q.where(table.c[k] == v)
        return int(conn.execute(q).scalar() or 0)


@pytest.fixture
def svc(store_url: str, camp_dir: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    service = make_service(store_url, camp_dir, tmp_path / "home", Clock(T0))
    yield service
    service.close()


def test_full_campaign_then_nothing_repeats(svc) -> None:  # type: ignore[no-untyped-def]
    ids = _backtests(svc, 3)
    first = _loop(svc)
    assert [a["action"] for a in first.actions if a["outcome"] == "executed"] == ["promote_to_paper"] * 3
    assert first.exit_code == 12  # now in paper with no snapshot: fail closed
    again = _loop(svc)
    assert not [a for a in again.actions if a["outcome"] == "executed"]
    svc.clock.advance(days=5)
    _paper_snapshot(svc, ids, 5, "p5")
    waiting = _loop(svc)
    assert [a["action"] for a in waiting.actions if a["outcome"] == "executed"] == ["evaluate"] * 3
    assert {a["reason"] for a in waiting.actions if a["outcome"] == "reported"} == {"window_incomplete"}
    assert waiting.exit_code == 11
    svc.clock.advance(days=6)
    _paper_snapshot(svc, ids, 11, "p11")
    done = _loop(svc)
    assert {a["reason"] for a in done.actions if a["outcome"] == "reported"} == {"allow_live_false"}
    assert done.exit_code == 10
    keys = [a["idempotency_key"] for it in (first, waiting, done) for a in it.actions if a["outcome"] == "executed"]
    assert len(keys) == len(set(keys)) == _count(svc, schema.campaign_actions, status="executed") == 9
    # Executing the plan then ticking again yields no executable action at all.
    assert [a for a in svc.campaign_tick(WORLD) if a.executable] == []
    assert svc.audit_verify().ok


def test_a_rounds_promotions_are_one_activation_set_each_on_the_ledger(svc) -> None:  # type: ignore[no-untyped-def]
    ids = _backtests(svc, 12)
    first = _loop(svc)
    assert [a["outcome"] for a in first.actions if a["action"] == "promote_to_paper"] == ["executed"] * 12
    assert {a["result"]["set_version"] for a in first.actions if a["action"] == "promote_to_paper"} == {1}
    with svc.store.read() as conn:
        sets = conn.execute(sa.select(schema.activation_sets.c.set_version)).scalars().all()
        paper = conn.execute(sa.select(schema.strategies.c.strategy_id, schema.strategies.c.stage_entered_at)
                             .where(schema.strategies.c.stage == "paper")).all()
        deciders = set(conn.execute(sa.select(schema.decisions.c.strategy_id)).scalars())
    assert sets == [1] and sorted(sid for sid, _ in paper) == ids and all(at for _, at in paper)
    assert deciders >= set(ids)  # every moved strategy's decision envelope is stored
    promoted = svc.audit_log(kind="strategy.promoted")
    assert [e.payload["strategy_id"] for e in promoted] == ids  # one entry per strategy, each its own
    assert all(e.payload["idempotency_key"] and e.payload["evidence"] for e in promoted)
    assert "activations" not in promoted[0].payload and sorted(promoted[-1].payload["changed"]) == ids
    assert len(svc.audit_log(kind="campaign.executed")) == 12
    result = svc.audit_verify(deep=True)  # the activation set rebuilt from the ledger matches the tables
    assert result.ok, result


def test_window_does_not_advance_without_new_data(svc) -> None:  # type: ignore[no-untyped-def]
    ids = _backtests(svc, 1)
    _loop(svc)
    svc.clock.advance(days=5)
    _paper_snapshot(svc, ids, 5, "p5")
    _loop(svc)
    before = svc.campaign(WORLD)[0].to_dict()["progress"][-1]
    runs_before = _count(svc, schema.run_revisions)
    for _ in range(3):
        svc.clock.advance(minutes=20)  # the wall clock moves; the data does not
        out = _loop(svc)
        assert not [a for a in out.actions if a["outcome"] == "executed"]
        after = svc.campaign(WORLD)[0].to_dict()["progress"][-1]
        assert after == before and after["label"] == "paper 4/10d, 5/8 obs"
    assert _count(svc, schema.run_revisions) == runs_before


def test_tick_reads_heads_and_summaries_not_history(svc) -> None:  # type: ignore[no-untyped-def]
    """Flat in history: the tick never reads run revisions (their returns) or a snapshot document."""
    ids = _backtests(svc, 2)
    _loop(svc)
    svc.clock.advance(days=4)  # the returns below end a day before the clock: none from the future
    for days in (5, 6, 7):  # a history of runs and snapshots
        svc.clock.advance(days=1)
        _paper_snapshot(svc, ids, days, f"p{days}")
        _loop(svc)
    statements: list[str] = []

    def record(conn, cursor, statement, *args) -> None:  # type: ignore[no-untyped-def]
        statements.append(statement)

    sa.event.listen(svc.store.engine, "before_cursor_execute", record)
    try:
        actions = svc.campaign_tick(WORLD)
    finally:
        sa.event.remove(svc.store.engine, "before_cursor_execute", record)
    assert {a.reason for a in actions} == {"window_incomplete"}
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert any("run_heads" in s for s in selects) and any("risk_snapshots.summary" in s for s in selects)
    assert not [s for s in selects if "run_revisions" in s or "risk_snapshots.document" in s]


def test_plan_changes_nothing(svc) -> None:  # type: ignore[no-untyped-def]
    _backtests(svc, 2)
    tables = [schema.ledger, schema.campaign_actions, schema.strategies, schema.run_revisions, schema.leases]
    before = [_count(svc, t) for t in tables]
    stages_before = [v.stage for v in svc.campaign(WORLD)]
    out = _loop(svc, execute=False)
    assert {a["outcome"] for a in out.actions} == {"planned"}
    assert [_count(svc, t) for t in tables] == before
    assert [v.stage for v in svc.campaign(WORLD)] == stages_before


def test_a_held_lease_makes_the_world_busy_until_it_expires(svc) -> None:  # type: ignore[no-untyped-def]
    from qmtl_core.service._campaign import acquire_lease, iteration_exit

    _backtests(svc, 1)
    with svc.store.write() as conn:
        assert acquire_lease(conn, WORLD, "other-host:1:dead", svc.clock(), timedelta(minutes=5)).acquired
    busy = _loop(svc)
    assert busy.status == "busy" and iteration_exit([busy]) == 75 and "other-host" in (busy.message or "")
    svc.clock.advance(minutes=6)
    taken = _loop(svc)
    assert taken.status == "executed"
    assert [e.kind for e in svc.audit_log(kind="campaign.lease_taken_over")] == ["campaign.lease_taken_over"]
    assert _count(svc, schema.leases) == 0  # released at the end


def test_stale_plan_is_skipped_not_misapplied(svc) -> None:  # type: ignore[no-untyped-def]
    from qmtl_core.service._campaign import execute

    _backtests(svc, 1)
    action = next(a for a in svc.campaign_tick(WORLD) if a.action == "promote_to_paper")
    _loop(svc)  # someone else promoted it with the same evidence: the key is taken
    loaded = svc.load_world(WORLD)
    with svc.store.write() as conn:
        assert execute(conn, loaded, action, actor="x", now=svc.clock())["status"] == "skipped"
    assert _count(svc, schema.campaign_actions, status="executed") == 1


# --- processes -----------------------------------------------------------------------------------------
def _cli_env(store_url: str, worlds: Path, home: Path) -> dict[str, str]:
    return {**os.environ, "QMTL_DATABASE_URL": store_url, "QMTL_WORLDS_DIR": str(worlds),
            "QMTL_HOME": str(home), "PYTHONPATH": str(ROOT)}


def _loop_proc(env: dict[str, str], *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "qmtl_cli", "world", "campaign-loop", "--world", WORLD,
                             "--once", "--execute", "--json", *extra], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_eight_concurrent_loops_execute_each_key_once(svc, store_url: str, camp_dir: Path,  # type: ignore[no-untyped-def]
                                                      tmp_path: Path) -> None:
    ids = _backtests(svc, 12)
    env = _cli_env(store_url, camp_dir, tmp_path / "home")
    procs = [_loop_proc(env) for _ in range(8)]
    outs = [p.communicate(timeout=180) for p in procs]
    codes = [p.returncode for p in procs]
    assert set(codes) <= {12, 75}, [o[1][-400:] for o in outs]
    assert 12 in codes  # at least one loop did the work (then paper is fail-closed: no snapshot)
    for out, _ in outs:
        doc = json.loads(out)  # exactly one JSON document per iteration
        assert doc["iteration"] == 1 and doc["worlds"][0]["world"] == WORLD
    assert _count(svc, schema.campaign_actions, status="executed") == len(ids)
    assert len(svc.audit_log(kind="strategy.promoted")) == len(ids)
    assert all(v.stage == "paper" for v in svc.campaign(WORLD))
    assert svc.audit_verify().ok


def test_killed_loop_is_taken_over_after_the_lease_expires(svc, store_url: str, camp_dir: Path,  # type: ignore[no-untyped-def]
                                                          tmp_path: Path) -> None:
    ids = _backtests(svc, 150)
    _loop(svc)  # promote all to paper
    svc.clock = lambda: datetime.now(timezone.utc)  # the subprocesses use the real clock
    _paper_snapshot(svc, ids, 5, "p5")
    env = _cli_env(store_url, camp_dir, tmp_path / "home")
    # Long enough that the next process surely starts (a loaded CI machine) before the lease expires.
    victim = _loop_proc(env, "--lease-ttl", "8s")
    deadline = time.monotonic() + 60
    while _count(svc, schema.campaign_actions, action="evaluate") < 10:
        assert victim.poll() is None, victim.communicate()[1][-500:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    done_by_victim = _count(svc, schema.campaign_actions, action="evaluate")
    assert done_by_victim < len(ids)
    busy = subprocess.run([sys.executable, "-m", "qmtl_cli", "world", "campaign-loop", "--world", WORLD,
                           "--once", "--execute"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert busy.returncode == 75 and "leased by" in busy.stdout, (busy.returncode, busy.stdout[-300:])
    with svc.store.read() as conn:
        expires = parse_instant(conn.execute(sa.select(schema.leases.c.expires_at)).scalar_one())
    time.sleep(max(0.0, (expires - datetime.now(timezone.utc)).total_seconds()) + 0.2)
    heir = subprocess.run([sys.executable, "-m", "qmtl_cli", "world", "campaign-loop", "--world", WORLD,
                           "--once", "--execute", "--json"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert heir.returncode == 11, heir.stderr[-500:]
    executed = [a for a in json.loads(heir.stdout)["worlds"][0]["actions"] if a["outcome"] == "executed"]
    # Nothing lost, nothing doubled: every strategy evaluated exactly once over both loops.
    assert len(executed) + done_by_victim == len(ids)
    assert _count(svc, schema.campaign_actions, action="evaluate") == len(ids)
    with svc.store.read() as conn:
        rr, er = schema.run_revisions, schema.evaluation_runs
        per_run = conn.execute(sa.select(er.c.strategy_id, sa.func.count()).join(rr, rr.c.run_pk == er.c.id)
                               .where(er.c.stage == "paper").group_by(er.c.strategy_id)).all()
    assert len(per_run) == len(ids) and {n for _, n in per_run} == {1}
    assert len(svc.audit_log(kind="campaign.lease_taken_over")) == 1
    assert svc.audit_verify().ok


# --- CLI ------------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("cli_mode")
def test_cli_usage_and_json_per_iteration(qmtl_env: dict[str, str], camp_dir: Path) -> None:
    assert qmtl("world", "campaign-loop", "--world", WORLD).exit_code == 2  # neither --once nor --interval
    assert qmtl("world", "campaign-loop", "--once", "--interval", "1h").exit_code == 2
    assert qmtl("world", "campaign-loop", "--world", "x", "--all", "--once").exit_code == 2
    assert qmtl("world", "campaign-loop", "--interval", "soon", "--world", WORLD).exit_code == 2
    ran = qmtl("world", "campaign-loop", "--world", WORLD, "--interval", "1s", "--max-iterations", "2", "--json")
    lines = [json.loads(line) for line in ran.stdout.splitlines()]
    assert [d["iteration"] for d in lines] == [1, 2] and all(d["mode"] == "plan" for d in lines)
    assert ran.exit_code == 0  # no strategies, nothing to do
    assert qmtl("world", "campaign-loop", "--world", "nope", "--once").exit_code == 3


@pytest.mark.usefixtures("cli_mode")
def test_cli_campaign_view(qmtl_env: dict[str, str], camp_dir: Path, tmp_path: Path) -> None:
    returns = tmp_path / "r.csv"
    rng = np.random.default_rng(1)
    rows = "".join(f"{(datetime(2024, 1, 1) + timedelta(days=i)).date()},{v:.6f}\n"
                   for i, v in enumerate(rng.normal(0.001, 0.01, 400)))
    returns.write_text("timestamp,alpha\n" + rows)
    assert qmtl("world", "evaluate", WORLD, "--strategy", "alpha", "--returns", str(returns)).exit_code == 0
    doc = qmtl("world", "campaign", WORLD, "--json").json()
    s = doc["strategies"][0]
    assert s["phase"] == "backtest_campaign" and s["next_action"]["action"] == "promote_to_paper"
    assert s["progress"][0]["label"] == "backtest 399/300d, 400/250 obs" and s["progress"][0]["satisfied"]
    human = qmtl("world", "campaign", WORLD, "--strategy", "alpha")
    assert human.exit_code == 0 and "next: promote_to_paper" in human.stdout and "█" in human.stdout
    assert qmtl("world", "campaign", WORLD, "--strategy", "zzz").exit_code == 3
    plan = qmtl("world", "campaign-loop", "--all", "--once")
    assert plan.exit_code == 0 and "promote_to_paper" in plan.stdout and "nothing executed" in plan.stdout


# --- property: executing the plan, then ticking again, never repeats an action ---------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 4), means=st.lists(st.sampled_from([0.003, -0.003]), min_size=4, max_size=4),
       days=st.sampled_from([0, 3, 9, 12]), mode=st.sampled_from(["manual_approval", "auto_apply", "disabled"]))
def test_property_execute_then_tick_repeats_nothing(tmp_path_factory: pytest.TempPathFactory, n: int,
                                                    means: list[float], days: int, mode: str) -> None:
    from tests.test_governance import policy_text

    root = tmp_path_factory.mktemp("prop")
    (root / "worlds").mkdir()
    (root / "worlds" / "gov.yaml").write_text(policy_text(mode=mode))
    svc = make_service(f"sqlite:///{root / 's.db'}", root / "worlds", root / "home", Clock(T0))
    try:
        rng = np.random.default_rng(n)
        ids = tuple(f"s{i}" for i in range(n))
        stamps = tuple(datetime(2024, 1, 1, tzinfo=timezone.utc) + timedelta(days=i) for i in range(400))
        matrix = np.vstack([rng.normal(means[i], 0.01, 400) for i in range(n)])
        svc.evaluate_cohort("gov", stage="backtest", returns=ReturnsTable(ids, stamps, matrix))
        loop = lambda: svc.campaign_iteration(["gov"], execute=True, holder="h",  # noqa: E731
                                              lease_ttl=timedelta(minutes=5))[0]
        loop()
        if days:
            svc.clock.advance(days=days)  # paper returns observed after the loop took them to paper
            now = svc.clock()
            svc.as_actor("risk", role="producer").put_risk_snapshot(parse_snapshot({
                "world_id": "gov", "version": "p", "as_of": now.isoformat(), "ttl_sec": 3600,
                "weights": {sid: 1.0 / n for sid in ids},
                "realized_returns": {sid: [{"ts": (T0 + timedelta(days=i)).isoformat(), "r": 0.002}
                                           for i in range(days)] for sid in ids},
                "provenance": {"actor": "risk", "stage": "paper"}}))
        executed: set[str] = set()
        for _ in range(4):
            out = loop()
            keys = [a["idempotency_key"] for a in out.actions if a["outcome"] == "executed"]
            assert not set(keys) & executed, "an executed key came back"
            executed |= set(keys)
        first, second = svc.campaign_tick("gov"), svc.campaign_tick("gov")
        assert [a.to_dict() for a in first] == [a.to_dict() for a in second]  # deterministic
        assert not [a for a in first if a.executable and a.idempotency_key in executed]
        assert not [a for a in first if a.executable]  # a fixed point: nothing left to do
        assert svc.audit_verify().ok
    finally:
        svc.close()
