"""Portfolio metrics in recorded runs and the live gate, on SQLite and PostgreSQL: sourced from the
snapshot's covariance and stress against the world's live book, fail closed when an entry is
missing, never taken from the request."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qmtl_core.datafiles import ReturnsTable
from qmtl_core.errors import EvidenceMissing
from qmtl_core.portfolio import portfolio_risk
from qmtl_core.risk import parse_snapshot
from tests._service import Clock, make_service
from tests.test_portfolio import demo_returns

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)
#: The world's strategies are two demo columns (real GOOG-based returns) under short names.
COLUMNS = {"a": "buy_hold", "b": "sma_10_30"}


def policy(*, ivar_max: float = 0.05, stress_max: float = 0.5, extra: str = "", stages: str = "[paper]") -> str:
    return f"""\
world: port
policy_version: 1
allow_live: true
rules:
  - {{id: sharpe, metric: sharpe, min: -5}}
  - {{id: ivar, metric: incremental_var_99, max: {ivar_max}, stages: {stages}}}
  - {{id: worst, metric: stress_loss_max, max: {stress_max}, stages: {stages}}}
{extra}campaign:
  backtest: {{window: 300d, min_observations: 250}}
  paper: {{window: 10d, min_observations: 8}}
governance:
  live_promotion: {{mode: auto_apply, cooldown: 0s, max_live_slots: 3}}
