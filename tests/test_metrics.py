"""qmtl_core.metrics against empyrical and independent oracles on real GOOG prices (DESIGN §4).

Every metric empyrical has is compared with empyrical-reloaded to 1e-9 relative; the others
against a direct numpy/scipy computation and hand-worked examples. ``compute_cohort`` must equal
``compute_metrics`` row by row, and every degenerate input has a pinned, deliberate answer.
"""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmtl_core import _metrics_kernels as kernels
from qmtl_core.metric_names import RETURN_METRICS
from qmtl_core.metrics import (
    METRIC_KEYS,
    _deflation_benchmark,
    compute_cohort,
    compute_metrics,
)

ROOT = Path(__file__).resolve().parent.parent
Arr = npt.NDArray[np.float64]


def _goog() -> tuple[Arr, Arr]:
    """Daily close-to-close and open-to-open returns of the GOOG data backtesting.py ships."""
    from backtesting.test import GOOG

    close = GOOG.Close.pct_change().dropna().to_numpy(dtype=np.float64)
    opens = GOOG.Open.pct_change().dropna().to_numpy(dtype=np.float64)
    return close, opens


GOOG_CLOSE, GOOG_OPEN = _goog()
SLICES: dict[str, Arr] = {
    "full": GOOG_CLOSE,
    "first300": GOOG_CLOSE[:300],  # 2004-05: a steep rally (cagr ~190 %)
    "crash2008": GOOG_CLOSE[800:1200],  # late 2007 to mid 2009: negative cagr
    "last250": GOOG_CLOSE[-250:],
    "open_full": GOOG_OPEN,
}


