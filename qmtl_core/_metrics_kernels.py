"""Per-row metric kernels shared by ``compute_metrics`` (1-D) and ``compute_cohort`` (2-D).

Everything here is plain Python written in the subset numba compiles, and this module never
imports numba at import time: ``qmtl_core.metrics`` imports :func:`finish_row` and
:func:`quantile` from here for the numpy 1-D path, and only :func:`compiled_cohort_kernel`
(called by ``compute_cohort``) imports numba and compiles the row loop.

Why one file: numba's on-disk cache (``cache=True``) is invalidated by the modification stamp
of the file that defines the *compiled* function only, not of the functions it calls. Keeping
the scalar definitions (:func:`finish_row`, :func:`quantile`) next to the kernel means an edit
to any definition recompiles the kernel, so the cohort path can never run stale formulas while
the 1-D path runs fresh ones.

The definitions themselves are documented in ``qmtl_core.metrics``.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any, Callable

import numpy as np
import numpy.typing as npt

from qmtl_core.metric_names import RETURN_METRICS

#: Output rows of the ``out`` array, in this order (``dsr`` last; dropped when not requested).
KEYS: tuple[str, ...] = RETURN_METRICS + ("dsr",)

# Row indices into ``out``; module-level ints are compile-time constants for numba.
TOTAL_RETURN = 0
CAGR = 1
ANNUAL_VOLATILITY = 2
SHARPE = 3
SORTINO = 4
MAX_DRAWDOWN = 5
CALMAR = 6
WIN_RATE = 7
PROFIT_FACTOR = 8
TAIL_RATIO = 9
N_OBSERVATIONS = 10
EFFECTIVE_HISTORY_YEARS = 11
SKEW = 12
KURTOSIS = 13
VAR_95 = 14
CVAR_95 = 15
PSR = 16
DSR = 17
N_KEYS = 18

# Error codes a row can report (``err[i] = (code, column)``); 0 means the row is valid.
ERR_NONE = 0
ERR_NAN_INSIDE = 1
ERR_INFINITE = 2
ERR_BELOW_MINUS_ONE = 3
ERR_WEALTH_OVERFLOW = 4

#: Fewest observations ``psr``/``dsr`` are reported from: below it the normal approximation
#: of the Sharpe ratio's sampling distribution they rest on does not hold (two returns can give
#: psr = 1.0), so they are NaN, "not measured".
PSR_MIN_OBSERVATIONS = 30

#: Dispersion at or below this many float64 epsilons of the data's scale (1 + |mean|, the wealth
#: ratios simple returns come from) is rounding noise, not risk: ``p[1:] / p[:-1] - 1`` of a price
#: growing by a constant rate varies by ~1e-16, which would read as a Sharpe of ~1e13.
DISPERSION_RESOLUTION = 1024 * 2.220446049250313e-16

# Above this exponent ``expm1`` overflows float64 (log of the largest double is ~709.78).
_MAX_EXP = 709.78
_SQRT2 = math.sqrt(2.0)

# numba recognises a parallel loop by the global ``prange`` *object* at compile time;
# :func:`compiled_cohort_kernel` rebinds this name to ``numba.prange`` before compiling.
# In plain Python it is the builtin ``range``.
prange: Any = range


def quantile(lo: float, hi: float, gamma: float) -> float:
    """Linear interpolation between order statistics ``lo <= hi``, exactly as numpy does.

    numpy's ``percentile(method="linear")`` interpolates from the upper neighbour when the
    weight is >= 0.5 (fewer rounding errors); doing the same keeps ``var_95`` bit-identical to
    ``np.percentile``, which matters because ``cvar_95`` tests ``r <= p`` against the result.
    """
    diff = hi - lo
    if gamma >= 0.5:
        return hi - diff * (1.0 - gamma)
    return lo + diff * gamma


def normal_cdf(z: float) -> float:
    """Standard normal CDF; ``erfc`` keeps precision in the lower tail where ``1+erf`` cancels."""
    return 0.5 * math.erfc(-z / _SQRT2)


def finish_row(out: npt.NDArray[np.float64], col: int, n: int, ppy: float, sr_star: float,
               mean: float, s2: float, s3: float, s4: float, wealth: float, mdd: float,
               n_pos: int, n_neg: int, sum_pos: float, sum_neg: float, down_sq: float,
               p5: float, p95: float, tail_sum: float, tail_count: int) -> None:
    """Turn one row's sufficient statistics into every metric, written to ``out[:, col]``.

    ``s2, s3, s4`` are the central sums Σ(r-mean)^k (exactly 0 for constant rows), ``wealth``
    the final compounded wealth from 1.0, ``mdd`` the maximum drawdown fraction, ``down_sq``
    Σmin(r,0)², ``p5``/``p95`` the linear-interpolated percentiles and ``tail_sum/tail_count``
    the sum and count of returns <= ``p5``. ``sr_star`` is the per-period deflation benchmark
    for ``dsr`` (NaN when the number of trials is unknown).

    Every division is guarded explicitly: an undefined ratio is NaN, never ±inf, and (because
    this also runs as plain Python) never a ZeroDivisionError or OverflowError.
    """
    nan = math.nan
    out[N_OBSERVATIONS, col] = n
    out[EFFECTIVE_HISTORY_YEARS, col] = n / ppy
    if n == 0:
        for key in range(N_KEYS):
            if key != N_OBSERVATIONS and key != EFFECTIVE_HISTORY_YEARS:
                out[key, col] = nan
        return

    out[TOTAL_RETURN, col] = wealth - 1.0
    # cagr = wealth ** (1/years) - 1, via expm1(log) so small growth rates keep full precision
    # and a huge exponent yields inf instead of raising OverflowError in plain Python.
    if wealth == 0.0:
        cagr = -1.0
    else:
        expo = math.log(wealth) / (n / ppy)
        cagr = math.inf if expo >= _MAX_EXP else math.expm1(expo)
    out[CAGR, col] = cagr

    # Sample (ddof=1) dispersion; s2 == 0 exactly for constant rows (the caller checks
    # min == max), so a constant series gets NaN ratios rather than ~1e15 from rounding noise.
    # Dispersion below float resolution at the data's scale is the same rounding noise: zero.
    std = math.sqrt(s2 / (n - 1)) if n >= 2 else nan
    if std <= DISPERSION_RESOLUTION * (1.0 + abs(mean)):
        s2 = 0.0
        s3 = 0.0
        s4 = 0.0
        std = 0.0 if n >= 2 else nan
    out[ANNUAL_VOLATILITY, col] = std * math.sqrt(ppy)
    sr = mean / std if std > 0.0 else nan  # per-period Sharpe; NaN comparisons are False
    out[SHARPE, col] = sr * math.sqrt(ppy)

    downside = math.sqrt(down_sq / n) * math.sqrt(ppy)
    out[SORTINO, col] = mean * ppy / downside if n >= 2 and downside > 0.0 else nan

    out[MAX_DRAWDOWN, col] = mdd
    calmar = cagr / mdd if mdd > 0.0 else nan
    out[CALMAR, col] = calmar if math.isfinite(calmar) else nan

    out[WIN_RATE, col] = n_pos / (n_pos + n_neg) if n_pos + n_neg > 0 else nan
    out[PROFIT_FACTOR, col] = sum_pos / -sum_neg if sum_neg < 0.0 else nan
    out[TAIL_RATIO, col] = abs(p95) / abs(p5) if p5 != 0.0 else nan

    # Population moments (no bias correction), kurtosis in excess of the normal's 3.
    m2 = s2 / n
    m2_15 = m2 * math.sqrt(m2)  # not m2 ** 1.5: float ** raises OverflowError in Python
    m2_sq = m2 * m2
    skew = (s3 / n) / m2_15 if m2_15 > 0.0 else nan
    kurt = (s4 / n) / m2_sq - 3.0 if m2_sq > 0.0 else nan
    out[SKEW, col] = skew
    out[KURTOSIS, col] = kurt

    out[VAR_95, col] = 0.0 - p5  # 0.0 - x, not -x: a zero percentile reports 0.0, not -0.0
    out[CVAR_95, col] = 0.0 - tail_sum / tail_count

    # Probabilistic / deflated Sharpe (Bailey & López de Prado) on the per-period Sharpe.
    psr = nan
    dsr = nan
    if n >= PSR_MIN_OBSERVATIONS and sr == sr:
        inner = 1.0 - skew * sr + (kurt + 2.0) / 4.0 * sr * sr
        if inner > 0.0:
            scale = math.sqrt(n - 1) / math.sqrt(inner)
            psr = normal_cdf(sr * scale)
            if sr_star == sr_star:
                dsr = normal_cdf((sr - sr_star) * scale)
    out[PSR, col] = psr
    out[DSR, col] = dsr


def select(a: npt.NDArray[np.float64], lo: int, hi: int, k: int) -> None:
    """Reorder ``a[lo:hi+1]`` in place so ``a[k]`` holds its rank-k value (quickselect).

    Afterwards ``a[lo:k] <= a[k] <= a[k+1:hi+1]``. The partition loop is branch-free (a swap
    every step, the store index advanced by the comparison): on random data that is ~3x faster
    than Hoare's branchy scan, which mispredicts half its comparisons. Runs of values equal to
    the pivot (returns with many exact zeros) are split off by a second pass when the first
    one barely shrinks the range, so ties cannot make it quadratic; a pathological input that
    still exhausts the iteration budget is simply sorted (O(n log n)).
    """
    budget = 64
    while hi - lo > 16:
        budget -= 1
        if budget == 0:
            a[lo:hi + 1].sort()
            return
        mid = (lo + hi) // 2
        x = a[lo]
        y = a[mid]
        z = a[hi]
        if (x <= y) == (y <= z):
            p = mid
        elif (y <= x) == (x <= z):
            p = lo
        else:
            p = hi
        pivot = a[p]
        a[p] = a[hi]
        a[hi] = pivot
        store = lo
        for j in range(lo, hi):
            v = a[j]
            a[j] = a[store]
            a[store] = v
            store += v < pivot
        a[hi] = a[store]
        a[store] = pivot
        # Now a[lo:store] < pivot == a[store] <= a[store+1:hi+1].
        if k < store:
            hi = store - 1
        elif k == store:
            return
        else:
            size = hi - lo
            lo = store + 1
            if 8 * (hi - lo) > 7 * size:  # barely shrank: gather the pivot's ties in front
                eq = lo
                for j in range(lo, hi + 1):
                    v = a[j]
                    a[j] = a[eq]
                    a[eq] = v
                    eq += v <= pivot
                if k < eq:
                    return  # a[lo:eq] all equal the pivot
                lo = eq
    for i in range(lo + 1, hi + 1):  # insertion sort of the short remainder
        v = a[i]
        j = i - 1
        while j >= lo and a[j] > v:
            a[j + 1] = a[j]
            j -= 1
        a[j + 1] = v


def order_pair(a: npt.NDArray[np.float64], lo: int, hi: int, k: int) -> tuple[float, float]:
    """Values of rank ``k`` and ``k+1`` within ``a[lo:hi+1]`` (``lo <= k < hi``).

    Selects rank ``k+1`` (so ``a[lo:k+2]`` holds the k+2 smallest) and takes rank ``k`` as the
    maximum of the part below it: one select and a short scan instead of two selects.
    """
    select(a, lo, hi, k + 1)
    below = a[lo]
    for j in range(lo + 1, k + 1):
        below = max(below, a[j])
    return below, a[k + 1]


def row_metrics(row: npt.NDArray[np.float64], buf: npt.NDArray[np.float64],
                out: npt.NDArray[np.float64], col: int, ppy: float,
                sr_star: float) -> tuple[int, int]:
    """All metrics of one row (leading NaN = missing history) in one fused pass plus selects.

    Returns ``(error_code, column)``; on an error nothing is written for the row. ``buf`` is
    scratch of at least ``len(row)`` floats (the partial sorts must not reorder the input).
    """
    n_cols = row.shape[0]
    start = 0
    while start < n_cols and math.isnan(row[start]):
        start += 1
    n = n_cols - start
    total = 0.0
    lo = math.inf
    hi = -math.inf
    n_pos = 0
    n_neg = 0
    sum_pos = 0.0
    sum_neg = 0.0
    down_sq = 0.0
    wealth = 1.0
    peak = 1.0  # the starting wealth counts as a peak
    trough = 1.0  # lowest wealth since the current peak
    mdd = 0.0
    for j in range(start, n_cols):
        x = row[j]
        if not (x >= -1.0 and x < math.inf):  # one test catches NaN, ±inf and r < -100 %
            if math.isnan(x):
                return ERR_NAN_INSIDE, j
            if math.isinf(x):
                return ERR_INFINITE, j
            return ERR_BELOW_MINUS_ONE, j
        buf[j - start] = x
        total += x
        lo = min(lo, x)
        hi = max(hi, x)
        # Branch-free sign split: the sign of a return is a coin flip the CPU cannot predict.
        neg = min(x, 0.0)
        sum_pos += max(x, 0.0)
        sum_neg += neg
        down_sq += neg * neg
        n_pos += x > 0.0
        n_neg += x < 0.0
        wealth *= 1.0 + x
        if wealth > peak:
            if wealth == math.inf:  # compounding past float64 (e.g. returns given in percent)
                return ERR_WEALTH_OVERFLOW, j
            # (peak - w) / peak falls as w rises, so each peak's deepest point is its trough:
            # one division per new peak instead of one per period, and the same bits.
            mdd = max(mdd, (peak - trough) / peak)
            peak = wealth
            trough = wealth
        else:
            trough = min(trough, wealth)
    mdd = max(mdd, (peak - trough) / peak)
    if n == 0:
        finish_row(out, col, 0, ppy, sr_star, math.nan, 0.0, 0.0, 0.0, 1.0, 0.0,
                   0, 0, 0.0, 0.0, 0.0, math.nan, math.nan, 0.0, 1)
        return ERR_NONE, -1

    mean = total / n
    s2 = 0.0
    s3 = 0.0
    s4 = 0.0
    if lo != hi:  # constant rows keep exact zero moments (see finish_row)
        for j in range(n):
            d = buf[j] - mean
            d2 = d * d
            s2 += d2
            s3 += d2 * d
            s4 += d2 * d2

    # Percentiles need the order statistics of ranks k and k+1 around each virtual index.
    h5 = (n - 1) * 0.05
    h95 = (n - 1) * 0.95
    k5 = int(math.floor(h5))
    k95 = int(math.floor(h95))
    if n == 1:
        p5 = buf[0]
        p95 = buf[0]
    elif lo == hi:
        p5 = lo
        p95 = lo
    else:
        a5, b5 = order_pair(buf, 0, n - 1, k5)
        if k95 == k5:
            a95, b95 = a5, b5
        else:  # ranks >= k5+1 now sit in buf[k5+1:]
            a95, b95 = order_pair(buf, k5 + 1, n - 1, k95)
        p5 = quantile(a5, b5, h5 - k5)
        p95 = quantile(a95, b95, h95 - k95)
    tail_sum = 0.0
    tail_count = 0
    for j in range(n):
        x = buf[j]
        inside = x <= p5
        tail_sum += x if inside else 0.0
        tail_count += inside

    finish_row(out, col, n, ppy, sr_star, mean, s2, s3, s4, wealth, mdd, n_pos, n_neg,
               sum_pos, sum_neg, down_sq, p5, p95, tail_sum, tail_count)
    return ERR_NONE, -1


def cohort_rows(matrix: npt.NDArray[np.float64], ppy: float, sr_star: float,
                out: npt.NDArray[np.float64], err: npt.NDArray[np.int64]) -> None:
    """Run :func:`row_metrics` on every row; rows are independent, so the loop is parallel."""
    n_rows, n_cols = matrix.shape
    for i in prange(n_rows):
        # ~20 kB of scratch per row: small enough to stay in cache, and per-iteration
        # allocation keeps the parallel loop free of shared state.
        buf = np.empty(n_cols)
        code, col = row_metrics(matrix[i], buf, out, i, ppy, sr_star)
        err[i, 0] = code
        err[i, 1] = col


_compiled: Callable[..., None] | None = None
# One lock for compiling and for launching: the "workqueue" threading layer (chosen below when
# TBB is absent) aborts the process if two Python threads launch parallel kernels at once.
_kernel_lock = threading.Lock()


def compiled_cohort_kernel() -> Callable[..., None]:
    """The numba-compiled :func:`cohort_rows` (imports numba and compiles on first use).

    Compiled code is cached on disk in numba's default location (``__pycache__`` beside this
    file, or numba's user cache dir when that is read-only), so later processes only load it.
    """
    global _compiled, prange
    with _kernel_lock:
        if _compiled is None:
            import numba
            from numba.extending import register_jitable

            # Numba prefers GNU OpenMP on Linux, and a fork()ed child of a process that has
            # used it aborts ("fork() called from a process already using GNU OpenMP") — e.g.
            # a multiprocessing pool started after a cohort was scored. "forksafe" picks TBB
            # if installed, else workqueue (as fast here); the lock in run_cohort covers
            # workqueue's lack of thread safety. An explicit user choice is left alone.
            config: Any = numba.config
            if "NUMBA_THREADING_LAYER" not in os.environ and config.THREADING_LAYER == "default":
                config.THREADING_LAYER = "forksafe"

            for fn in (quantile, normal_cdf, finish_row, select, order_pair, row_metrics):
                register_jitable(fn)
            prange = numba.prange
            _compiled = numba.njit(parallel=True, cache=True, nogil=True)(cohort_rows)
        return _compiled


def run_cohort(matrix: npt.NDArray[np.float64], ppy: float,
               sr_star: float) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Run the compiled kernel on a C-contiguous float64 matrix: ``(out, err)``.

    ``out`` has shape ``(N_KEYS, n_rows)`` so each metric is one contiguous array;
    ``err[i] = (code, column)`` with code ``ERR_NONE`` for valid rows.
    """
    kernel = compiled_cohort_kernel()
    n_rows = matrix.shape[0]
    out = np.full((N_KEYS, n_rows), np.nan)
    err = np.zeros((n_rows, 2), dtype=np.int64)
    with _kernel_lock:
        kernel(matrix, float(ppy), float(sr_star), out, err)
    return out, err