risk: {{snapshot_max_age: 1h}}
"""


class World:
    """The ``port`` world on one store, with helpers to post real-data snapshots."""

    def __init__(self, svc: Any) -> None:
        self.svc = svc
        stamps, matrix = demo_returns(list(COLUMNS.values()), last=400)
        self.matrix = matrix
        self.cov = np.cov(matrix, rowvar=False, ddof=1)

    def backtest(self) -> None:
        stamps = tuple(datetime(2024, 1, 1, tzinfo=timezone.utc) + timedelta(days=i) for i in range(400))
        self.svc.evaluate_cohort("port", stage="backtest",
                                 returns=ReturnsTable(tuple(COLUMNS), stamps, np.ascontiguousarray(self.matrix.T)))
        self.loop()
        self.svc.clock.advance(days=12)  # paper returns count only when observed after entry (T0)

    def loop(self) -> Any:
        return self.svc.campaign_iteration(["port"], execute=True, holder="t", lease_ttl=timedelta(minutes=5))[0]

    def doc(self, version: str, *, weights: dict[str, float], covariance: bool = True,
            drop: str | None = None, stress: dict[str, Any] | None = None, stage: str = "paper") -> dict[str, Any]:
        now = self.svc.clock()
        names = list(COLUMNS)
        rets = {sid: [{"ts": (now - timedelta(days=12 - i)).isoformat(), "r": float(self.matrix[-12 + i, k])}
                      for i in range(12)] for k, sid in enumerate(names)}
        doc: dict[str, Any] = {"world_id": "port", "version": version, "as_of": now.isoformat(), "ttl_sec": 3600,
                               "weights": weights, "realized_returns": rets,
                               "provenance": {"actor": "risk", "stage": stage}}
        if covariance:
            doc["covariance"] = {f"{x},{y}": float(self.cov[i, j]) for i, x in enumerate(names)
                                 for j, y in enumerate(names) if j >= i and f"{x},{y}" != drop}
        worst = int(np.argmin(self.matrix[:, 0]))  # GOOG's worst day in the window: a historical scenario
        doc["stress"] = stress if stress is not None else {
            "worst_day": {sid: float(self.matrix[worst, k]) for k, sid in enumerate(names)}}
        return doc

    def put(self, doc: dict[str, Any]) -> Any:
        """Posted by a trusted producer: the only snapshots decisions read (DESIGN §11)."""
        return self.svc.as_actor("risk", role="producer").put_risk_snapshot(parse_snapshot(doc))


@pytest.fixture
def world(store_url: str, worlds_dir: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    (worlds_dir / "port.yaml").write_text(policy())
    service = make_service(store_url, worlds_dir, tmp_path / "home", Clock(T0)).as_actor("cron")
    w = World(service)
    w.backtest()
    yield w
    service.close()


def _paper_runs(svc: Any, sid: str) -> list[Any]:
    return svc.list_runs("port", strategy_id=sid, stage="paper")


def test_missing_covariance_fails_closed_and_writes_nothing(world: World) -> None:
    svc = world.svc
    assert {v.strategy_id: v.stage for v in svc.campaign("port")} == {"a": "paper", "b": "paper"}
    world.put(world.doc("nocov", weights={"a": 0.5, "b": 0.5}, covariance=False))
    with pytest.raises(EvidenceMissing) as err:
        svc.record_evaluation("port", strategy_id="a", stage="paper")
    assert err.value.code == "risk_snapshot_incomplete" and err.value.exit_code == 12
    assert "rule ivar needs incremental_var_99" in err.value.message and "covariance" in err.value.message
    assert _paper_runs(svc, "a") == []


def test_book_metrics_match_the_reference_and_a_live_book_counts(world: World) -> None:
    svc = world.svc
    world.put(world.doc("v1", weights={"a": 0.7, "b": 0.3}))
    run = svc.record_evaluation("port", strategy_id="a", stage="paper")
    assert run.status == "pass", run.rule_results
    var_a = world.cov[0, 0] * 0.7 ** 2
    assert run.metrics["incremental_var_99"] == pytest.approx(2.3263478740408408 * np.sqrt(var_a), rel=1e-9)
    assert run.metric_sources["incremental_var_99"] == "risk_snapshot:v1"
    world.loop()  # auto_apply: a goes live
    assert {v.strategy_id: v.stage for v in svc.campaign("port")}["a"] == "live"

    world.svc.clock.advance(minutes=1)
    doc = world.doc("v2", weights={"a": 0.7, "b": 0.3})
    world.put(doc)
    run_b = svc.record_evaluation("port", strategy_id="b", stage="paper")
    expected = portfolio_risk(parse_snapshot(doc), "b", ["a"], periods_per_year=252)
    w = np.array([0.7, 0.3])
    s_with, s_book = np.sqrt(w @ world.cov @ w), np.sqrt(0.49 * world.cov[0, 0])
    assert run_b.metrics["incremental_var_99"] == pytest.approx(2.3263478740408408 * (s_with - s_book), rel=1e-9)
    assert run_b.metrics["incremental_var_99"] == pytest.approx(expected.metrics["incremental_var_99"])
    assert run_b.metrics["max_corr_live"] == pytest.approx(world.cov[0, 1] / np.sqrt(world.cov[0, 0] * world.cov[1, 1]))
    assert run_b.metric_sources["max_corr_live"] == "risk_snapshot:v2"


def test_a_stress_scenario_blocks_the_candidate(world: World) -> None:
    svc = world.svc
    crash = {"crash": {"a": -0.05, "b": -0.9}}  # b loses 90 %: nothing is live, so the book is b alone
    world.put(world.doc("s1", weights={"a": 0.5, "b": 0.5}, stress=crash))
    run = svc.record_evaluation("port", strategy_id="b", stage="paper")
    worst = next(r for r in run.rule_results if r["id"] == "worst")
    assert run.metrics["stress_loss.crash"] == pytest.approx(0.45)
    assert worst["status"] == "pass"  # 0.45 <= 0.5
    world.svc.clock.advance(minutes=1)
    world.put(world.doc("s2", weights={"a": 0.4, "b": 0.6}, stress=crash))
    run = svc.record_evaluation("port", strategy_id="b", stage="paper")
    worst = next(r for r in run.rule_results if r["id"] == "worst")
    assert run.status == "fail" and worst["status"] == "fail" and worst["observed"] == pytest.approx(0.54)
    assert worst["source"] == "risk_snapshot:s2"


def test_portfolio_metrics_in_the_request_never_count(world: World) -> None:
    svc = world.svc
    world.put(world.doc("v1", weights={"a": 0.4, "b": 0.6},
                        stress={"crash": {"a": -0.9, "b": -0.9}}))
    run = svc.record_evaluation("port", strategy_id="b", stage="paper",
                                metrics={"sharpe": 1.0, "stress_loss_max": 0.0, "incremental_var_99": 0.0})
    assert run.metrics["stress_loss_max"] == pytest.approx(0.54)
    assert run.metric_sources["stress_loss_max"] == "risk_snapshot:v1"
    assert run.status == "fail" and "ignored in the request" in (run.reason or "")


def test_stale_snapshot_is_not_replaced_by_a_previous_run(world: World) -> None:
    svc = world.svc
    world.put(world.doc("v1", weights={"a": 0.5, "b": 0.5}))
    assert svc.record_evaluation("port", strategy_id="b", stage="paper").status == "pass"
    svc.clock.advance(hours=2)  # the snapshot is now lagging
    with pytest.raises(EvidenceMissing) as err:
        svc.record_evaluation("port", strategy_id="b", stage="paper", run_id="again")
    assert err.value.code in ("risk_snapshot_expired", "risk_snapshot_lagging")


def test_cohort_recording_is_all_or_nothing(world: World) -> None:
    svc = world.svc
    world.put(world.doc("v1", weights={"a": 0.5, "b": 0.5}, drop="b,b"))
    stamps = tuple(T0 - timedelta(days=12 - i) for i in range(12))
    table = ReturnsTable(("a", "b"), stamps, np.ascontiguousarray(world.matrix[-12:].T))
    with pytest.raises(EvidenceMissing) as err:
        svc.evaluate_cohort("port", stage="paper", returns=table)
    assert err.value.code == "risk_snapshot_incomplete" and "b,b" in err.value.message
    assert _paper_runs(svc, "a") == [] and _paper_runs(svc, "b") == []


# --- the live gate re-measures the book at decision time ------------------------------------------------
def _a_live_b_passed(world: World) -> Any:
    """``a`` live; ``b`` with a passing paper run measured against it. Returns b's run."""
    svc = world.svc
    world.put(world.doc("v1", weights={"a": 0.5, "b": 0.5}))
    svc.record_evaluation("port", strategy_id="a", stage="paper")
    assert svc.promote("port", "a").exit_code == 0  # auto_apply: live at once (not the loop, which would take b too)
    assert {v.strategy_id: v.stage for v in svc.campaign("port")}["a"] == "live"
    svc.clock.advance(minutes=1)
    world.put(world.doc("v2", weights={"a": 0.5, "b": 0.5}))
    run = svc.record_evaluation("port", strategy_id="b", stage="paper")
    assert run.status == "pass", run.rule_results
    return run


