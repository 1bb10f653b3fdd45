"""Metrics that must not be reported from rounding noise, too few observations or the wrong clock.

Both paths (``compute_metrics`` and the ``compute_cohort`` kernel) are checked to agree on each case.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from qmtl_core.errors import BadInputError
from qmtl_core.spacing import SPACING_MIN_OBSERVATIONS, spacing_note
from qmtl_core.metrics import (
    DISPERSION_RESOLUTION,
    MAX_TRIALS,
    PSR_MIN_OBSERVATIONS,
    _deflation_benchmark,
    compute_cohort,
    compute_metrics,
)
from tests.cli_helpers import qmtl


def _both(series: np.ndarray, rel: float = 1e-12, **kwargs: object) -> dict[str, float]:
    one = compute_metrics(series, **kwargs)  # type: ignore[arg-type]
    cohort = compute_cohort(np.asarray(series, dtype=np.float64)[None, :], **kwargs)  # type: ignore[arg-type]
    for key, value in one.items():
        other = float(cohort[key][0])
        assert (math.isnan(value) and math.isnan(other)) or value == pytest.approx(other, rel=rel), key
    return one


@pytest.mark.parametrize("rate", [0.0004, 0.01, -0.0003, 1e-9])
def test_returns_constant_up_to_rounding_are_not_a_sharpe(rate: float) -> None:
    prices = 100.0 * (1.0 + rate) ** np.arange(800)
    r = prices[1:] / prices[:-1] - 1.0
    assert r.min() != r.max()  # not bit-identical: the noise is there
    m = _both(r, n_trials=1000, trials_sharpe_variance=0.5)
    assert m["annual_volatility"] == 0.0
    for key in ("sharpe", "psr", "dsr", "skew", "kurtosis"):
        assert math.isnan(m[key]), (key, m[key])
    assert m["total_return"] == pytest.approx((1.0 + rate) ** 799 - 1.0, rel=1e-9)


def test_real_dispersion_just_above_resolution_is_kept() -> None:
    rng = np.random.default_rng(7)
    r = 0.0004 + rng.normal(0.0, 1e-9, 500)  # tiny but far above float noise at this scale
    assert r.std(ddof=1) > 100 * DISPERSION_RESOLUTION
    m = _both(r, rel=1e-6)  # third and fourth moments of 1e-9 deviations: summation order shows
    assert math.isfinite(m["sharpe"]) and m["annual_volatility"] == pytest.approx(r.std(ddof=1) * math.sqrt(252))


def test_psr_needs_the_documented_minimum_of_observations() -> None:
    assert math.isnan(_both(np.array([0.01, 0.0101]))["psr"])
    rng = np.random.default_rng(3)
    r = rng.normal(0.001, 0.01, PSR_MIN_OBSERVATIONS)
    assert math.isnan(_both(r[:-1], n_trials=1)["psr"])
    assert math.isnan(_both(r[:-1], n_trials=1)["dsr"])
    full = _both(r, n_trials=1)
    assert 0.0 < full["psr"] < 1.0 and full["dsr"] == full["psr"]


@pytest.mark.parametrize("n", [2**53, 2**53 + 1, 10**20, 10**300])
def test_dsr_exact_tail_for_huge_trials(n: int) -> None:
    from statistics import NormalDist

    # The expected maximum z of N trials grows like sqrt(2 ln N); it must keep growing past 2^53.
    z = _deflation_benchmark(n, 252.0, 252.0)
    gamma = 0.5772156649015329
    inv = NormalDist().inv_cdf
    assert z == pytest.approx(-(1 - gamma) * inv(1 / n) - gamma * inv(1 / (n * math.e)), rel=1e-12)
    assert _deflation_benchmark(n * 10, 252.0, 252.0) > z if n * 10 <= MAX_TRIALS else True
    assert _deflation_benchmark(1000, 252.0, 252.0) == pytest.approx(
        (1 - gamma) * inv(1 - 1 / 1000) + gamma * inv(1 - 1 / (1000 * math.e)), rel=1e-12)


def test_dsr_too_many_trials_names_n_trials() -> None:
    r = np.random.default_rng(1).normal(0.001, 0.01, 100)
    with pytest.raises(ValueError, match="n_trials .* too large"):
        compute_metrics(r, n_trials=MAX_TRIALS + 1, trials_sharpe_variance=0.5)
    with pytest.raises(ValueError, match="n_trials .* too large"):
        compute_cohort(r[None, :], n_trials=10**400, trials_sharpe_variance=0.5)


# --- periods_per_year against the timestamps ----------------------------------------------------
def _stamps(n: int, step: timedelta) -> list[datetime]:
    start = datetime(2020, 1, 6, tzinfo=timezone.utc)
    return [start + i * step for i in range(n)]


def _business_days(n: int) -> list[datetime]:
    out: list[datetime] = []
    day = datetime(2020, 1, 6, tzinfo=timezone.utc)
    while len(out) < n:
        if day.weekday() < 5:
            out.append(day)
        day += timedelta(days=1)
    return out


def test_spacing_note() -> None:
    weekly = _stamps(156, timedelta(days=7))
    note = spacing_note(weekly, 252)
    assert note is not None and "52.2 per year" in note and "periods_per_year is 252" in note
    assert spacing_note(weekly, 52) is None
    assert spacing_note(_business_days(500), 252) is None  # weekends do not count as gaps
    assert spacing_note(_stamps(400, timedelta(days=1)), 365) is None
    assert spacing_note(_stamps(400, timedelta(days=1)), 252) is not None  # 365 a year under 252
    assert spacing_note(weekly[: SPACING_MIN_OBSERVATIONS - 1], 252) is None


def _weekly_file(tmp_path: Path) -> Path:
    rng = np.random.default_rng(5)
    rows = ["timestamp,a"] + [f"{t.date().isoformat()},{v:.6f}"
                              for t, v in zip(_stamps(156, timedelta(days=7)), rng.normal(0.003, 0.02, 156))]
    path = tmp_path / "weekly.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.usefixtures("cli_mode")
def test_evaluate_warns_and_policy_can_refuse(tmp_path: Path, worlds_dir: Path, qmtl_env: dict[str, str]) -> None:
    path = _weekly_file(tmp_path)
    ran = qmtl("world", "evaluate", "research-sandbox", "--returns", str(path), "--json")
    assert ran.exit_code in (0, 10), ran.stderr
    notes = ran.json()["notes"]
    assert any(n.startswith("warning: returns are spaced about 52.2 per year") for n in notes), notes
    human = qmtl("world", "evaluate", "research-sandbox", "--returns", str(path))
    assert "52.2 per year" in human.stdout
    policy = worlds_dir / "research-sandbox.yaml"
    text = policy.read_text()
    assert "validation: {on_missing_metric: fail}" in text
    policy.write_text(text.replace("validation: {on_missing_metric: fail}",
                                   "validation: {on_missing_metric: fail, on_spacing_mismatch: fail}")
                      .replace("policy_version: 1", "policy_version: 2"))
    ran = qmtl("world", "evaluate", "research-sandbox", "--returns", str(path), "--json")
    assert ran.exit_code == 2
    assert json.loads(ran.stdout)["error"] == "spacing_mismatch"


def test_spacing_mismatch_error_is_bad_input() -> None:
    from qmtl_core.spacing import check_spacing
    from qmtl_core.policy import load_policy_text
    from tests.test_policy_loader import BASE

    policy = load_policy_text(BASE.replace("validation: {on_missing_metric: fail}",
                                           "validation: {on_missing_metric: fail, on_spacing_mismatch: fail}"))
    with pytest.raises(BadInputError, match="52.2 per year"):
        check_spacing(policy, _stamps(156, timedelta(days=7)))
    assert check_spacing(policy, _business_days(300)) == []


def test_gaps_are_more_than_ten_steps_and_more_than_four_days() -> None:
    from qmtl_core.spacing import find_gaps, gap_limit

    day, hour = timedelta(days=1), timedelta(hours=1)
    assert gap_limit(day) == timedelta(days=10) and gap_limit(hour) == timedelta(days=4)
    assert find_gaps(_business_days(300), day) == []  # weekends are not gaps
    t0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
    closed = [t0, t0 + timedelta(days=7), t0 + timedelta(days=17)]  # a market shut for a week: not a gap
    assert find_gaps(closed, day) == []
    hole = [t0, t0 + timedelta(days=1), t0 + timedelta(days=101), t0 + timedelta(days=102)]
    (gap,) = find_gaps(hole, day)
    assert (gap.before, gap.after, gap.length) == (hole[1], hole[2], timedelta(days=100))
    # hourly bars: a night and a weekend are not gaps, a missing week is
    friday = datetime(2024, 1, 5, 16, tzinfo=timezone.utc)
    assert find_gaps([friday, friday + timedelta(hours=65.5)], hour) == []
    assert len(find_gaps([friday, friday + timedelta(days=7)], hour)) == 1


def test_run_warnings_name_a_gap_in_the_returns() -> None:
    from qmtl_core.policy import load_policy_text
    from qmtl_core.spacing import return_warnings
    from tests.test_policy_loader import BASE

    policy = load_policy_text(BASE)
    days = _business_days(300)
    holed = days[:100] + days[180:]
    notes = return_warnings(policy, holed)
    assert [n for n in notes if "gap" in n] == [
        f"warning: one return spans a gap of {(holed[100] - holed[99]).days}d "
        f"({holed[99].isoformat()[:19]}Z to {holed[100].isoformat()[:19]}Z)"]
    assert return_warnings(policy, days) == []


# --- the spacing warning on every path that annualises timestamped returns ----------------------
SPACED = "warning: returns are spaced about 52.2 per year but periods_per_year is 252"


def _refuse_spacing(worlds_dir: Path, world: str = "research-sandbox") -> None:
    policy = worlds_dir / f"{world}.yaml"
    text = policy.read_text()
    policy.write_text(text.replace("validation: {on_missing_metric: fail}",
                                   "validation: {on_missing_metric: fail, on_spacing_mismatch: fail}")
                      .replace("policy_version: 1", "policy_version: 2"))


@pytest.mark.usefixtures("cli_mode")
def test_recorded_runs_carry_the_spacing_warning(tmp_path: Path, worlds_dir: Path, qmtl_env: dict[str, str]) -> None:
    path = _weekly_file(tmp_path)
    one = qmtl("world", "evaluate", "research-sandbox", "--strategy", "a", "--returns", str(path), "--json")
    assert one.exit_code in (0, 10), one.stderr
    assert [w[:len(SPACED)] for w in one.json()["warnings"]] == [SPACED]
    assert one.json()["window"]["warnings"] == one.json()["warnings"]
    cohort = qmtl("world", "evaluate", "research-sandbox", "--record", "--returns", str(path),
                  "--run-id", "cohort-1", "--json")
    assert cohort.exit_code in (0, 10), cohort.stderr
    assert [w[:len(SPACED)] for w in cohort.json()["runs"][0]["warnings"]] == [SPACED]
    human = qmtl("world", "evaluate", "research-sandbox", "--strategy", "a", "--returns", str(path))
    assert "52.2 per year" in human.stdout
    before = qmtl("world", "runs", "research-sandbox", "--history", "--json").json()["runs"]

    _refuse_spacing(worlds_dir)
    for args in (["--strategy", "a", "--run-id", "other"], ["--record", "--run-id", "cohort-2"]):
        ran = qmtl("world", "evaluate", "research-sandbox", *args, "--returns", str(path), "--json")
        assert ran.exit_code == 2 and ran.json()["error"] == "spacing_mismatch", (args, ran.stdout)
    assert qmtl("world", "runs", "research-sandbox", "--history", "--json").json()["runs"] == before


def _weekly_bars(tmp_path: Path) -> Path:
    header, *rows = (Path(__file__).resolve().parent.parent / "worlds/data/GOOG.csv").read_text().splitlines()
    path = tmp_path / "weekly.csv"
    path.write_text("\n".join([header, *rows[::5]]) + "\n")
    return path


@pytest.mark.usefixtures("cli_mode")
def test_submit_backtest_carries_the_spacing_warning(tmp_path: Path, worlds_dir: Path, qmtl_env: dict[str, str],
                                                     store_url: str) -> None:
    from qmtl_core.store import schema
    from tests.test_liquidation_and_params import _count

    sma = Path(__file__).resolve().parent.parent / "examples/strategies/sma_crossover.py"
    bars = _weekly_bars(tmp_path)
    ran = qmtl("submit", str(sma), "--world", "research-sandbox", "--data", str(bars), "--json")
    assert ran.exit_code in (0, 10), ran.stderr
    warnings = ran.json()["run"]["warnings"]
    assert len(warnings) == 1 and "per year but periods_per_year is 252" in warnings[0]
    assert "per year but periods_per_year is 252" in qmtl("submit", str(sma), "--world", "research-sandbox",
                                                          "--data", str(bars)).stdout
    _refuse_spacing(worlds_dir)
    ledger_before = _count(store_url, schema.ledger)
    refused = qmtl("submit", str(sma), "--world", "research-sandbox", "--data", str(bars), "--param", "fast=7",
                   "--json")
    assert refused.exit_code == 2 and refused.json()["error"] == "spacing_mismatch"
    assert _count(store_url, schema.strategies) == 1  # the refused submission wrote nothing
    assert _count(store_url, schema.ledger) == ledger_before + 1  # only the new policy version's entry


def test_snapshot_returns_carry_the_warning_or_are_not_used(store_url: str, worlds_dir: Path, tmp_path: Path) -> None:
    """The tick measures paper runs on a snapshot's realized returns (``evaluate`` actions go
    through the same sourcing as ``record_evaluation`` without returns)."""
    from tests._service import Clock, make_service
    from tests.test_runs import W, _hub, _snapshot

    clock = Clock()
    svc = make_service(store_url, worlds_dir, tmp_path / "home", clock)
    try:
        weekly = [(clock.now - timedelta(days=7 * (60 - i)), 0.001 * (i % 5 - 2)) for i in range(60)]
        svc.register_strategy(W, strategy_id="s1")
        _hub(svc).put_risk_snapshot(_snapshot(clock, returns={"s1": weekly}))
        run = svc.record_evaluation(W, strategy_id="s1", stage="paper").to_dict()
        assert run["window"]["source"] == "risk_snapshot:v1"
        assert [w[:len(SPACED)] for w in run["warnings"]] == [SPACED]
        _refuse_spacing(worlds_dir, W)
        refused = svc.record_evaluation(W, strategy_id="s1", stage="paper", run_id="p2")
        assert refused.window["source"] != "risk_snapshot:v1" and refused.metric_sources.get("sharpe") != "risk_snapshot:v1"
        assert "risk snapshot v1 returns not used: returns are spaced about 52.2 per year" in (refused.reason or "")
    finally:
        svc.close()
