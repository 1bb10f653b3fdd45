"""`qmtl run --domain shadow`: live inputs mirrored, every order blocked and counted, the shadow run
recorded like paper and read by the live gate when the world asks for a shadow window."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.cli_helpers import enter_stage_at, qmtl
from tests.test_run import (  # noqa: F401 - fixtures: broker, _fresh_runner (autouse)
    ALWAYS_LONG, GOOG, PAPER_SINCE, Broker, _bars, _fresh_runner, broker)

pytestmark = pytest.mark.usefixtures("cli_mode")  # local store, then through the HTTP API
WORLD = "shadow-test"
POLICY = """\
world: shadow-test
policy_version: 1
allow_live: true
periods_per_year: 252
costs: {fee_bps: 1.0, slippage_bps: 2.0}
rules:
  - {id: sharpe, metric: sharpe, min: 0.3, stages: [backtest]}
  - {id: drawdown, metric: max_drawdown, max: 0.9}
  - {id: shadow_vol, metric: annual_volatility, max: 5.0, stages: [shadow]}
campaign:
  backtest: {window: 365d, min_observations: 200}
  paper: {window: 30d, min_observations: 20}
  shadow: {window: 60d, min_observations: 40}
governance:
  live_promotion: {mode: manual_approval, approvers: [alice, bob], required_approvals: 1}