def test_a_stress_scenario_posted_after_the_paper_run_blocks_going_live(world: World) -> None:
    svc = world.svc
    _a_live_b_passed(world)
    svc.clock.advance(minutes=1)
    # The same data, but the risk desk adds a scenario where both lose: the book with b loses 60 %.
    world.put(world.doc("v3", weights={"a": 0.5, "b": 0.5}, stress={"gap_down": {"a": -0.6, "b": -0.6}}))
    out = svc.promote("port", "b")
    assert out.status == "blocked" and out.exit_code == 10, out.to_dict()
    reason = next(r for r in out.gate.reasons if r.code == "portfolio_limit_exceeded")
    assert "rule worst" in reason.detail and "0.6 is above max 0.5" in reason.detail
    assert "book: a" in reason.detail and "risk_snapshot:v3" in reason.detail
    assert out.gate.evidence["portfolio"]["metrics"]["stress_loss_max"] == pytest.approx(0.6)
    plan = world.loop()
    assert {v.strategy_id: v.stage for v in svc.campaign("port")}["b"] == "paper"
    assert any(a["strategy_id"] == "b" and a["reason"] == "portfolio_limit_exceeded" for a in plan.actions), plan.actions


def test_a_covariance_entry_missing_at_decision_time_fails_closed(world: World) -> None:
    svc = world.svc
    _a_live_b_passed(world)
    svc.clock.advance(minutes=1)
    world.put(world.doc("v3", weights={"a": 0.5, "b": 0.5}, drop="a,b"))
    out = svc.promote("port", "b")
    assert out.exit_code == 12 and "risk_snapshot_incomplete" in out.gate.codes, out.to_dict()
    detail = next(r.detail for r in out.gate.reasons if r.code == "risk_snapshot_incomplete")
    assert "rule ivar needs incremental_var_99" in detail and "covariance" in detail
    assert {v.strategy_id: v.stage for v in svc.campaign("port")}["b"] == "paper"


