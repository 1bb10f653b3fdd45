"""Portfolio metrics of a candidate against a live book (qmtl_core.portfolio), checked against an
independent computation (the full covariance matrix with numpy, quantiles from scipy) on the
GOOG-based demo strategies."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from qmtl_core.portfolio import portfolio_kernel, portfolio_risk
from qmtl_core.risk import parse_snapshot

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "worlds" / "data" / "demo-returns.csv"
BOOK = ["buy_hold", "sma_20_100", "momentum_60"]
CANDIDATE = "sma_10_30"
WEIGHTS = {"buy_hold": 0.3, "sma_20_100": 0.25, "momentum_60": 0.25, CANDIDATE: 0.2}


def demo_returns(columns: list[str], last: int = 500) -> tuple[list[str], np.ndarray]:
    """The last ``last`` rows of the demo returns (real GOOG prices) for ``columns``."""
    with DEMO.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if all(r[c] for c in columns)]
    rows = rows[-last:]
    return [r["timestamp"] for r in rows], np.array([[float(r[c]) for c in columns] for r in rows])


def snapshot_doc(*, weights: dict[str, float] = WEIGHTS, returns_days: int = 0,
                 drop: tuple[str, ...] = (), stress: dict[str, Any] | None = None) -> dict[str, Any]:
    names = list(weights)
    stamps, matrix = demo_returns(names)
    cov = np.atleast_2d(np.cov(matrix, rowvar=False, ddof=1))
    covariance = {f"{a},{b}": float(cov[i, j]) for i, a in enumerate(names) for j, b in enumerate(names)
                  if j >= i and f"{a},{b}" not in drop and f"{b},{a}" not in drop}
    start = len(stamps) - returns_days
    realized = {n: [{"ts": f"{stamps[k]}T00:00:00Z", "r": float(matrix[k, i])} for k in range(start, len(stamps))]
                for i, n in enumerate(names)} if returns_days else None
    if stress is None:  # historical scenarios: each strategy's real return on GOOG's worst days
        worst = np.argsort(matrix.sum(axis=1))[:2]
        stress = {f"day_{stamps[k]}": {n: float(matrix[k, i]) for i, n in enumerate(names)} for k in worst}
    doc: dict[str, Any] = {"world_id": "w", "version": "v7", "as_of": "2026-03-02T12:00:00Z",
                           "weights": weights, "covariance": covariance, "stress": stress,
                           "provenance": {"actor": "risk", "stage": "paper"}}
    if realized is not None:
        doc["realized_returns"] = realized
    return doc


def reference(doc: dict[str, Any], candidate: str, book: list[str]) -> dict[str, float]:
    """The same metrics the long way: full matrices, numpy and scipy, no shared code."""
    names = book + [candidate]
    sigma = np.zeros((len(names), len(names)))
    for key, value in doc["covariance"].items():
        a, b = key.split(",")
        sigma[names.index(a), names.index(b)] = sigma[names.index(b), names.index(a)] = value
    w_book = np.array([doc["weights"][n] for n in book] + [0.0])
    w_with = np.array([doc["weights"][n] for n in names])
    s_book, s_with = math.sqrt(w_book @ sigma @ w_book), math.sqrt(w_with @ sigma @ w_with)
    z = stats.norm.ppf(0.99)
    es = stats.norm.expect(lambda x: x, loc=0, scale=1, lb=z) / 0.01  # E[X | X > z], integrated
    losses = {f"stress_loss.{s}": -sum(doc["weights"][n] * v[n] for n in names)
              for s, v in doc["stress"].items()}
    corr = [sigma[-1, i] / math.sqrt(sigma[-1, -1] * sigma[i, i]) for i in range(len(book))]
    return {"portfolio_vol": s_with * math.sqrt(252), "incremental_var_99": z * (s_with - s_book),
            "incremental_es_99": es * (s_with - s_book), "max_corr_live": max(corr),
            "stress_loss_max": max(losses.values()), **losses}


def test_metrics_match_an_independent_computation_on_demo_strategies() -> None:
    doc = snapshot_doc()
    risk = portfolio_risk(parse_snapshot(doc), CANDIDATE, BOOK, periods_per_year=252)
    expected = reference(doc, CANDIDATE, BOOK)
    assert risk.missing == {}
    assert risk.source == "risk_snapshot:v7" and risk.book == tuple(sorted(BOOK))
    assert set(risk.metrics) == set(expected)
    for name, value in expected.items():
        assert risk.metrics[name] == pytest.approx(value, rel=1e-9), name
    assert all(c.basis == "covariance" for c in risk.correlations)
    # The demo strategies are all long GOOG some of the time: adding one adds risk.
    assert risk.metrics["incremental_var_99"] > 0
    assert risk.metrics["stress_loss_max"] > 0


def test_a_diversifying_candidate_lowers_the_books_var() -> None:
    weights = {"buy_hold": 0.5, "short_hold": 0.5}
    risk = portfolio_risk(parse_snapshot(snapshot_doc(weights=weights)), "short_hold", ["buy_hold"],
                          periods_per_year=252)
    expected = reference(snapshot_doc(weights=weights), "short_hold", ["buy_hold"])
    assert risk.metrics["incremental_var_99"] == pytest.approx(expected["incremental_var_99"], rel=1e-9)
    assert risk.metrics["incremental_var_99"] < 0  # short GOOG against long GOOG
    assert risk.metrics["max_corr_live"] == pytest.approx(-1.0, abs=0.02)


def test_correlation_comes_from_returns_when_they_overlap_long_enough() -> None:
    doc = snapshot_doc(returns_days=60)
    snap = parse_snapshot(doc)
    risk = portfolio_risk(snap, CANDIDATE, BOOK, periods_per_year=252, min_overlap=20)
    assert {c.basis for c in risk.correlations} == {"returns"}
    _, matrix = demo_returns(list(WEIGHTS))
    last = matrix[-60:]
    names = list(WEIGHTS)
    expected = max(float(np.corrcoef(last[:, names.index(CANDIDATE)], last[:, names.index(b)])[0, 1])
                   for b in BOOK)
    assert risk.metrics["max_corr_live"] == pytest.approx(expected, rel=1e-9)
    # Too short an overlap: the covariance decides, and says so.
    short = portfolio_risk(snap, CANDIDATE, BOOK, periods_per_year=252, min_overlap=61)
    assert {c.basis for c in short.correlations} == {"covariance"}
    assert short.metrics["max_corr_live"] == pytest.approx(reference(doc, CANDIDATE, BOOK)["max_corr_live"])


def test_a_missing_covariance_entry_is_never_a_zero() -> None:
    doc = snapshot_doc(drop=(f"{CANDIDATE},momentum_60",))
    risk = portfolio_risk(parse_snapshot(doc), CANDIDATE, BOOK, periods_per_year=252)
    for name in ("portfolio_vol", "incremental_var_99", "incremental_es_99", "max_corr_live"):
        assert risk.metrics[name] is None
        assert "momentum_60" in risk.missing[name] and "covariance" in risk.missing[name]
    assert risk.incomplete_for(["incremental_var_99", "sharpe"]) == {
        "incremental_var_99": risk.missing["incremental_var_99"]}
    assert risk.metrics["stress_loss_max"] is not None  # stress does not need the covariance


def test_a_live_strategy_without_a_weight_leaves_the_book_unmeasured() -> None:
    risk = portfolio_risk(parse_snapshot(snapshot_doc()), CANDIDATE, BOOK + ["reversal_5"], periods_per_year=252)
    assert risk.metrics["incremental_var_99"] is None
    assert risk.missing["incremental_var_99"] == "weight of reversal_5"
    assert risk.metrics["stress_loss_max"] is None


def test_stress_needs_per_strategy_values_for_every_member() -> None:
    doc = snapshot_doc(stress={"crash": {CANDIDATE: -0.2, "buy_hold": -0.3, "sma_20_100": -0.1},
                               "book_level": -0.31,
                               "rates": {n: -0.01 for n in WEIGHTS}})
    risk = portfolio_risk(parse_snapshot(doc), CANDIDATE, BOOK, periods_per_year=252)
    assert risk.metrics["stress_loss.rates"] == pytest.approx(0.01)
    assert risk.missing["stress_loss.crash"] == "stress crash.momentum_60"
    assert "one number" in risk.missing["stress_loss.book_level"]
    assert risk.metrics["stress_loss_max"] is None  # a worst case over some scenarios is not the worst case
    none = portfolio_risk(parse_snapshot(snapshot_doc(stress={})), CANDIDATE, BOOK, periods_per_year=252)
    assert none.missing["stress_loss_max"] == "stress scenarios"


def test_an_empty_book_measures_the_candidate_alone() -> None:
    doc = snapshot_doc(weights={CANDIDATE: 1.0})
    risk = portfolio_risk(parse_snapshot(doc), CANDIDATE, [], periods_per_year=252)
    var_c = doc["covariance"][f"{CANDIDATE},{CANDIDATE}"]
    assert risk.metrics["incremental_var_99"] == pytest.approx(stats.norm.ppf(0.99) * math.sqrt(var_c))
    assert risk.metrics["max_corr_live"] == -1.0 and risk.correlations == ()


def test_the_candidate_is_never_counted_in_its_own_book() -> None:
    doc = snapshot_doc()
    a = portfolio_risk(parse_snapshot(doc), CANDIDATE, BOOK + [CANDIDATE], periods_per_year=252)
    b = portfolio_risk(parse_snapshot(doc), CANDIDATE, BOOK, periods_per_year=252)
    assert a.metrics == b.metrics and CANDIDATE not in a.book


def test_kernel_vectorised_equals_one_by_one() -> None:
    rng = np.random.default_rng(3)
    m, n = 6, 9
    a = rng.normal(size=(m + n, 40))
    cov = np.cov(a) * 1e-4
    book_cov, cross, cand_var = cov[:m, :m], cov[m:, :m], np.diag(cov)[m:]
    book_w = rng.uniform(0.05, 0.2, m)
    cand_w = rng.uniform(0.01, 0.1, n)
    together = portfolio_kernel(book_cov, book_w, cross, cand_var, cand_w)
    for i in range(n):
        one = portfolio_kernel(book_cov, book_w, cross[i:i + 1], cand_var[i:i + 1], cand_w[i:i + 1])
        w = np.append(book_w, cand_w[i])
        full = np.block([[book_cov, cross[i:i + 1].T], [cross[i:i + 1], cand_var[i:i + 1, None]]])
        assert one["sigma_with"][0] == pytest.approx(math.sqrt(w @ full @ w), rel=1e-12)
        assert together["incremental_var_99"][i] == pytest.approx(one["incremental_var_99"][0], rel=1e-12)


def test_timestamps_of_returns_are_matched_not_positions() -> None:
    base = snapshot_doc(weights={"buy_hold": 0.5, CANDIDATE: 0.5})
    xs = [0.01 * ((i * 7) % 11 - 5) for i in range(30)]
    base["realized_returns"] = {
        CANDIDATE: [{"ts": f"2026-01-{i + 1:02d}T00:00:00Z", "r": x} for i, x in enumerate(xs)],
        # the same values one day later: by position they correlate 1, by time stamp they do not
        "buy_hold": [{"ts": f"2026-01-{i + 2:02d}T00:00:00Z", "r": x} for i, x in enumerate(xs)],
    }
    risk = portfolio_risk(parse_snapshot(base), CANDIDATE, ["buy_hold"], periods_per_year=252, min_overlap=20)
    (c,) = risk.correlations
    assert c.basis == "returns" and c.n_overlap == 29
    assert c.rho == pytest.approx(float(np.corrcoef(xs[1:], xs[:-1])[0, 1]))


def test_selection_uses_the_snapshot_covariance_when_returns_overlap_too_little() -> None:
    from qmtl_core.policy import Correlation, Selection, TopK
    from qmtl_core.policy._selection import Candidate, select

    nan = float("nan")
    a = np.array([0.01, -0.02, 0.015] + [nan] * 7)  # the two share no period at all
    b = np.array([nan] * 7 + [0.012, -0.018, 0.011])
    cands = [Candidate("a", "pass", {"sharpe": 2.0}, a), Candidate("b", "pass", {"sharpe": 1.0}, b)]
    selection = Selection(top_k=TopK(metric="sharpe", k=2), correlation=Correlation(max=0.8, min_overlap=5))
    blind = select(selection, cands)
    assert blind.selected == ("a", "b") and "not measured" in blind.decisions["b"].reason
    cov = {("a", "a"): 1e-4, ("b", "b"): 1e-4, ("a", "b"): 0.9e-4, ("b", "a"): 0.9e-4}
    seen = select(selection, cands, covariance=cov)
    assert seen.selected == ("a",) and "correlate 0.9 with a" in seen.decisions["b"].reason
    low = {**cov, ("a", "b"): 0.2e-4, ("b", "a"): 0.2e-4}
    kept = select(selection, cands, covariance=low)
    assert kept.selected == ("a", "b") and "0.2 from the risk snapshot's covariance" in kept.decisions["b"].reason