risk: {snapshot_max_age: 1h, decision_ttl: 10m}
"""
@pytest.fixture
def setup(qmtl_env: dict[str, str], worlds_dir: Path, tmp_path: Path) -> dict[str, Any]:
    (worlds_dir / f"{WORLD}.yaml").write_text(POLICY)
    strat = tmp_path / "always_long.py"
    strat.write_text(ALWAYS_LONG)
    return {"strategy": str(strat),
            "hist": _bars(tmp_path, "hist.csv", "2004-01-01", "2012-06-01"),
            "a": _bars(tmp_path, "a.csv", "2012-06-04", "2012-07-31"),
            "b": _bars(tmp_path, "b.csv", "2012-08-01", "2012-10-31")}


def _shadow_progress(sid: str) -> dict[str, Any]:
    (view,) = qmtl("world", "campaign", WORLD, "--strategy", sid, "--json").json()["strategies"]
    return next(p for p in view["progress"] if p["stage"] == "shadow")


def test_shadow_run_records_evidence_and_blocks_every_order(setup: dict[str, Any], broker: Broker,
                                                           tmp_path: Path) -> None:
    strat, (hist, _) = setup["strategy"], setup["hist"]
    sub = qmtl("submit", strat, "--world", WORLD, "--data", str(hist), "--domain", "shadow", "--json")
    assert sub.exit_code == 0, sub.stderr
    doc = sub.json()
    sid = doc["strategy_id"]
    assert doc["execution_domain"] == "shadow"
    assert doc["queues"] == [f"{WORLD}.shadow.mirror.price"]  # the live input's mirror, never .live.
    loop = qmtl("world", "campaign-loop", "--world", WORLD, "--once", "--execute", "--json")
    assert '"promote_to_paper"' in loop.stdout, loop.stdout + loop.stderr
    enter_stage_at(WORLD, sid, PAPER_SINCE)  # shadow counts from paper entry; the bars are real, past ones

    # before any shadow data the live gate names the shadow window, with how to feed it
    dry = qmtl("promote", sid, "--world", WORLD, "--dry-run", "--json").json()
    shadow_reason = next(r for r in dry["gate"]["reasons"] if r["code"] == "shadow_window_incomplete")
    assert "shadow 0/60d, 0/40 obs" in shadow_reason["detail"] and "--domain shadow" in shadow_reason["detail"]
    assert _shadow_progress(sid)["n_observations"] == 0

    a, n_a = setup["a"]
    ran = qmtl("run", strat, "--world", WORLD, "--data", str(a), "--domain", "shadow",
               "--broker-webhook", broker.url, "--json")
    assert ran.exit_code == 0, ran.stderr
    fed = ran.json()
    assert (fed["stage"], fed["execution_domain"]) == ("shadow", "shadow")
    # the last bar's order was built, stopped by the gate and counted; the broker saw nothing
    assert [o["execution_domain"] for o in fed["orders"]["emitted"]] == ["shadow"]
    assert fed["orders"]["published"] == 0 and fed["orders"]["blocked"] == {"domain_shadow": 1}
    assert broker.orders == [] and "--broker-webhook not used" in fed["note"]
    run = fed["run"]
    assert (run["stage"], run["run_id"], run["revision"]) == ("shadow", "shadow-from-20120604", 1)
    assert run["window"]["n_observations"] == n_a
    assert run["evidence_class"] == "qmtl replay"  # qmtl's own replay, in the paper stay: it counts
    # the shadow-only rule is checked on the shadow run
    assert "shadow_vol" in [r["id"] for r in run["rules"]]
    progress = _shadow_progress(sid)
    assert progress["n_observations"] == n_a and not progress["satisfied"]

    # paper keeps its own series of bars: the same bars are new to it, and its run has no shadow rule
    paper = qmtl("run", strat, "--world", WORLD, "--data", str(a), "--json").json()
    assert (paper["stage"], paper["bars"]["new"]) == ("paper", n_a)
    assert "shadow_vol" not in [r["id"] for r in paper["run"]["rules"]]

    # more shadow bars: the same run, next revision, and the window is satisfied on data
    b, n_b = setup["b"]
    more = qmtl("run", strat, "--world", WORLD, "--data", str(b), "--domain", "shadow", "--json").json()
    assert (more["run"]["run_id"], more["run"]["revision"]) == ("shadow-from-20120604", 2)
    assert more["run"]["window"]["n_observations"] == n_a + n_b
    assert _shadow_progress(sid)["satisfied"]
    after = qmtl("promote", sid, "--world", WORLD, "--dry-run", "--json").json()
    assert "shadow_window_incomplete" not in [r["code"] for r in after["gate"]["reasons"]], after["gate"]
    assert after["gate"]["evidence"]["shadow_run"]["revision"] == 2  # bound into the evidence hash
    assert broker.orders == []
    human = qmtl("world", "campaign", WORLD, "--strategy", sid)
    assert "shadow" in human.stdout and f"{n_a + n_b}/40 obs" in human.stdout
    out = tmp_path / "report.html"
    assert qmtl("world", "report", WORLD, "--strategy", sid, "--out", str(out)).exit_code == 0
    page = out.read_text()
    assert f"{n_a + n_b}/40 obs" in page  # the report shows the shadow segment too
    # the live gate's shadow window condition is a gate row with its evidence, beside the shadow rules
    gates = re.findall(r"<tr title=\"[^\"]*\"><td>shadow</td><td>([^<]*)</td>.*?</tr>", page, flags=re.S)
    assert gates[:2] == ["shadow window (live gate)", "drawdown"] and "shadow_vol" in gates, gates
    row = re.search(r"<td>shadow window \(live gate\)</td>.*?</tr>", page, flags=re.S).group(0)
    assert f"{n_a + n_b}/40 obs" in row and "≥ 60d, ≥ 40 obs" in row and 'class="status-pass"' in row
    (shadow_run,) = qmtl("world", "runs", WORLD, "--stage", "shadow", "--json").json()["runs"]
    assert f"shadow run shadow-from-20120604#2 ({shadow_run['evidence_class']})" in row  # its provenance
    # and the shadow stage in the zoomed chart and the distributions, on the backtest's scale
    chart = re.search(r'<figure class="chart" data-chart="stages">(.*?)</figure>', page, flags=re.S).group(1)
    assert f"shadow ({n_a + n_b} obs)" in chart and f"backtest, last {n_a + n_b} obs" in chart
    assert "return distributions" in chart and f"paper ({n_a})" in chart
    # Shadow returns typed into a request are unverified: recorded, shown, never counted.
    typed = tmp_path / "typed.csv"
    typed.write_text("timestamp,r\n" + "".join(f"2012-11-{d:02d},0.001\n" for d in range(1, 29)))
    told = qmtl("world", "evaluate", WORLD, "--strategy", sid, "--stage", "shadow", "--returns", str(typed), "--json")
    assert told.json()["evidence_class"] == "unverified", told.stdout + told.stderr
    gate = qmtl("promote", sid, "--world", WORLD, "--dry-run", "--json").json()["gate"]
    assert {"evidence_untrusted", "shadow_window_incomplete"} <= {r["code"] for r in gate["reasons"]}


def test_shadow_domain_is_the_only_one_that_can_be_asked_for(setup: dict[str, Any]) -> None:
    strat, (hist, _) = setup["strategy"], setup["hist"]
    assert qmtl("submit", strat, "--world", WORLD, "--data", str(hist)).exit_code == 0
    asked = qmtl("run", strat, "--world", WORLD, "--data", str(setup["a"][0]), "--domain", "live")
    assert asked.exit_code == 2 and "only shadow can be asked for" in asked.stderr
    # a strategy still in backtest can be shadowed (orders off), but paper has nothing to feed
    assert qmtl("run", strat, "--world", WORLD, "--data", str(setup["a"][0]), "--domain", "shadow").exit_code == 0
    assert qmtl("run", strat, "--world", WORLD, "--data", str(setup["a"][0])).exit_code == 10


def test_shadow_bars_must_follow_the_backtest_data(setup: dict[str, Any]) -> None:
    strat, (hist, _) = setup["strategy"], setup["hist"]
    assert qmtl("submit", strat, "--world", WORLD, "--data", str(hist)).exit_code == 0
    inside = qmtl("run", strat, "--world", WORLD, "--data", str(GOOG), "--domain", "shadow")
    assert inside.exit_code == 2 and "backtested on" in inside.stderr
    runs = qmtl("world", "runs", WORLD, "--stage", "shadow", "--json").json()["runs"]
    assert runs == []
