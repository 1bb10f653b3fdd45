"""Performance metrics of a returns series (DESIGN §4): one strategy or a whole cohort.

``compute_metrics(returns)`` takes one series, ``compute_cohort(matrix)`` takes a matrix with one
strategy per **row** and one period per column, and both return the same numbers (the cohort
path is a compiled, parallel loop over the same per-row definitions; see
``qmtl_core._metrics_kernels``). Conventions follow empyrical: simple per-period returns,
risk-free rate 0, sample standard deviation (ddof=1), annualisation by ``periods_per_year``.

Input rules (the same for a series and for each row):

* Leading NaN marks history a strategy does not have yet and is skipped; metrics use the rest.
  A series (row) that is all NaN or empty has ``n_observations = 0`` and every other metric NaN
  (``effective_history_years = 0``).
* NaN *after* the first observation, ±inf, a return below -1 (more than -100 %, usually log or
  percent returns passed by mistake) and compounded wealth overflowing float64 raise
  ``ValueError`` naming the index (``returns[j]``, or row and column ``matrix[i, j]``).
* A metric whose definition divides by zero is NaN, never ±inf and never a silent 0.

Keys (``r`` the n returns after leading NaN, ``W = prod(1 + r)`` the final wealth from 1.0,
``P = periods_per_year``, ``mean``/``std`` the sample mean and ddof=1 deviation):

``total_return``       W - 1 (empyrical ``cum_returns_final``).
``cagr``               W ** (P / n) - 1 (empyrical ``annual_return``); -1 once wealth hits 0.
``annual_volatility``  std * sqrt(P); NaN for n < 2.
``sharpe``             mean / std * sqrt(P); NaN for n < 2 or std = 0 (constant returns: std is
                       taken as exactly 0 whenever min == max, and whenever it is at most
                       ``DISPERSION_RESOLUTION`` = 1024 float64 epsilons (~2.3e-13) times the
                       data's scale 1 + |mean|, so rounding noise cannot produce a huge ratio;
                       skew, kurtosis, psr and dsr are then NaN too).
``sortino``            mean * P / (sqrt(mean(min(r, 0)²)) * sqrt(P)) (empyrical, required
                       return 0, the downside mean is over all n periods); NaN for n < 2 or no
                       negative return.
``max_drawdown``       max over t of (peak_t - W_t) / peak_t on compounded wealth, the starting
                       wealth 1.0 counting as a peak: a *positive* fraction in [0, 1] (empyrical
                       returns it negated).
``calmar``             cagr / max_drawdown; NaN when max_drawdown = 0 or the ratio overflows.
``win_rate``           #(r > 0) / #(r != 0); NaN when every return is 0.
``profit_factor``      sum(r > 0) / |sum(r < 0)|; NaN when no return is negative.
``tail_ratio``         |p95| / |p5| (empyrical); NaN when p5 = 0.
``n_observations``     n, as a float. (``n_trades`` is not computed here: it comes from the
                       execution records, never from a count of periods.)
``effective_history_years``  n / P.
``skew``               m3 / m2^1.5 with population central moments m_k = mean((r - mean)^k)
                       (no bias correction, as ``scipy.stats.skew``); NaN when m2 = 0.
``kurtosis``           m4 / m2² - 3 (excess, population, as ``scipy.stats.kurtosis``); NaN when
                       m2 = 0.
``var_95``             -p5, the 5th percentile by linear interpolation (``np.percentile``
                       default) negated: a loss is positive.
``cvar_95``            -mean(r[r <= p5]); equals empyrical's ``conditional_value_at_risk`` except
                       when values tie at the cutoff (those are all included here).
``psr``                Probabilistic Sharpe ratio against a benchmark Sharpe of 0:
                       Φ(SR·sqrt(n-1) / sqrt(1 - skew·SR + (kurtosis+2)/4·SR²)) with SR the
                       per-period (not annualised) Sharpe mean/std; NaN where SR is NaN and
                       for n < ``PSR_MIN_OBSERVATIONS`` (30), where the normal approximation it
                       rests on does not hold.
``dsr``                Only when ``n_trials`` is given: the deflated Sharpe ratio (Bailey & López
                       de Prado 2014), the same expression with SR replaced by SR - SR*, where
                       SR* = sqrt(V / P)·((1-γ)·Φ⁻¹(1 - 1/N) + γ·Φ⁻¹(1 - 1/(N·e))) is the expected
                       maximum per-period Sharpe of N unskilled trials, γ the Euler-Mascheroni
                       constant and V = ``trials_sharpe_variance``, the variance across the trials
                       of their *annualised* Sharpe ratios (the units of ``sharpe``). For N = 1,
                       SR* = 0 and dsr = psr. Φ⁻¹(1 - p) is computed as -Φ⁻¹(p), exact for any
                       N up to ``MAX_TRIALS`` (1e300); a larger N is a ``ValueError`` naming
                       ``n_trials``.

Percentiles use order statistics around the virtual index (n-1)·q with numpy's interpolation
formula, so ``var_95`` and ``tail_ratio`` match ``np.percentile`` bit for bit. Φ is computed
with ``math.erfc`` and Φ⁻¹ with ``statistics.NormalDist``: no scipy.

Importing this module does not import numba; the first ``compute_cohort`` call in a process
does (and compiles the kernel once per machine, cached on disk).
"""