def test_the_gate_lets_a_candidate_within_limits_go_live(world: World) -> None:
    svc = world.svc
    _a_live_b_passed(world)
    out = svc.promote("port", "b")
    assert out.exit_code == 0, out.to_dict()
    assert out.gate.evidence["portfolio"]["book"] == ["a"]
    assert {v.strategy_id: v.stage for v in svc.campaign("port")}["b"] == "live"


# --- each decision reads the newest trusted snapshot of its own stage (issue 19's hub) ----------------------
def test_paper_and_live_decisions_read_their_own_stages_snapshot(store_url: str, worlds_dir: Path,
                                                                 tmp_path: Path) -> None:
    (worlds_dir / "port.yaml").write_text(policy(stages="[paper, live]"))
    svc = make_service(store_url, worlds_dir, tmp_path / "home", Clock(T0)).as_actor("cron")
    try:
        world = World(svc)
        world.backtest()
        _a_live_b_passed(world)
        svc.clock.advance(days=13)  # live returns count only when observed after a went live
        paper_ok = world.doc("p1", weights={"a": 0.5, "b": 0.5})
        world.put(paper_ok)
        svc.clock.advance(minutes=1)
        # The live desk's snapshot is newer and weighs the book otherwise: it must not hide the paper one.
        live = world.doc("l1", weights={"a": 0.8, "b": 0.2}, stage="live")
        world.put(live)

        run_b = svc.record_evaluation("port", strategy_id="b", stage="paper")
        expected = portfolio_risk(parse_snapshot(paper_ok), "b", ["a"], periods_per_year=252)
        assert run_b.metric_sources["incremental_var_99"] == "risk_snapshot:p1"
        assert run_b.metrics["incremental_var_99"] == pytest.approx(expected.metrics["incremental_var_99"], rel=1e-12)
        run_a = svc.record_evaluation("port", strategy_id="a", stage="live")
        assert run_a.metric_sources["incremental_var_99"] == "risk_snapshot:l1"
        var_a = world.cov[0, 0] * 0.8 ** 2  # a alone (b is in paper, not in the live book)
        assert run_a.metrics["incremental_var_99"] == pytest.approx(2.3263478740408408 * np.sqrt(var_a), rel=1e-9)

        # Now the paper snapshot (the same returns, so no new run) carries a scenario that breaks the
        # book; a newer live one does not.
        svc.clock.advance(minutes=1)
        world.put({**paper_ok, "version": "p2", "as_of": svc.clock().isoformat(),
                   "stress": {"gap_down": {"a": -0.6, "b": -0.6}}})
        svc.clock.advance(minutes=1)
        world.put(world.doc("l2", weights={"a": 0.8, "b": 0.2}, stage="live"))
        out = svc.promote("port", "b")  # the live gate decides on b's paper evidence: the paper snapshot
        assert out.exit_code == 10 and "portfolio_limit_exceeded" in out.gate.codes, out.to_dict()
        assert out.gate.evidence["portfolio"]["source"] == "risk_snapshot:p2"
        plan = world.loop()  # the tick's portfolio step reads the same snapshot
        blocked = next(a for a in plan.actions if a["strategy_id"] == "b")
        assert blocked["reason"] == "portfolio_limit_exceeded" and "risk_snapshot:p2" in blocked["detail"]
        assert {v.strategy_id: v.stage for v in svc.campaign("port")}["b"] == "paper"
        assert svc.record_evaluation("port", strategy_id="a", stage="live",
                                     run_id="again").metric_sources["stress_loss_max"] == "risk_snapshot:l2"
    finally:
        svc.close()