def _oracle(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    """Call an empyrical function; its numpy/pandas deprecation warnings are not our failures."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(*args, **kwargs))


def _same(a: float, b: float, rel: float = 1e-12, abs_: float = 0.0) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


@pytest.fixture(scope="module", autouse=True)
def _compiled_kernel() -> None:
    """Load/compile the cohort kernel once, so no test (or hypothesis deadline) pays for it."""
    compute_cohort(np.zeros((1, 3)))


# --- empyrical on real prices ---------------------------------------------------------------

@pytest.mark.parametrize("ppy", [252, 12])
@pytest.mark.parametrize("name", sorted(SLICES))
def test_every_empyrical_metric_matches(name: str, ppy: int) -> None:
    import empyrical as ep

    r = SLICES[name]
    ours = compute_metrics(r, ppy)
    cohort = compute_cohort(r[None, :], ppy)
    expected = {
        "total_return": _oracle(ep.cum_returns_final, r),
        "cagr": _oracle(ep.annual_return, r, annualization=ppy),
        "annual_volatility": _oracle(ep.annual_volatility, r, annualization=ppy),
        "sharpe": _oracle(ep.sharpe_ratio, r, annualization=ppy),
        "sortino": _oracle(ep.sortino_ratio, r, annualization=ppy),
        "max_drawdown": -_oracle(ep.max_drawdown, r),
        "calmar": _oracle(ep.calmar_ratio, r, annualization=ppy),
        "tail_ratio": _oracle(ep.tail_ratio, r),
        "var_95": -_oracle(ep.value_at_risk, r, cutoff=0.05),
        "cvar_95": -_oracle(ep.conditional_value_at_risk, r, cutoff=0.05),
    }
    assert _oracle(ep.cagr, r, annualization=ppy) == expected["cagr"]
    for key, want in expected.items():
        assert math.isfinite(want), key
        assert ours[key] == pytest.approx(want, rel=1e-9), key
        assert cohort[key][0] == pytest.approx(want, rel=1e-9), key


def test_kernel_row_indices_match_the_key_order() -> None:
    assert len(METRIC_KEYS) == kernels.N_KEYS
    for i, key in enumerate(METRIC_KEYS):
        assert getattr(kernels, key.upper()) == i, key


def test_goog_sanity() -> None:
    m = compute_metrics(GOOG_CLOSE)
    assert m["n_observations"] == GOOG_CLOSE.size == 2147
    assert m["max_drawdown"] > 0.5  # GOOG fell ~65 % in 2008: drawdown is a positive fraction
    assert list(m) == list(RETURN_METRICS)


# --- metrics empyrical does not have: independent oracles and hand-worked numbers --------------

@pytest.mark.parametrize("name", sorted(SLICES))
def test_other_metrics_match_direct_computation(name: str) -> None:
    r = SLICES[name]
    m = compute_metrics(r)
    n = r.size
    d = r - r.mean()
    m2, m3, m4 = (d**2).mean(), (d**3).mean(), (d**4).mean()
    skew, kurt = m3 / m2**1.5, m4 / m2**2 - 3.0
    sr = r.mean() / r.std(ddof=1)
    psr = NormalDist().cdf(sr * math.sqrt(n - 1) / math.sqrt(1 - skew * sr + (kurt + 2) / 4 * sr**2))
    p5 = float(np.percentile(r, 5))
    direct = {
        "win_rate": np.count_nonzero(r > 0) / np.count_nonzero(r != 0),
        "profit_factor": r[r > 0].sum() / abs(r[r < 0].sum()),
        "n_observations": float(n),
        "effective_history_years": n / 252,
        "skew": skew,
        "kurtosis": kurt,
        "var_95": -p5,
        "cvar_95": -r[r <= p5].mean(),
        "psr": psr,
    }
    try:
        from scipy import stats
    except ImportError:  # scipy is only an optional second oracle
        stats = None
    if stats is not None:
        assert skew == pytest.approx(float(stats.skew(r)), rel=1e-9)
        assert kurt == pytest.approx(float(stats.kurtosis(r)), rel=1e-9)
        assert psr == pytest.approx(float(stats.norm.cdf(
            sr * math.sqrt(n - 1) / math.sqrt(1 - skew * sr + (kurt + 2) / 4 * sr**2))), rel=1e-12)
    for key, want in direct.items():
        assert m[key] == pytest.approx(want, rel=1e-9), key


def test_hand_worked_example() -> None:
    r = [0.10, -0.05, 0.02, 0.0, -0.03]
    m = compute_metrics(r)
    wealth = 1.10 * 0.95 * 1.02 * 1.00 * 0.97
    assert m["total_return"] == pytest.approx(wealth - 1, rel=1e-14)
    assert m["cagr"] == pytest.approx(wealth ** (252 / 5) - 1, rel=1e-12)
    assert m["max_drawdown"] == pytest.approx((1.10 - wealth) / 1.10, rel=1e-14)
    assert m["win_rate"] == 0.5  # 2 of the 4 non-zero periods
    assert m["profit_factor"] == pytest.approx(0.12 / 0.08, rel=1e-14)
    # sorted: -0.05 -0.03 0 0.02 0.10; p5 at index 0.2, p95 at index 3.8
    assert m["var_95"] == pytest.approx(0.05 - 0.02 * 0.2, rel=1e-14)
    assert m["cvar_95"] == pytest.approx(0.05, rel=1e-14)  # only -0.05 is <= p5 = -0.046
    assert m["tail_ratio"] == pytest.approx((0.02 + 0.08 * 0.8) / 0.046, rel=1e-13)
    mean = 0.04 / 5
    std = math.sqrt(sum((x - mean) ** 2 for x in r) / 4)
    assert m["sharpe"] == pytest.approx(mean / std * math.sqrt(252), rel=1e-13)
    assert m["sortino"] == pytest.approx(mean * 252 / math.sqrt((0.05**2 + 0.03**2) / 5 * 252),
                                         rel=1e-13)
    assert m["calmar"] == pytest.approx(m["cagr"] / m["max_drawdown"], rel=1e-15)
    assert m["effective_history_years"] == 5 / 252


def test_cvar_includes_ties_at_the_cutoff() -> None:
    # n = 21: p5 sits exactly on the 2nd smallest value, -0.02, which occurs twice.
    r = np.array([-0.05, -0.02, -0.02] + [0.01] * 18)
    m = compute_metrics(r)
    assert m["var_95"] == 0.02
    assert m["cvar_95"] == pytest.approx(0.03, rel=1e-14)  # mean of -0.05, -0.02, -0.02
    import empyrical as ep

    # empyrical averages exactly floor((n-1)*0.05)+1 = 2 values, so it differs only here.
    assert -_oracle(ep.conditional_value_at_risk, r) == pytest.approx(0.035, rel=1e-14)
    assert compute_cohort(r[None, :])["cvar_95"][0] == pytest.approx(0.03, rel=1e-14)


def test_deflated_sharpe_reproduces_the_paper() -> None:
    # Bailey & López de Prado (2014), §4: SR 2.5 annualised over T = 1250 days (250 a year),
    # skew -3, kurtosis 10 (7 excess), N = 100 trials, V[SR] = 0.5 → SR* ≈ 0.1132, DSR ≈ 0.9004.
    n, ppy = 1250, 250.0
    sr_star = _deflation_benchmark(100, 0.5, ppy)
    assert sr_star == pytest.approx(0.1132, abs=5e-5)
    sr = 2.5 / math.sqrt(ppy)
    m2 = (n - 1) / n  # central sums chosen so std(ddof=1) = 1, mean = SR
    out = np.full((kernels.N_KEYS, 1), np.nan)
    kernels.finish_row(out, 0, n, ppy, sr_star, sr, n - 1.0, -3 * m2**1.5 * n, 10 * m2**2 * n,
                       2.0, 0.1, 1, 1, 1.0, -1.0, 1.0, -0.1, 0.1, -0.1, 1)
    assert out[kernels.SKEW, 0] == pytest.approx(-3.0)
    assert out[kernels.KURTOSIS, 0] == pytest.approx(7.0)
    assert out[kernels.DSR, 0] == pytest.approx(0.9004, abs=5e-4)


def test_dsr_key_and_trial_arguments() -> None:
    r = GOOG_CLOSE
    assert "dsr" not in compute_metrics(r)
    one = compute_metrics(r, n_trials=1)
    assert one["dsr"] == one["psr"]  # a single trial is not deflated
    many = compute_metrics(r, n_trials=50, trials_sharpe_variance=0.25)
    more = compute_metrics(r, n_trials=5000, trials_sharpe_variance=0.25)
    assert more["dsr"] < many["dsr"] < many["psr"]
    cohort = compute_cohort(np.vstack([r, r[::-1]]), n_trials=50, trials_sharpe_variance=0.25)
    assert list(cohort) == list(METRIC_KEYS)
    assert cohort["dsr"][0] == pytest.approx(many["dsr"], rel=1e-12)
    bad: list[dict[str, Any]] = [
        {"trials_sharpe_variance": 0.2},  # variance without a number of trials
        {"n_trials": 10},  # more than one trial needs the variance
        {"n_trials": 0, "trials_sharpe_variance": 0.1},
        {"n_trials": True, "trials_sharpe_variance": 0.1},
        {"n_trials": 2.0, "trials_sharpe_variance": 0.1},
        {"n_trials": 10, "trials_sharpe_variance": -0.1},
        {"n_trials": 10, "trials_sharpe_variance": math.nan},
    ]
    for kwargs in bad:
        with pytest.raises(ValueError):
            compute_metrics(r, **kwargs)
        with pytest.raises(ValueError):
            compute_cohort(r[None, :], **kwargs)


# --- compute_cohort == compute_metrics, row by row --------------------------------------------

def _assert_rows_match(matrix: Arr, rel: float = 1e-12, abs_: float = 0.0, **kwargs: Any) -> None:
    cohort = compute_cohort(matrix, **kwargs)
    assert all(v.shape == (matrix.shape[0],) for v in cohort.values())
    for i, row in enumerate(matrix):
        single = compute_metrics(row, **kwargs)
        assert list(single) == list(cohort)
        for key, value in single.items():
            got = float(cohort[key][i])
            assert _same(got, value, rel, abs_), (i, key, got, value)


def _left_pad(series: Arr, width: int) -> Arr:
    return np.concatenate([np.full(width - series.size, np.nan), series])


def test_cohort_equals_single_on_goog_rows_with_different_histories() -> None:
    width = GOOG_CLOSE.size + 3
    rng = np.random.default_rng(7)
    rows = [
        GOOG_CLOSE, GOOG_OPEN, GOOG_CLOSE[500:], GOOG_CLOSE[-250:], GOOG_CLOSE[-21:],
        np.sort(GOOG_CLOSE), np.sort(GOOG_CLOSE)[::-1],  # adversarial orders for the select
        np.round(GOOG_CLOSE, 2),  # heavy ties
        np.where(rng.random(width) < 0.95, 0.0, rng.normal(0, 0.02, width)),  # rarely trades
        -GOOG_CLOSE[:1000] / 2, rng.normal(0.0005, 0.01, width - 7),
        np.full(40, 0.001), np.zeros(60), np.array([0.03]), np.array([-0.02, 0.01]),
        np.array([]), np.array([0.1, -1.0, 0.2]),
    ]
    matrix = np.vstack([_left_pad(np.asarray(r, dtype=np.float64), width) for r in rows])
    _assert_rows_match(matrix)
    _assert_rows_match(matrix, periods_per_year=52, n_trials=20, trials_sharpe_variance=0.3)


def test_compiled_kernel_equals_its_plain_python_source_bit_for_bit() -> None:
    # No fastmath, no reassociation: numba must compute exactly what the Python source says.
    rows = [GOOG_CLOSE[:400], _left_pad(GOOG_OPEN[:150], 400), np.zeros(400),
            _left_pad(np.array([0.02]), 400), np.full(400, np.nan)]
    matrix = np.vstack(rows)
    out = np.full((kernels.N_KEYS, len(rows)), np.nan)
    err = np.zeros((len(rows), 2), dtype=np.int64)
    kernels.cohort_rows(matrix, 252.0, 0.01, out, err)  # interpreted, not compiled
    compiled, compiled_err = kernels.run_cohort(matrix, 252.0, 0.01)
    np.testing.assert_array_equal(out, compiled)
    np.testing.assert_array_equal(err, compiled_err)


def test_cohort_accepts_other_layouts_and_dtypes() -> None:
    base = np.vstack([GOOG_CLOSE[:300], GOOG_OPEN[:300]])
    want = compute_cohort(base)
    for variant in (np.asfortranarray(base), base.T.copy().T, base.tolist()):
        got = compute_cohort(variant)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    single32 = base.astype(np.float32)
    got32 = compute_cohort(single32)
    want32 = compute_cohort(single32.astype(np.float64))
    for key in want:
        np.testing.assert_array_equal(got32[key], want32[key])
    as_ints = compute_cohort(np.array([[0, 1, 0, -1, 1]]))
    assert as_ints["n_observations"][0] == 5
    assert compute_cohort(np.empty((0, 10)))["sharpe"].shape == (0,)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=40),  # leading NaN
        st.lists(st.one_of(st.just(0.0), st.sampled_from([-0.01, 0.01, 0.02]),
                           st.floats(min_value=-0.99, max_value=2.0, width=64)),
                 min_size=0, max_size=60),
    ),
    min_size=1, max_size=6))
def test_property_cohort_equals_single(rows: list[tuple[int, list[float]]]) -> None:
    width = max(lead + len(vals) for lead, vals in rows)
    matrix = np.full((len(rows), width), np.nan)
    for i, (lead, vals) in enumerate(rows):
        if vals:
            matrix[i, width - len(vals):] = vals
    # The two paths sum in different orders (pairwise vs sequential): 1e-12 relative, and an
    # absolute floor for results that are zero up to rounding (e.g. the skew of symmetric data).
    _assert_rows_match(matrix, rel=1e-12, abs_=1e-14)


# --- degenerate inputs ------------------------------------------------------------------------

def _both(series: list[float] | Arr, **kwargs: Any) -> dict[str, float]:
    """compute_metrics, after checking the cohort path gives the identical answer."""
    single = compute_metrics(series, **kwargs)
    row = np.asarray(series, dtype=np.float64)[None, :]
    cohort = compute_cohort(row, **kwargs)
    for key, value in single.items():
        assert _same(float(cohort[key][0]), value), key
    return single


def _nan_keys(m: dict[str, float]) -> set[str]:
    return {k for k, v in m.items() if math.isnan(v)}


@pytest.mark.parametrize("series", [[], [math.nan] * 5])
def test_no_history_is_nan_not_zero(series: list[float]) -> None:
    m = _both(series)
    assert m["n_observations"] == 0 and m["effective_history_years"] == 0
    assert _nan_keys(m) == set(m) - {"n_observations", "effective_history_years"}


def test_single_observation() -> None:
    m = _both([math.nan, math.nan, 0.01])
    assert m["n_observations"] == 1
    assert m["total_return"] == pytest.approx(0.01)
    assert m["cagr"] == pytest.approx(1.01**252 - 1, rel=1e-12)
    assert m["win_rate"] == 1.0 and m["max_drawdown"] == 0.0 and m["tail_ratio"] == 1.0
    assert m["var_95"] == -0.01 and m["cvar_95"] == -0.01  # a gain: negative "loss"
    assert _nan_keys(m) == {"annual_volatility", "sharpe", "sortino", "calmar", "profit_factor",
                            "skew", "kurtosis", "psr"}


def test_all_zero_returns() -> None:
    m = _both(np.zeros(100))
    assert m["total_return"] == 0.0 and m["cagr"] == 0.0 and m["annual_volatility"] == 0.0
    assert m["max_drawdown"] == 0.0
    assert math.copysign(1.0, m["var_95"]) == 1.0 and m["var_95"] == 0.0  # +0.0, not -0.0
    assert m["cvar_95"] == 0.0
    # every ratio divides by zero: NaN rather than a misleading 0 or inf
    assert _nan_keys(m) == {"sharpe", "sortino", "calmar", "win_rate", "profit_factor",
                            "tail_ratio", "skew", "kurtosis", "psr"}


@pytest.mark.parametrize("value", [0.001, 0.1 + 0.2, 1 / 3])
def test_constant_positive_returns(value: float) -> None:
    m = _both(np.full(500, value))
    assert m["annual_volatility"] == 0.0  # exactly, not 1e-18 of rounding noise
    assert m["win_rate"] == 1.0 and m["tail_ratio"] == 1.0 and m["max_drawdown"] == 0.0
    assert _nan_keys(m) == {"sharpe", "sortino", "calmar", "profit_factor", "skew", "kurtosis",
                            "psr"}


def test_constant_negative_returns() -> None:
    m = _both(np.full(100, -0.001))
    assert m["sortino"] == pytest.approx(-math.sqrt(252), rel=1e-12)
    assert m["profit_factor"] == 0.0 and m["win_rate"] == 0.0
    assert m["max_drawdown"] == pytest.approx(1 - 0.999**100, rel=1e-12)
    assert m["calmar"] == pytest.approx(m["cagr"] / m["max_drawdown"])
    assert _nan_keys(m) == {"sharpe", "skew", "kurtosis", "psr"}


def test_total_loss() -> None:
    m = _both([0.1, -1.0, 0.0, 0.2])
    assert m["total_return"] == -1.0 and m["cagr"] == -1.0
    assert m["max_drawdown"] == 1.0 and m["calmar"] == -1.0


def test_only_gains_and_only_losses() -> None:
    gains = _both([0.01, 0.02, 0.0, 0.03])
    assert math.isnan(gains["profit_factor"]) and math.isnan(gains["sortino"])
    assert math.isnan(gains["calmar"]) and gains["win_rate"] == 1.0


@pytest.mark.parametrize(("series", "index", "words"), [
    ([0.01, 0.02, math.nan, 0.03], 2, "NaN after the first observation"),
    ([math.nan, 0.01, math.nan], 2, "NaN after the first observation"),
    ([0.01, math.inf], 1, "finite"),
    ([-math.inf, 0.01], 0, "finite"),
    ([0.01, -1.5], 1, "below -1"),
    ([1e200, 1e200, 0.01], 1, "overflows"),
    ([0.01, math.nan, -3.0], 1, "NaN"),  # the first problem is the one reported
])
def test_invalid_values_raise_naming_the_position(series: list[float], index: int,
                                                  words: str) -> None:
    with pytest.raises(ValueError, match=rf"returns\[{index}\].*{words}|{words}.*returns\[{index}\]"):
        compute_metrics(series)
    matrix = np.vstack([np.full(len(series), 0.01), series, [math.nan] * len(series)])
    with pytest.raises(ValueError, match=rf"matrix\[1, {index}\]"):
        compute_cohort(matrix)


@pytest.mark.parametrize("data", [["a", "b"], [True, False], [1 + 2j], [[0.1, 0.2]], 0.1])
def test_non_series_input_raises(data: Any) -> None:
    with pytest.raises(ValueError):
        compute_metrics(data)


@pytest.mark.parametrize("data", [[0.1, 0.2], [[[0.1]]], [["x"]]])
def test_non_matrix_input_raises(data: Any) -> None:
    with pytest.raises(ValueError):
        compute_cohort(data)


@pytest.mark.parametrize("ppy", [0, -252, math.nan, math.inf, True, "252", None])
def test_periods_per_year_must_be_positive_finite(ppy: Any) -> None:
    with pytest.raises(ValueError, match="periods_per_year"):
        compute_metrics([0.01, 0.02], ppy)
    with pytest.raises(ValueError, match="periods_per_year"):
        compute_cohort([[0.01, 0.02]], ppy)


def test_accepts_pandas_and_integers() -> None:
    import pandas as pd

    series = pd.Series(GOOG_CLOSE[:100], index=pd.date_range("2020-01-01", periods=100))
    assert compute_metrics(series) == compute_metrics(GOOG_CLOSE[:100])
    assert compute_metrics([0, 0, 1])["total_return"] == 1.0


def test_zero_width_matrix_has_no_history() -> None:
    m = compute_cohort(np.empty((3, 0)))
    np.testing.assert_array_equal(m["n_observations"], [0, 0, 0])
    assert np.isnan(m["sharpe"]).all()


# --- operational properties -------------------------------------------------------------------

def test_import_and_single_series_do_not_import_numba() -> None:
    code = ("import sys, qmtl_core.metrics as m; m.compute_metrics([0.01, -0.02, 0.03]); "
            "assert 'numba' not in sys.modules, 'numba imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_concurrent_cohort_calls_are_safe() -> None:
    rng = np.random.default_rng(3)
    matrix = rng.normal(0.0005, 0.01, (200, 500))
    want = compute_cohort(matrix)["sharpe"]
    results: list[Arr] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(compute_cohort(matrix)["sharpe"])
        except BaseException as exc:  # re-raised in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for got in results:
        np.testing.assert_array_equal(got, want)


def test_a_forked_child_can_still_score_a_cohort() -> None:
    # GNU OpenMP (numba's default layer on Linux) aborts a fork()ed child; see _metrics_kernels.
    code = (
        "import os, numpy as np\n"
        "from qmtl_core.metrics import compute_cohort\n"
        "m = np.full((4, 50), 0.01); m[:, ::2] = -0.005\n"
        "want = compute_cohort(m)['sharpe']\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    ok = (compute_cohort(m)['sharpe'] == want).all()\n"
        "    os._exit(0 if ok else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "raise SystemExit(os.waitstatus_to_exitcode(status))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