from __future__ import annotations

import math
import numbers
from statistics import NormalDist
from typing import Any

import numpy as np
import numpy.typing as npt

from qmtl_core import _metrics_kernels as _k

__all__ = ["DISPERSION_RESOLUTION", "MAX_TRIALS", "METRIC_KEYS", "PSR_MIN_OBSERVATIONS", "compute_cohort",
           "compute_metrics"]

PSR_MIN_OBSERVATIONS = _k.PSR_MIN_OBSERVATIONS
DISPERSION_RESOLUTION = _k.DISPERSION_RESOLUTION
#: The largest number of trials ``dsr`` deflates by (1/N must stay a normal float64).
MAX_TRIALS = 10**300

#: Keys of the result, in order; ``dsr`` is present only when ``n_trials`` is given.
METRIC_KEYS: tuple[str, ...] = _k.KEYS

_EULER_GAMMA = 0.5772156649015329


def compute_metrics(returns: npt.ArrayLike, periods_per_year: float = 252, *,
                    n_trials: int | None = None,
                    trials_sharpe_variance: float | None = None) -> dict[str, float]:
    """Every metric of one series of simple per-period returns (see the module docstring).

    ``returns`` is anything numpy can read as a 1-D array of numbers (list, ndarray, pandas
    Series). ``n_trials`` (with ``trials_sharpe_variance`` when it is above 1) adds ``dsr``.
    Raises ``ValueError`` for invalid input, naming the offending index.
    """
    ppy = _check_periods_per_year(periods_per_year)
    sr_star = _deflation_benchmark(n_trials, trials_sharpe_variance, ppy)
    series = _as_float_array(returns, 1, "returns")
    start = _first_observation(series)
    x = series[start:]
    out = np.full((_k.N_KEYS, 1), np.nan)
    _series_metrics(x, start, out, ppy, sr_star)
    keys = _k.KEYS if sr_star == sr_star else _k.KEYS[:-1]
    return {key: float(out[i, 0]) for i, key in enumerate(keys)}


def compute_cohort(matrix: npt.ArrayLike, periods_per_year: float = 252, *,
                   n_trials: int | None = None,
                   trials_sharpe_variance: float | None = None) -> dict[str, npt.NDArray[np.float64]]:
    """Every metric for each row of ``matrix`` (rows = strategies, columns = periods).

    Each row may start with NaN (missing leading history); its metrics are those of its
    non-NaN part, equal to ``compute_metrics(matrix[i])``. Returns one float64 array of length
    ``n_rows`` per key. The input is read in place when it is already C-contiguous float64
    (anything else is converted once). Raises ``ValueError`` naming the first offending row
    and column. Runs a numba kernel in parallel over rows; the first call in a process imports
    numba and loads (or, once per machine, compiles) it.
    """
    ppy = _check_periods_per_year(periods_per_year)
    sr_star = _deflation_benchmark(n_trials, trials_sharpe_variance, ppy)
    m = np.ascontiguousarray(_as_float_array(matrix, 2, "matrix"))
    out, err = _k.run_cohort(m, ppy, sr_star)
    bad_rows = np.flatnonzero(err[:, 0])
    if bad_rows.size:
        i = int(bad_rows[0])
        code, j = int(err[i, 0]), int(err[i, 1])
        start = _first_observation(m[i])
        raise ValueError(_error_message(f"matrix[{i}, {j}]", code, float(m[i, j]),
                                        f"column {start}"))
    keys = _k.KEYS if sr_star == sr_star else _k.KEYS[:-1]
    return {key: out[i] for i, key in enumerate(keys)}


