"""Gates (severities, on_missing_metric, stages) and selection (top-k backfill, correlation, hysteresis)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qmtl_core.policy import Selection, load_policy_text
from qmtl_core.policy._engine import evaluate_gates, summarize
from qmtl_core.policy._selection import Candidate, overlap_correlation, select


def _policy(rules: str, *, on_missing: str = "fail", selection: str = "") -> object:
    text = f"world: w\npolicy_version: 1\nrules:\n{rules}validation: {{on_missing_metric: {on_missing}}}\n"
    if selection:
        text += f"selection:\n{selection}"
    return load_policy_text(text)


RULES = """\
  - {id: sharpe, metric: sharpe, min: 1.0}
  - {id: dd, metric: max_drawdown, max: 0.2}
  - {id: trades, metric: n_trades, min: 30, severity: soft}
  - {id: tail, metric: cvar_95, max: 0.03, severity: info}
  - {id: history, metric: effective_history_years, min: 2, stages: [backtest]}
"""


def test_all_pass() -> None:
    g = evaluate_gates(_policy(RULES), {"sharpe": 1.5, "max_drawdown": 0.1, "n_trades": 40, "cvar_95": 0.02,
                                        "effective_history_years": 3}, stage="backtest")
    assert g.status == "pass" and [r.status for r in g.rules] == ["pass"] * 5
    assert g.rules[0].reason == "sharpe 1.5 is >= min 1"


def test_blocking_fail_fails_the_strategy() -> None:
    g = evaluate_gates(_policy(RULES), {"sharpe": 0.5, "max_drawdown": 0.1, "n_trades": 40, "cvar_95": 0.02,
                                        "effective_history_years": 3}, stage="backtest")
    assert g.status == "fail"
    assert [r.id for r in g.blocking_failures] == ["sharpe"]
    assert g.rules[0].to_dict() == {"id": "sharpe", "metric": "sharpe", "observed": 0.5, "min": 1.0,
                                    "max": None, "status": "fail", "severity": "blocking",
                                    "reason": "sharpe 0.5 is below min 1"}


def test_soft_fail_only_warns() -> None:
    g = evaluate_gates(_policy(RULES), {"sharpe": 1.5, "max_drawdown": 0.1, "n_trades": 3, "cvar_95": 0.02,
                                        "effective_history_years": 3}, stage="backtest")
    assert g.status == "warn" and g.rules[2].status == "fail" and g.rules[2].severity == "soft"


def test_info_fail_only_reports() -> None:
    g = evaluate_gates(_policy(RULES), {"sharpe": 1.5, "max_drawdown": 0.1, "n_trades": 40, "cvar_95": 0.5,
                                        "effective_history_years": 3}, stage="backtest")
    assert g.status == "pass" and g.rules[3].status == "fail" and "above max" in g.rules[3].reason


def test_max_bound_and_exact_bounds_pass() -> None:
    g = evaluate_gates(_policy(RULES), {"sharpe": 1.0, "max_drawdown": 0.2, "n_trades": 30, "cvar_95": 0.03,
                                        "effective_history_years": 2}, stage="backtest")
    assert g.status == "pass"
    g = evaluate_gates(_policy(RULES), {"sharpe": 1.0, "max_drawdown": 0.2000001, "n_trades": 30,
                                        "cvar_95": 0.03, "effective_history_years": 2}, stage="backtest")
    assert g.status == "fail" and g.rules[1].status == "fail"


def test_stages_select_rules() -> None:
    g = evaluate_gates(_policy(RULES), {"sharpe": 1.5, "max_drawdown": 0.1, "n_trades": 40, "cvar_95": 0.02},
                       stage="paper")
    assert [r.id for r in g.rules] == ["sharpe", "dd", "trades", "tail"]
    assert g.status == "pass"


@pytest.mark.parametrize("missing", [None, float("nan"), "absent"])
def test_missing_metric_fails_when_policy_says_fail(missing: object) -> None:
    metrics = {"max_drawdown": 0.1, "n_trades": 40, "cvar_95": 0.02, "effective_history_years": 3}
    if missing != "absent":
        metrics["sharpe"] = missing  # type: ignore[assignment]
    g = evaluate_gates(_policy(RULES), metrics, stage="backtest")
    assert g.status == "fail" and g.rules[0].status == "fail" and g.rules[0].observed is None
    assert "not measured" in g.rules[0].reason


def test_missing_metric_warns_when_policy_says_warn() -> None:
    metrics = {"max_drawdown": 0.1, "n_trades": 40, "cvar_95": 0.02, "effective_history_years": 3}
    g = evaluate_gates(_policy(RULES, on_missing="warn"), metrics, stage="backtest")
    assert g.status == "warn" and g.rules[0].status == "warn"


def test_missing_soft_and_info_metrics() -> None:
    metrics = {"sharpe": 2.0, "max_drawdown": 0.1, "effective_history_years": 3}
    g = evaluate_gates(_policy(RULES), metrics, stage="backtest")
    # n_trades (soft) missing → fail but soft → warn; cvar_95 (info) missing → reported only.
    assert g.status == "warn" and g.rules[2].status == "fail" and g.rules[3].status == "fail"


def test_summary_rules() -> None:
    assert summarize(()) == "pass"


def test_infinite_observed_is_compared_not_missing() -> None:
    g = evaluate_gates(_policy("  - {id: pf, metric: profit_factor, min: 1.5}\n"),
                       {"profit_factor": math.inf}, stage="backtest")
    assert g.status == "pass"


# --- selection ---------------------------------------------------------------------------------------
def _sel(yaml: str) -> Selection:
    return _policy("  - {id: s, metric: sharpe, min: -100}\n", selection=yaml).selection  # type: ignore[attr-defined]


def _cands(sharpes: dict[str, float], returns: dict[str, np.ndarray] | None = None,
           failed: set[str] = frozenset()) -> list[Candidate]:  # type: ignore[assignment]
    return [Candidate(k, "fail" if k in failed else "pass", {"sharpe": v}, (returns or {}).get(k))
            for k, v in sharpes.items()]


def test_top_k_ranks_and_cuts() -> None:
    res = select(_sel("  top_k: {metric: sharpe, k: 2}\n"), _cands({"a": 1.0, "b": 3.0, "c": 2.0}))
    assert res.selected == ("b", "c")
    assert res.decisions["a"].reason == "ranked 3, below the top 2" and res.decisions["a"].rank == 3


def test_top_k_ascending_order() -> None:
    res = select(_sel("  top_k: {metric: sharpe, k: 1, order: asc}\n"), _cands({"a": 1.0, "b": 3.0}))
    assert res.selected == ("a",)


def test_failed_gate_is_not_ranked_and_next_one_backfills() -> None:
    res = select(_sel("  top_k: {metric: sharpe, k: 2}\n"),
                 _cands({"a": 1.0, "b": 3.0, "c": 2.0}, failed={"b"}))
    assert res.selected == ("c", "a")
    assert res.decisions["b"].reason == "failed a blocking gate"


def test_ties_broken_by_strategy_id_whatever_the_input_order() -> None:
    sel = _sel("  top_k: {metric: sharpe, k: 1}\n")
    one = select(sel, _cands({"zeta": 1.0, "alpha": 1.0}))
    two = select(sel, list(reversed(_cands({"zeta": 1.0, "alpha": 1.0}))))
    assert one.selected == two.selected == ("alpha",)


def _series(seed: int, n: int = 200) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0005, 0.01, n)


def test_correlated_strategy_is_dropped_and_backfilled() -> None:
    base = _series(1)
    twin = base + np.random.default_rng(9).normal(0, 0.001, base.size)  # corr ~0.99
    other = _series(2)
    res = select(_sel("  top_k: {metric: sharpe, k: 2}\n  correlation: {max: 0.8}\n"),
                 _cands({"a": 3.0, "a_twin": 2.5, "b": 1.0}, {"a": base, "a_twin": twin, "b": other}))
    assert res.selected == ("a", "b")
    assert "correlate 0.99" in res.decisions["a_twin"].reason and "with a" in res.decisions["a_twin"].reason
    assert "(backfilled)" in res.decisions["b"].reason


def test_correlation_tie_at_the_threshold_is_kept() -> None:
    base = _series(3)
    # Identical series correlate exactly 1.0: with max 1.0 nothing is "above" it.
    res = select(_sel("  correlation: {max: 1.0}\n"), _cands({"a": 2.0, "b": 2.0}, {"a": base, "b": base.copy()}))
    assert res.selected == ("a", "b")
    dropped = select(_sel("  correlation: {max: 0.999}\n"),
                     _cands({"a": 2.0, "b": 2.0}, {"a": base, "b": base.copy()}))
    assert dropped.selected == ("a",) and not dropped.decisions["b"].selected  # tie → id order decides


def test_correlation_uses_only_overlapping_periods() -> None:
    a = _series(4, 300)
    b = np.full(300, np.nan)
    b[200:] = a[200:] * 2.0  # perfectly correlated where both exist
    rho, n = overlap_correlation(a, b)
    assert n == 100 and rho == pytest.approx(1.0)
    short = np.full(300, np.nan)
    short[290:] = a[290:]
    res = select(_sel("  correlation: {max: 0.5, min_overlap: 20}\n"),
                 _cands({"a": 2.0, "s": 1.0}, {"a": a, "s": short}))
    assert res.selected == ("a", "s") and "not measured (10 shared periods < 20)" in res.decisions["s"].reason


def test_hysteresis_enter_and_exit() -> None:
    sel = _sel("  hysteresis: {metric: sharpe, enter: 1.0, exit: 0.7}\n")
    sharpes = {"new_low": 0.9, "new_high": 1.1, "old_mid": 0.8, "old_low": 0.6}
    res = select(sel, _cands(sharpes), previous_active={"old_mid", "old_low"})
    assert set(res.selected) == {"new_high", "old_mid"}
    assert "below hysteresis enter 1" in res.decisions["new_low"].reason
    assert "fell below exit 0.7" in res.decisions["old_low"].reason
    assert "stays active (hysteresis)" in res.decisions["old_mid"].reason


def test_selection_without_config_keeps_everyone_who_passed() -> None:
    res = select(Selection(), _cands({"a": 1.0, "b": -1.0}, failed={"b"}))
    assert res.selected == ("a",)
