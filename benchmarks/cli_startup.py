"""How long `qmtl --help` takes against `python -c pass`, measured in the same run.

Goal: under 3x. Heavy libraries (numpy, SQLAlchemy, pydantic, FastAPI) must load only inside the
commands that need them; `tests/test_cli_basics.py` checks that, this script measures the cost.
Run: .venv/bin/python benchmarks/cli_startup.py [--runs 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def _time(argv: list[str], runs: int) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    _time([sys.executable, "-c", "pass"], 3)  # warm the OS caches for both
    base = _time([sys.executable, "-c", "pass"], args.runs)
    help_ = _time([sys.executable, "-m", "qmtl_cli", "--help"], args.runs)
    world_help = _time([sys.executable, "-m", "qmtl_cli", "world", "--help"], args.runs)
    print(f"python -c pass      {base * 1000:7.1f} ms (median of {args.runs})")
    print(f"qmtl --help         {help_ * 1000:7.1f} ms  ratio {help_ / base:.2f}x (goal < 3x)")
    print(f"qmtl world --help   {world_help * 1000:7.1f} ms  ratio {world_help / base:.2f}x")


if __name__ == "__main__":
    main()