def test_incomplete_covariance_by_reference_fails_closed(world: World, tmp_path: Path) -> None:
    import hashlib
    import json

    svc = world.svc
    doc = world.doc("ref1", weights={"a": 0.5, "b": 0.5}, drop="b,b")
    refs = svc.settings.risk_refs_dir
    refs.mkdir(parents=True, exist_ok=True)
    data = json.dumps(doc.pop("covariance")).encode()
    (refs / "cov.json").write_bytes(data)
    doc["covariance_ref"] = f"cov.json#sha256={hashlib.sha256(data).hexdigest()}"
    stored, _ = world.put(doc)
    assert stored.snapshot.covariance is not None and "b,b" not in stored.snapshot.covariance  # resolved inline
    with pytest.raises(EvidenceMissing) as err:
        svc.record_evaluation("port", strategy_id="b", stage="paper")
    assert err.value.exit_code == 12 and err.value.code == "risk_snapshot_incomplete"
    assert "covariance b,b" in err.value.message and "ref1" in err.value.message
    assert _paper_runs(svc, "b") == []
    whole = world.doc("ref2", weights={"a": 0.5, "b": 0.5})
    data = json.dumps(whole.pop("covariance")).encode()
    (refs / "cov2.json").write_bytes(data)
    whole["covariance_ref"] = f"cov2.json#sha256={hashlib.sha256(data).hexdigest()}"
    svc.clock.advance(minutes=1)
    world.put(whole)
    run = svc.record_evaluation("port", strategy_id="b", stage="paper")
    assert run.metric_sources["incremental_var_99"] == "risk_snapshot:ref2" and run.status == "pass"


# --- shown with their source: evaluate --explain and the report, locally and over HTTP ---------------------
@pytest.mark.usefixtures("cli_mode")
def test_explain_and_report_show_portfolio_metrics_with_their_source(qmtl_env: dict[str, str], store_url: str,
                                                                    worlds_dir: Path, tmp_path: Path) -> None:
    from tests.cli_helpers import qmtl

    (worlds_dir / "port.yaml").write_text(policy())
    now = datetime.now(timezone.utc).replace(microsecond=0)
    # As the local identity the CLI acts as: a submitter records runs only for its own strategies.
    service = make_service(store_url, worlds_dir, tmp_path / "svc-home", Clock(now))
    try:
        w = World(service)
        w.backtest()
        w.put(w.doc("v1", weights={"a": 0.5, "b": 0.5}))
    finally:
        service.close()
    ran = qmtl("world", "evaluate", "port", "--strategy", "b", "--stage", "paper", "--explain")
    assert ran.exit_code == 0, ran.stdout + ran.stderr
    assert "portfolio with the book: portfolio_vol" in ran.stdout
    assert "incremental_var_99" in ran.stdout and "(risk_snapshot:v1)" in ran.stdout
    assert "ivar" in ran.stdout and "(blocking, risk_snapshot:v1)" in ran.stdout
    out = tmp_path / "report.html"
    assert qmtl("world", "report", "port", "--strategy", "b", "--out", str(out)).exit_code == 0
    page = out.read_text()
    assert "Portfolio risk with the book" in page and "incremental_var_99" in page
    assert "<code>risk_snapshot:v1</code>" in page


