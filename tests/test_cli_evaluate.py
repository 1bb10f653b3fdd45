"""``qmtl world evaluate W`` over returns and metrics files: exit codes, --explain, --json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli_helpers import qmtl, qmtl_process
from tests.conftest import EXAMPLE_WORLDS

pytestmark = pytest.mark.usefixtures("cli_mode")

DEMO_RETURNS = EXAMPLE_WORLDS / "data" / "demo-returns.csv"


@pytest.fixture
def env(tmp_path: Path, worlds_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("QMTL_WORLDS_DIR", str(worlds_dir))
    return tmp_path


def test_bundled_returns_explain_json(env: Path) -> None:
    ran = qmtl("world", "evaluate", "demo-momentum", "--returns", str(DEMO_RETURNS), "--json")
    assert ran.exit_code == 10  # short_hold fails blocking gates
    doc = ran.json()
    by_id = {s["strategy_id"]: s for s in doc["strategies"]}
    assert by_id["short_hold"]["status"] == "fail" and not by_id["short_hold"]["selected"]
    assert by_id["short_hold"]["selection_reason"] == "failed a blocking gate"
    # n_trades is not in a returns file: a soft rule, so a warning (on_missing_metric: fail).
    trades = next(r for r in by_id["buy_hold"]["rules"] if r["id"] == "trades")
    assert trades["status"] == "fail" and trades["severity"] == "soft" and trades["observed"] is None
    sharpe = next(r for r in by_id["buy_hold"]["rules"] if r["id"] == "sharpe")
    assert sharpe["source"] == "request.returns" and sharpe["observed"] == pytest.approx(
        by_id["buy_hold"]["metrics"]["sharpe"])
    # The late joiner has too little history for the backtest-only history rule.
    late = next(r for r in by_id["sma_10_30_late"]["rules"] if r["id"] == "history")
    assert late["status"] == "fail"
    assert doc["selected"] and all(by_id[s]["status"] != "fail" for s in doc["selected"])
    assert doc["n_trials"] is None  # no rule reads dsr, so no trials are counted


def test_explain_human_output(env: Path) -> None:
    ran = qmtl("world", "evaluate", "demo-momentum", "--returns", str(DEMO_RETURNS), "--explain")
    assert ran.exit_code == 10
    assert "short_hold" in ran.stdout and "below min 0.8" in ran.stdout
    assert "selected (" in ran.stdout and "(blocking, request.returns)" in ran.stdout


def test_all_pass_exits_0_and_metrics_override_returns(env: Path) -> None:
    metrics = env / "m.json"
    metrics.write_text(json.dumps({"strategies": {"a": {"sharpe": 1.5, "max_drawdown": 0.1}}}))
    ran = qmtl("world", "evaluate", "research-sandbox", "--metrics", str(metrics), "--json")
    assert ran.exit_code == 0, ran.stdout
    doc = ran.json()
    # win_rate (soft) is missing → warn, which does not fail the cohort.
    assert doc["status"] == "warn" and doc["selected"] == ["a"]


def test_stage_selects_paper_rules(env: Path) -> None:
    metrics = env / "m.csv"
    metrics.write_text("strategy,sharpe,max_drawdown,cvar_95\ns,0.6,0.1,0.01\n")
    paper = qmtl("world", "evaluate", "demo-momentum", "--metrics", str(metrics), "--stage", "paper",
                 "--json")
    assert paper.exit_code == 0
    assert [r["id"] for r in paper.json()["strategies"][0]["rules"]] == ["drawdown", "paper_sharpe", "tail"]
    backtest = qmtl("world", "evaluate", "demo-momentum", "--metrics", str(metrics), "--json")
    assert backtest.exit_code == 10


def test_previous_active_hysteresis(env: Path) -> None:
    metrics = env / "m.csv"
    metrics.write_text("strategy,sharpe,max_drawdown,n_trades,effective_history_years,cvar_95\n"
                       "old,0.9,0.1,40,3,0.01\nnew,0.9,0.1,40,3,0.01\n")
    doc = qmtl("world", "evaluate", "demo-momentum", "--metrics", str(metrics),
               "--previous-active", "old,gone", "--json").json()
    assert doc["selected"] == ["old"]
    assert any("gone" in n for n in doc["notes"])


def test_bad_input_exit_2_names_row_and_column(env: Path) -> None:
    bad = env / "r.csv"
    bad.write_text("timestamp,a\n2026-01-01,0.01\n2026-01-02,oops\n")
    ran = qmtl_process("world", "evaluate", "demo-momentum", "--returns", str(bad))
    assert ran.exit_code == 2 and "r.csv:3:a" in ran.stderr and ran.stderr.count("\n") == 1
    assert qmtl("world", "evaluate", "demo-momentum").exit_code == 2
    assert qmtl("world", "evaluate", "demo-momentum", "--metrics", str(bad), "--stage", "prod").exit_code == 2
    assert qmtl("world", "evaluate", "nope", "--returns", str(DEMO_RETURNS)).exit_code == 3
