"""Consistency (drift) checks: the statistics against a reference, the policy's grammar, and runs
on both backends that fail when paper behaves unlike its backtest."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from qmtl_core.consistency import check_consistency, kolmogorov_sf, ks_2samp
from qmtl_core.errors import PolicyError
from qmtl_core.policy import Consistency, load_policy_text
from tests._service import Clock, make_service
from tests.test_governance import Setup

POLICY = """\
world: drift
policy_version: 1
allow_live: true
rules:
  - {id: sharpe, metric: sharpe, min: -5}
consistency:
  - {id: paper_like_backtest, stage: paper, against: backtest, metric: sharpe, max_drop: 2.0, ks_p_min: 0.01}
campaign:
  paper: {window: 10d, min_observations: 8}
governance:
  live_promotion: {mode: manual_approval, approvers: [alice, bob], required_approvals: 1}
risk: {snapshot_max_age: 1h, decision_ttl: 10m}
"""


# --- the statistics ----------------------------------------------------------------------------------
def test_kolmogorov_distribution_reference_values() -> None:
    # Q(λ) = P(K > λ): the familiar critical values 1.36 (5%) and 1.63 (1%), and Q(1) = 0.27000
    assert kolmogorov_sf(1.3581) == pytest.approx(0.05, abs=2e-4)
    assert kolmogorov_sf(1.6276) == pytest.approx(0.01, abs=1e-4)
    assert kolmogorov_sf(1.0) == pytest.approx(0.2699996716735, rel=1e-9)
    assert kolmogorov_sf(0.0) == 1.0 and kolmogorov_sf(0.1) == 1.0 and kolmogorov_sf(10.0) < 1e-80


@pytest.mark.parametrize(("n1", "n2", "shift", "scale"), [(50, 60, 0.0, 1.0), (200, 300, 0.1, 1.0),
                                                          (500, 400, 0.3, 1.0), (30, 1000, 0.0, 1.0),
                                                          (250, 250, 0.0, 3.0)])
def test_ks_matches_scipy(n1: int, n2: int, shift: float, scale: float) -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(n1 + n2)
    a, b = rng.normal(0, 1, n1), rng.normal(shift, scale, n2)
    d, p = ks_2samp(a, b)
    ref = stats.ks_2samp(a, b)  # exact where scipy can, asymptotic otherwise
    assert d == pytest.approx(float(ref.statistic), abs=1e-12)
    assert p == pytest.approx(float(ref.pvalue), abs=0.02)
    if 1e-6 < ref.pvalue < 0.01:  # small p-values agree in relative terms too
        assert 0.75 < p / float(ref.pvalue) < 1.33
    elif ref.pvalue <= 1e-6:  # far in the tail the asymptotic form only keeps the magnitude
        assert p < 1e-5


def test_ks_refuses_empty_or_non_finite() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ks_2samp([], [1.0])
    with pytest.raises(ValueError, match="finite"):
        ks_2samp([float("nan"), 1.0], [1.0])


def test_check_results_and_missing_data() -> None:
    # annualised Sharpe over 120 days has a standard error near 1.5: max_drop must allow for it
    check = Consistency(id="c", stage="paper", against="backtest", max_drop=2.0, ks_p_min=0.05)
    rng = np.random.default_rng(7)
    ref = rng.normal(0.001, 0.01, 400)
    same = check_consistency(check, list(rng.normal(0.001, 0.01, 120)), list(ref), periods_per_year=252)
    assert [(r.id, r.status) for r in same] == [("c", "pass"), ("c.ks", "pass")]
    worse = check_consistency(check, list(rng.normal(-0.003, 0.03, 120)), list(ref), periods_per_year=252)
    assert [(r.id, r.status) for r in worse] == [("c", "fail"), ("c.ks", "fail")]
    assert worse[0].observed is not None and worse[0].observed > 2.0 and "above max_drop" in worse[0].reason
    assert worse[1].observed is not None and worse[1].observed < 0.05 and "do not look like" in worse[1].reason
    # too little data, or no reference at all: never a pass (on_missing_metric decides fail/warn)
    few = check_consistency(check, [0.01] * 5, list(ref), periods_per_year=252)
    assert {r.status for r in few} == {"fail"} and all(r.observed is None for r in few)
    none = check_consistency(check, list(ref), None, periods_per_year=252, on_missing="warn")
    assert {r.status for r in none} == {"warn"} and "no backtest run" in none[0].reason


# --- the policy's grammar ----------------------------------------------------------------------------
@pytest.mark.parametrize(("item", "fragment"), [
    ("{id: c, stage: paper, against: backtest}", "neither max_drop nor ks_p_min"),
    ("{id: c, stage: paper, against: shadow, max_drop: 1}", "does not come before it"),
    ("{id: c, stage: paper, metric: max_drawdown, max_drop: 1}", "not one where more is better"),
    ("{id: c, stage: paper, max_drop: -1}", "max_drop"),
    ("{id: c, stage: paper, ks_p_min: 1.5}", "ks_p_min"),
    ("{id: c, stage: paper, max_dorp: 1}", "max_dorp"),
    ("{id: sharpe, stage: paper, max_drop: 1}", "used twice"),
])
def test_bad_consistency_checks_are_located(item: str, fragment: str) -> None:
    text = POLICY.replace(
        "  - {id: paper_like_backtest, stage: paper, against: backtest, metric: sharpe, max_drop: 2.0, ks_p_min: 0.01}",
        f"  - {item}")
    with pytest.raises(PolicyError) as err:
        load_policy_text(text, file="drift.yaml")
    assert fragment in str(err.value) and "drift.yaml:" in err.value.one_line()


# --- runs on both backends ---------------------------------------------------------------------------
def _series(n: int, mean: float, sd: float, seed: int, start: datetime) -> list[tuple[datetime, float]]:
    values = np.random.default_rng(seed).normal(mean, sd, n)
    return [(start + timedelta(days=i), float(v)) for i, v in enumerate(values)]


@pytest.fixture
def svc(store_url: str, worlds_dir: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    (worlds_dir / "drift.yaml").write_text(POLICY)
    service = make_service(store_url, worlds_dir, tmp_path / "home",
                           Clock(datetime(2026, 3, 2, 12, tzinfo=timezone.utc))).as_actor("cron")
    yield service
    service.close()


def test_paper_unlike_its_backtest_fails_the_run_and_blocks_live(svc) -> None:  # type: ignore[no-untyped-def]
    t0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
    svc.record_evaluation("drift", strategy_id="s", stage="backtest", returns=_series(400, 0.001, 0.01, 1, t0))
    paper_start = datetime(2025, 6, 1, tzinfo=timezone.utc)
    like = svc.record_evaluation("drift", strategy_id="s", stage="paper", run_id="p1",
                                 returns=_series(60, 0.001, 0.01, 2, paper_start))
    assert like.status == "pass"
    assert [r["id"] for r in like.rule_results] == ["sharpe", "paper_like_backtest", "paper_like_backtest.ks"]
    assert like.rule_results[1]["source"] == "consistency:backtest"
    unlike = svc.record_evaluation("drift", strategy_id="s", stage="paper", run_id="p2",
                                   returns=_series(60, -0.01, 0.04, 3, paper_start))
    assert unlike.status == "fail"
    failing = {r["id"] for r in unlike.rule_results if r["status"] == "fail"}
    assert failing == {"paper_like_backtest", "paper_like_backtest.ks"}
    # the live gate reads the failing paper run
    assert "validation_failed" in svc.promote("drift", "s", dry_run=True).gate.codes
    # metrics given as values, with no returns, cannot skip the comparison: it counts as missing
    claimed = svc.record_evaluation("drift", strategy_id="s", stage="paper", run_id="p3",
                                    metrics={"sharpe": 3.0})
    assert claimed.status == "fail"
    assert {r["id"]: r["observed"] for r in claimed.rule_results if r["id"].startswith("paper_like")} == {
        "paper_like_backtest": None, "paper_like_backtest.ks": None}


def test_backtest_runs_are_not_compared(svc) -> None:  # type: ignore[no-untyped-def]
    rev = svc.record_evaluation("drift", strategy_id="s", stage="backtest",
                                returns=_series(300, 0.001, 0.01, 4, datetime(2024, 1, 1, tzinfo=timezone.utc)))
    assert [r["id"] for r in rev.rule_results] == ["sharpe"]


def test_setup_helper_world_without_checks_is_unchanged(store_url: str, worlds_dir: Path, tmp_path: Path) -> None:
    """A world with no consistency list records exactly the rules it had (no new rows)."""
    from tests.test_governance import policy_text

    (worlds_dir / "gov.yaml").write_text(policy_text())
    svc = make_service(store_url, worlds_dir, tmp_path / "h", Clock(datetime.now(timezone.utc))).as_actor("cron")
    Setup(svc).ready("a")
    (run,) = svc.list_runs("gov", strategy_id="a", stage="paper")
    assert [r["id"] for r in run.rule_results] == ["sharpe"]
    svc.close()