def _series_metrics(x: npt.NDArray[np.float64], start: int, out: npt.NDArray[np.float64],
                    ppy: float, sr_star: float) -> None:
    """The numpy version of ``_metrics_kernels.row_metrics`` for one series after leading NaN.

    Vectorised sufficient statistics, then the *same* ``finish_row`` and ``quantile`` as the
    kernel, so the two paths differ only in summation order (~1e-15 relative).
    """
    n = x.size
    valid = (x >= -1.0) & (x < np.inf)
    first_bad = int(np.argmin(valid)) if not valid.all() else n
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is detected just below
        wealth = np.cumprod(1.0 + x)
    finite = np.isfinite(wealth)
    first_overflow = int(np.argmin(finite)) if not finite.all() else n
    if first_bad < n and first_bad <= first_overflow:
        j = start + first_bad
        raise ValueError(_error_message(f"returns[{j}]", _value_error_code(x[first_bad]),
                                        float(x[first_bad]), f"index {start}"))
    if first_overflow < n:
        raise ValueError(_error_message(f"returns[{start + first_overflow}]",
                                        _k.ERR_WEALTH_OVERFLOW, float(x[first_overflow]), ""))
    if n == 0:
        _k.finish_row(out, 0, 0, ppy, sr_star, math.nan, 0.0, 0.0, 0.0, 1.0, 0.0,
                      0, 0, 0.0, 0.0, 0.0, math.nan, math.nan, 0.0, 1)
        return

    lo = float(x.min())
    hi = float(x.max())
    mean = float(x.sum()) / n
    neg = np.minimum(x, 0.0)
    peak = np.maximum(np.maximum.accumulate(wealth), 1.0)  # starting wealth 1.0 is a peak
    mdd = float(((peak - wealth) / peak).max())
    s2 = s3 = s4 = 0.0
    if lo != hi:  # constant series keep exact zero moments, as in the kernel
        d = x - mean
        d2 = d * d
        s2 = float(d2.sum())
        s3 = float((d2 * d).sum())
        s4 = float((d2 * d2).sum())

    h5 = (n - 1) * 0.05
    h95 = (n - 1) * 0.95
    k5 = int(math.floor(h5))
    k95 = int(math.floor(h95))
    if n == 1 or lo == hi:
        p5 = p95 = lo
    else:
        part = np.partition(x, sorted({k5, k5 + 1, k95, k95 + 1}))
        p5 = _k.quantile(float(part[k5]), float(part[k5 + 1]), h5 - k5)
        p95 = _k.quantile(float(part[k95]), float(part[k95 + 1]), h95 - k95)
    tail = x[x <= p5]

    _k.finish_row(out, 0, n, ppy, sr_star, mean, s2, s3, s4, float(wealth[-1]), mdd,
                  int(np.count_nonzero(x > 0.0)), int(np.count_nonzero(x < 0.0)),
                  float(np.maximum(x, 0.0).sum()), float(neg.sum()), float((neg * neg).sum()),
                  p5, p95, float(tail.sum()), int(tail.size))


