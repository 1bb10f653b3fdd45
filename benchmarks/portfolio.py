"""Benchmark the portfolio metrics: 1,000 candidates against a 50-strategy live book.

The vectorised kernel (``qmtl_core.portfolio.portfolio_kernel``: one matrix-vector product for
all candidates, σ²(b + w_c·e_c) = bᵀΣb + 2·w_c·Σ_cB·b + w_c²·Σ_cc) against a plain numpy loop
that, per candidate, builds the 51×51 covariance of the book with the candidate and computes
σ = √(wᵀΣw) of the book with and without it and its correlations with the book — what one would
write first. Both run in the same process on the same data; the results are checked equal before
anything is timed. Prints the times and the ratio (no pass/fail: the machine decides the numbers).

    .venv/bin/python benchmarks/portfolio.py [--candidates N] [--book M] [--repeat R]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from qmtl_core.portfolio import ES_FACTOR_99, Z_99, portfolio_kernel  # noqa: E402


def make_universe(n: int, m: int, periods: int = 500, seed: int = 21) -> tuple[np.ndarray, ...]:
    """A covariance of ``m + n`` strategies with a common factor (so correlations are real),
    book weights summing to 0.9 and candidate weights of 1-5 %."""
    rng = np.random.default_rng(seed)
    factor = rng.normal(0.0, 0.01, periods)
    loadings = rng.uniform(-0.5, 1.0, m + n)
    returns = loadings[:, None] * factor + rng.normal(0.0, 0.008, (m + n, periods))
    cov = np.cov(returns)
    book_w = rng.dirichlet(np.ones(m)) * 0.9
    cand_w = rng.uniform(0.01, 0.05, n)
    return cov[:m, :m].copy(), book_w, cov[m:, :m].copy(), np.diag(cov)[m:].copy(), cand_w


def loop(book_cov: np.ndarray, book_w: np.ndarray, cross: np.ndarray, cand_var: np.ndarray,
         cand_w: np.ndarray) -> dict[str, np.ndarray]:
    """The plain way: one full (m+1)×(m+1) matrix per candidate."""
    m = book_w.size
    ivar, ies, max_corr = np.empty(cand_w.size), np.empty(cand_w.size), np.empty(cand_w.size)
    for i in range(cand_w.size):
        full = np.empty((m + 1, m + 1))
        full[:m, :m] = book_cov
        full[m, :m] = full[:m, m] = cross[i]
        full[m, m] = cand_var[i]
        without = np.append(book_w, 0.0)
        with_c = np.append(book_w, cand_w[i])
        s_book = math.sqrt(without @ full @ without)
        s_with = math.sqrt(with_c @ full @ with_c)
        ivar[i] = Z_99 * (s_with - s_book)
        ies[i] = ES_FACTOR_99 * (s_with - s_book)
        sd = np.sqrt(np.diag(full))
        max_corr[i] = np.max(full[m, :m] / (sd[m] * sd[:m]))
    return {"incremental_var_99": ivar, "incremental_es_99": ies, "max_corr": max_corr}


def vectorised(book_cov: np.ndarray, book_w: np.ndarray, cross: np.ndarray, cand_var: np.ndarray,
               cand_w: np.ndarray) -> dict[str, np.ndarray]:
    out = portfolio_kernel(book_cov, book_w, cross, cand_var, cand_w)
    return {"incremental_var_99": out["incremental_var_99"], "incremental_es_99": out["incremental_es_99"],
            "max_corr": out["corr"].max(axis=1)}


def best_of(fn, args: tuple[np.ndarray, ...], repeat: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return min(times) if repeat < 5 else statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--book", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    data = make_universe(args.candidates, args.book)
    fast, slow = vectorised(*data), loop(*data)
    for key in fast:
        np.testing.assert_allclose(fast[key], slow[key], rtol=1e-9, atol=1e-15, err_msg=key)
    t_fast = best_of(vectorised, data, args.repeat)
    t_slow = best_of(loop, data, args.repeat)
    print(f"portfolio metrics: {args.candidates} candidates x {args.book}-strategy book "
          f"(same results, checked)")
    print(f"  vectorised kernel   {t_fast * 1e3:9.3f} ms")
    print(f"  numpy loop          {t_slow * 1e3:9.3f} ms")
    print(f"  ratio               {t_slow / t_fast:9.1f}x")


if __name__ == "__main__":
    main()
