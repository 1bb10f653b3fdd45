"""Extra metrics: computed ones checked against reference implementations (empyrical, plain loops)
on the GOOG-based demo returns; declared ones carried from metrics files and gated by name; an
undeclared name in a rule is a located error with did-you-mean."""

from __future__ import annotations

import json
import math
from pathlib import Path

import empyrical
import numpy as np
import pytest

from qmtl_core.errors import DataFileError, PolicyError
from qmtl_core.extra_metrics import alpha_beta, n_trades_per_year, sharpe_stability, time_under_water
from qmtl_core.policy import load_policy_text
from tests.cli_helpers import qmtl
from tests.test_portfolio import demo_returns

DEMO = Path(__file__).resolve().parent.parent / "worlds" / "data" / "demo-returns.csv"


def _underwater_reference(r: np.ndarray) -> int:
    """The longest drawdown the slow way: walk the wealth curve, count periods below the peak."""
    wealth, peak, run, longest = 1.0, 1.0, 0, 0
    for x in r:
        wealth *= 1.0 + x
        if wealth < peak:
            run += 1
        else:
            peak, run = wealth, 0
        longest = max(longest, run)
    return longest


@pytest.mark.parametrize("column", ["buy_hold", "sma_10_30", "short_hold"])
def test_computed_extras_match_references_on_demo_returns(column: str) -> None:
    _, m = demo_returns([column, "buy_hold"], last=1500)
    r, bench = m[:, 0], m[:, 1]
    assert time_under_water(r) == _underwater_reference(r) and time_under_water(r) > 20
    alpha, beta = alpha_beta(r, bench, 252)
    ref_alpha, ref_beta = empyrical.alpha_beta(r, bench, risk_free=0.0, annualization=252)
    assert beta == pytest.approx(ref_beta, rel=1e-9) and alpha == pytest.approx(ref_alpha, rel=1e-9, abs=1e-12)
    half = len(r) // 2
    expected = (empyrical.sharpe_ratio(r[half:], annualization=252)
                - empyrical.sharpe_ratio(r[:half], annualization=252))
    assert sharpe_stability(r, 252) == pytest.approx(expected, rel=1e-9)


def test_extras_edge_cases() -> None:
    assert time_under_water(np.array([0.01, 0.02, 0.0])) == 0.0
    assert time_under_water(np.array([-0.1, 0.05, 0.05, 0.01])) == 3.0  # below 1.0 until the last period
    assert math.isnan(alpha_beta(np.array([0.01, 0.02]), np.array([0.01, 0.01]), 252)[1])  # flat benchmark
    assert math.isnan(sharpe_stability(np.array([0.01, 0.02, 0.03]), 252))
    assert n_trades_per_year(126, 504, 252) == pytest.approx(63.0)
    assert n_trades_per_year(None, 504, 252) is None


BASE = "world: w\npolicy_version: 1\n"


def test_rules_may_name_declared_and_portfolio_metrics() -> None:
    policy = load_policy_text(BASE + "metrics:\n  turnover: {description: annual turnover, better: lower}\n"
                              "rules:\n  - {id: t, metric: turnover, max: 5}\n"
                              "  - {id: ivar, metric: incremental_var_99, max: 0.002, stages: [paper]}\n"
                              "  - {id: crash, metric: stress_loss.crash_2008, max: 0.2}\n", file="w.yaml")
    assert [r.metric for r in policy.rules] == ["turnover", "incremental_var_99", "stress_loss.crash_2008"]
    assert policy.metrics["turnover"].better == "lower"


@pytest.mark.parametrize("text, line, needle", [
    (BASE + "metrics:\n  turnover: {better: lower}\nrules:\n  - {id: t, metric: turnovr, max: 5}\n", 6,
     "unknown metric 'turnovr' (did you mean 'turnover'?)"),
    (BASE + "rules:\n  - {id: t, metric: turnover, max: 5}\n", 4, "declare an extra metric under metrics:"),
    (BASE + "metrics:\n  sharpe: {better: higher}\n", 4, "metric 'sharpe' is built in"),
    (BASE + "metrics:\n  Turn-Over: {}\n", 4, "must be lower case"),
    (BASE + "metrics:\n  turnover: {better: up}\n", 4, "'higher' or 'lower'"),
    (BASE + "selection:\n  top_k: {metric: incremental_var_9, k: 2, order: asc}\n", 4,
     "did you mean 'incremental_var_99'"),
])
def test_unknown_or_bad_metric_names_are_located(text: str, line: int, needle: str) -> None:
    with pytest.raises(PolicyError) as err:
        load_policy_text(text, file="w.yaml")
    assert err.value.line == line and needle in err.value.message, err.value.message