def _as_float_array(data: npt.ArrayLike, ndim: int, name: str) -> npt.NDArray[np.float64]:
    """``data`` as a float64 array of exactly ``ndim`` dimensions, or ``ValueError``."""
    arr: npt.NDArray[Any] = np.asarray(data)
    if arr.dtype.kind == "O":
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must contain only numbers: {exc}") from exc
    elif arr.dtype.kind not in "fiu":  # bool, complex, strings, dates: not returns
        raise ValueError(f"{name} must contain real numbers, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        shape = "a 1-D series" if ndim == 1 else "a 2-D matrix (rows = strategies)"
        raise ValueError(f"{name} must be {shape}, got shape {arr.shape}")
    return arr.astype(np.float64, copy=False)


def _first_observation(series: npt.NDArray[np.float64]) -> int:
    """Index of the first non-NaN value (``len(series)`` when there is none)."""
    present = ~np.isnan(series)
    return int(np.argmax(present)) if present.any() else series.size


def _value_error_code(x: float) -> int:
    if math.isnan(x):
        return _k.ERR_NAN_INSIDE
    if math.isinf(x):
        return _k.ERR_INFINITE
    return _k.ERR_BELOW_MINUS_ONE


def _error_message(where: str, code: int, value: float, first: str) -> str:
    """One wording for both paths, so a row error reads like a series error."""
    if code == _k.ERR_NAN_INSIDE:
        return (f"{where} is NaN after the first observation (at {first}): NaN may only mark "
                "missing leading history; fill or drop gaps inside a series explicitly")
    if code == _k.ERR_INFINITE:
        return f"{where} is {value}: returns must be finite"
    if code == _k.ERR_BELOW_MINUS_ONE:
        return (f"{where} = {value!r} is below -1: a simple return cannot lose more than 100% "
                "(log or percent returns?)")
    return (f"compounded wealth overflows float64 at {where} = {value!r} "
            "(percent returns instead of fractions?)")


def _check_periods_per_year(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"periods_per_year must be a number, got {value!r}")
    ppy = float(value)
    if not (math.isfinite(ppy) and ppy > 0.0):
        raise ValueError(f"periods_per_year must be finite and positive, got {value!r}")
    return ppy


def _deflation_benchmark(n_trials: int | None, variance: float | None, ppy: float) -> float:
    """SR*, the per-period Sharpe the best of ``n_trials`` unskilled trials reaches on average.

    NaN when ``n_trials`` is None (no ``dsr``). Bailey & López de Prado (2014), eq. for
    E[max SR]: sqrt(V)·((1-γ)·Φ⁻¹(1-1/N) + γ·Φ⁻¹(1-1/(N·e))), V de-annualised by ``ppy``.
    """
    if n_trials is None:
        if variance is not None:
            raise ValueError("trials_sharpe_variance needs n_trials (the number of trials)")
        return math.nan
    if isinstance(n_trials, bool) or not isinstance(n_trials, numbers.Integral) or n_trials < 1:
        raise ValueError(f"n_trials must be an integer >= 1, got {n_trials!r}")
    if n_trials > MAX_TRIALS:
        raise ValueError(f"n_trials is too large ({len(str(int(n_trials)))} digits): at most 1e300 "
                         "trials can be deflated")
    if variance is not None:
        if isinstance(variance, bool) or not isinstance(variance, numbers.Real):
            raise ValueError(f"trials_sharpe_variance must be a number, got {variance!r}")
        if not (math.isfinite(float(variance)) and variance >= 0):
            raise ValueError(f"trials_sharpe_variance must be finite and >= 0, got {variance!r}")
    if n_trials == 1:
        return 0.0  # the maximum of one trial is that trial: no deflation
    if variance is None:
        raise ValueError("dsr with n_trials > 1 needs trials_sharpe_variance (the variance of "
                         "the trials' annualised Sharpe ratios)")
    inv = NormalDist().inv_cdf
    # Φ⁻¹(1 - p) = -Φ⁻¹(p): 1 - 1/N rounds to 1.0 past 2^53 (and loses digits long before);
    # the lower tail keeps 1/N exact. N·e is formed as a float so a huge int cannot overflow.
    p1 = 1.0 / n_trials
    p2 = p1 / math.e
    expected_max_z = (1.0 - _EULER_GAMMA) * -inv(p1) + _EULER_GAMMA * -inv(p2)
    return math.sqrt(float(variance) / ppy) * expected_max_z
