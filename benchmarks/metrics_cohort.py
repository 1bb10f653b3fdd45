"""Benchmark ``compute_cohort``: 10,000 strategies x 2,520 daily returns, every metric.

Prints the one-off cost of the first call (numba import + cache load, and the cold JIT compile
measured in a subprocess with an empty cache dir), the steady-state time, the peak extra memory
(numpy allocations via tracemalloc, and the process's resident-set high-water mark), and the
speed-up over looping empyrical per strategy (sharpe, sortino, max_drawdown, annual_volatility,
cagr, calmar, tail_ratio, cum_returns_final on numpy arrays) measured in the same run.

Goals: >= 10x and < 0.5 s on 2 cores, peak extra memory below the input's size. Exits 1 when a
hard limit is broken (< 4x, > 1.5 s, or extra memory >= the input).

    .venv/bin/python benchmarks/metrics_cohort.py [--rows N] [--cols N] [--no-cold]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def make_matrix(rows: int, cols: int, seed: int = 20240) -> npt.NDArray[np.float64]:
    """Fat-tailed daily returns; 10 % of the rows miss a random stretch of leading history."""
    rng = np.random.default_rng(seed)
    matrix = rng.standard_t(4, size=(rows, cols))
    matrix *= 0.01 / np.sqrt(2.0)  # t(4) has variance 2: ~1 % daily volatility
    matrix += rng.normal(0.0003, 0.0005, size=(rows, 1))  # each strategy its own drift
    late = rng.choice(rows, size=rows // 10, replace=False)
    for i, start in zip(late, rng.integers(1, cols - 20, size=late.size)):
        matrix[i, :start] = np.nan
    return matrix


def _vm_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux >= 4.0); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cold_compile_seconds() -> float:
    """JIT compile time with an empty numba cache, in a fresh interpreter (real cache untouched)."""
    code = ("import time, numpy as np; from qmtl_core.metrics import compute_cohort; "
            "t = time.perf_counter(); compute_cohort(np.zeros((2, 10))); "
            "print(time.perf_counter() - t)")
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache, "PYTHONPATH": str(ROOT)}
        done = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                              capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1])


def empyrical_loop(matrix: npt.NDArray[np.float64]) -> float:
    """Seconds to compute the eight empyrical metrics strategy by strategy on numpy arrays."""
    import empyrical as ep

    present = ~np.isnan(matrix)
    starts = np.where(present.any(axis=1), present.argmax(axis=1), matrix.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        for row, start in zip(matrix, starts):
            r = row[start:]
            ep.sharpe_ratio(r)
            ep.sortino_ratio(r)
            ep.max_drawdown(r)
            ep.annual_volatility(r)
            ep.cagr(r)
            ep.calmar_ratio(r)
            ep.tail_ratio(r)
            ep.cum_returns_final(r)
        return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--cols", type=int, default=2_520)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-compile subprocess")
    args = parser.parse_args()

    matrix = make_matrix(args.rows, args.cols)
    input_mb = matrix.nbytes / 1e6
    print(f"input: {args.rows} strategies x {args.cols} periods, {input_mb:.0f} MB float64, "
          f"{int(np.isnan(matrix[:, 0]).sum())} rows with missing leading history")

    t0 = time.perf_counter()
    from qmtl_core import _metrics_kernels
    from qmtl_core.metrics import compute_cohort, compute_metrics

    print(f"import qmtl_core.metrics: {time.perf_counter() - t0:.3f} s "
          f"(numba imported: {'numba' in sys.modules})")

    if not args.no_cold:
        print(f"cold JIT compile (empty cache, fresh process): {cold_compile_seconds():.2f} s")
    t0 = time.perf_counter()
    compute_cohort(matrix[:2])
    warm = time.perf_counter() - t0
    stats = _metrics_kernels.compiled_cohort_kernel().stats  # type: ignore[attr-defined]
    source = "loaded from the on-disk cache" if stats.cache_hits else "compiled (cache was empty)"
    import numba

    layer = getattr(numba, "threading_layer")()  # not in numba's typed exports
    print(f"first call in this process (import numba + kernel {source}): {warm:.2f} s; "
          f"{numba.get_num_threads()} threads, layer {layer}")

    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        result = compute_cohort(matrix)
        times.append(time.perf_counter() - t0)
    best, median = min(times), statistics.median(times)
    print(f"compute_cohort, all {len(result)} metrics: best {best:.3f} s, median {median:.3f} s "
          f"({median / args.rows * 1e6:.1f} us per strategy)")

    del result
    rss_reset = _reset_peak_rss()
    rss_before = _vm_kib("VmRSS")
    tracemalloc.start()
    compute_cohort(matrix)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    hwm = _vm_kib("VmHWM")
    traced_mb = traced_peak / 1e6
    print(f"peak extra memory: {traced_mb:.1f} MB traced by tracemalloc (numpy allocations)", end="")
    rss_mb = None
    if rss_reset and rss_before is not None and hwm is not None:
        rss_mb = max(hwm - rss_before, 0) * 1024 / 1e6
        print(f", {rss_mb:.1f} MB resident-set growth (includes numba's own allocations)")
    else:
        print(" (resident-set high-water mark not resettable here)")

    loop = empyrical_loop(matrix)
    ratio = loop / median
    print(f"empyrical loop, 8 metrics per strategy: {loop:.2f} s "
          f"({loop / args.rows * 1e3:.3f} ms per strategy)")
    print(f"speed-up: {ratio:.1f}x (median cohort time vs the loop)")

    t0 = time.perf_counter()
    sample = min(args.rows, 500)
    for row in matrix[:sample]:
        compute_metrics(row)
    print(f"compute_metrics (numpy 1-D path): {(time.perf_counter() - t0) / sample * 1e3:.3f} ms "
          "per strategy")

    extra = max(traced_mb, rss_mb or 0.0)
    goal = ratio >= 10 and median < 0.5 and extra < input_mb
    broken = ratio < 4 or median > 1.5 or extra >= input_mb
    print("goal (>=10x, <0.5 s, memory < input):", "met" if goal else "NOT met",
          "| hard limits:", "BROKEN" if broken else "ok")
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