@pytest.mark.usefixtures("cli_mode")
def test_offline_evaluate_measures_the_book_or_says_why_not(qmtl_env: dict[str, str], store_url: str,
                                                           worlds_dir: Path, tmp_path: Path) -> None:
    """Offline evaluation records nothing, but reads the world's book and its newest trusted snapshot
    of the stage: portfolio metrics are measured from it, or named as not measured (exit 12)."""
    import json

    from tests.cli_helpers import qmtl

    (worlds_dir / "port.yaml").write_text(policy())
    now = datetime.now(timezone.utc).replace(microsecond=0)
    service = make_service(store_url, worlds_dir, tmp_path / "svc-home", Clock(now))
    try:
        w = World(service)
        w.backtest()
        returns = tmp_path / "paper.csv"
        returns.write_text("timestamp,b\n" + "".join(
            f"{(now - timedelta(days=30 - i)).date().isoformat()},{float(w.matrix[-30 + i, 1])!r}\n" for i in range(30)))
        none_yet = qmtl("world", "evaluate", "port", "--returns", str(returns), "--stage", "paper", "--explain")
        assert none_yet.exit_code == 12, none_yet.stdout + none_yet.stderr
        assert "incremental_var_99 not measured: the world has no trusted paper risk snapshot" in none_yet.stdout
        doc = w.doc("v1", weights={"a": 0.5, "b": 0.5})
        w.put(doc)
        expected = portfolio_risk(parse_snapshot(doc), "b", [], periods_per_year=252)
    finally:
        service.close()
    ran = qmtl("world", "evaluate", "port", "--returns", str(returns), "--stage", "paper", "--explain")
    assert ran.exit_code == 0, ran.stdout + ran.stderr
    assert "incremental_var_99" in ran.stdout and "(risk_snapshot:v1)" in ran.stdout
    assert "(blocking, risk_snapshot:v1)" in ran.stdout and "not measured" not in ran.stdout
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"b": {"incremental_var_99": 0.0, "stress_loss_max": 0.0}}))
    got = qmtl("world", "evaluate", "port", "--returns", str(returns), "--metrics", str(metrics), "--stage",
               "paper", "--json").json()
    b = got["strategies"][0]
    assert got["exit_code"] == 0 and b["unmeasured"] == {}
    assert b["metrics"]["incremental_var_99"] == pytest.approx(expected.metrics["incremental_var_99"], rel=1e-12)
    assert b["metric_sources"]["stress_loss_max"] == "risk_snapshot:v1"
    assert any("ignored in the metrics file" in n for n in got["notes"])
    later = qmtl("world", "evaluate", "port", "--returns", str(returns), "--stage", "backtest", "--json")
    assert later.exit_code == 0 and later.json()["strategies"][0]["unmeasured"] == {}  # no portfolio rule there


def test_snapshot_extra_metrics_are_sourced_for_declared_rules(store_url: str, worlds_dir: Path, tmp_path: Path) -> None:
    (worlds_dir / "port.yaml").write_text(policy(extra="  - {id: turnover, metric: turnover, max: 10}\n")
                                          .replace("campaign:", "metrics:\n  turnover: {better: lower}\ncampaign:"))
    service = make_service(store_url, worlds_dir, tmp_path / "home", Clock(T0)).as_actor("cron")
    try:
        w = World(service)
        w.backtest()
        doc = w.doc("x1", weights={"a": 0.5, "b": 0.5})
        plain = parse_snapshot(doc).content_hash
        doc["extra_metrics"] = {"b": {"turnover": 14.0}}
        snap = parse_snapshot(doc)
        assert snap.content_hash != plain and "extra_metrics" not in parse_snapshot(w.doc("x1", weights={
            "a": 0.5, "b": 0.5})).canonical()  # absent stays absent: old snapshots keep their hash
        w.put(doc)
        run = service.record_evaluation("port", strategy_id="b", stage="paper")
        rule = next(r for r in run.rule_results if r["id"] == "turnover")
        assert run.metrics["turnover"] == 14.0 and run.metric_sources["turnover"] == "risk_snapshot:x1"
        assert rule["status"] == "fail" and run.status == "fail"
        bad = {**doc, "version": "x2", "extra_metrics": {"b": {"sharpe": 9.0}}}
        with pytest.raises(Exception, match="built in"):
            parse_snapshot(bad)
    finally:
        service.close()