# --- through the CLI, locally and over HTTP ----------------------------------------------------------
@pytest.fixture
def env(tmp_path: Path, worlds_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("QMTL_WORLDS_DIR", str(worlds_dir))
    (worlds_dir / "desk.yaml").write_text("""\
world: desk
policy_version: 1
benchmark: buy_hold
metrics:
  turnover: {description: one-way turnover per year, better: lower}
rules:
  - {id: turnover, metric: turnover, max: 12}
  - {id: beta, metric: beta, max: 0.8}
  - {id: underwater, metric: time_under_water, max: 400, severity: soft}
  - {id: pace, metric: n_trades_per_year, max: 50, severity: info}
""")
    return tmp_path


@pytest.mark.usefixtures("cli_mode")
def test_declared_extra_from_a_metrics_file_gates(env: Path) -> None:
    metrics = env / "m.json"
    metrics.write_text(json.dumps({"strategies": {
        "calm": {"beta": 0.2, "time_under_water": 10, "n_trades": 40, "n_observations": 504,
                 "extra": {"turnover": 3.5}},
        "churn": {"beta": 0.2, "time_under_water": 10, "extra": {"turnover": 40.0}}}}))
    ran = qmtl("world", "evaluate", "desk", "--metrics", str(metrics), "--json")
    assert ran.exit_code == 10, ran.stdout + ran.stderr
    by_id = {s["strategy_id"]: s for s in ran.json()["strategies"]}
    rule = {s: {r["id"]: r for r in by_id[s]["rules"]} for s in by_id}
    assert rule["calm"]["turnover"]["status"] == "pass" and rule["churn"]["turnover"]["status"] == "fail"
    assert by_id["churn"]["metric_sources"]["turnover"] == "request.metrics"
    assert rule["calm"]["pace"]["observed"] == pytest.approx(20.0)  # 40 trades over 2 years
    assert by_id["calm"]["metric_sources"]["n_trades_per_year"] == "derived"


@pytest.mark.usefixtures("cli_mode")
def test_beta_against_the_policys_benchmark_column(env: Path) -> None:
    ran = qmtl("world", "evaluate", "desk", "--returns", str(DEMO), "--json")
    by_id = {s["strategy_id"]: s for s in ran.json()["strategies"]}
    assert by_id["buy_hold"]["metrics"]["beta"] == pytest.approx(1.0)
    assert by_id["short_hold"]["metrics"]["beta"] == pytest.approx(-1.0, abs=0.01)
    _, m = demo_returns(["sma_10_30", "buy_hold"], last=10_000)
    assert by_id["sma_10_30"]["metrics"]["beta"] == pytest.approx(
        empyrical.beta(m[:, 0], m[:, 1]), rel=1e-6)
    beta_rule = next(r for r in by_id["buy_hold"]["rules"] if r["id"] == "beta")
    assert beta_rule["status"] == "fail" and beta_rule["source"] == "request.returns"


def test_metrics_file_extra_names_are_checked(tmp_path: Path) -> None:
    from qmtl_core.datafiles import read_metrics

    good = tmp_path / "m.csv"
    good.write_text("strategy,sharpe,extra.turnover\ns,1.2,3\n")
    assert read_metrics(good) == {"s": {"sharpe": 1.2, "turnover": 3.0}}
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps({"s": {"extra": {"sharpe": 1.0}}}))
    with pytest.raises(DataFileError, match="built-in metric, not an extra"):
        read_metrics(bad)
    bad.write_text(json.dumps({"s": {"extra": {"Bad Name": 1.0}}}))
    with pytest.raises(DataFileError, match="lower case"):
        read_metrics(bad)
