"""How long `qmtl --help` and the everyday reads take, each against a floor measured in the same run.

- `qmtl --help` and `qmtl world --help` against `python -c pass`. Goal: under 3x.
- The common reads (`world list`, `world campaign W`, `promote --list`, `world decision W`,
  `audit log --limit 20`) on a demo store against the floor of the chosen stack,
  `python -c "import sqlalchemy, pydantic, typer, yaml"`. Goal: each at most 1.2x.

Heavy libraries (numpy, FastAPI, cryptography, the PostgreSQL dialect) must load only inside the
commands that need them; `tests/test_cli_basics.py` checks that, this script measures the cost.
Commands are run in interleaved rounds (floor, then each command, round after round), so a change
in the machine's load hits every command alike; each figure is a median.

The demo store: pass `--home` (a `make demo` store: `--home .qmtl-demo`), or let the script build a
small one in a temp dir (the bundled worlds validated and recorded, the demo returns evaluated and
recorded, one campaign-loop pass executed: every read then has rows to show).

    .venv/bin/python benchmarks/cli_startup.py [--runs 15] [--home .qmtl-demo]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HELP_GOAL = 3.0
READ_GOAL = 1.2
FLOOR_STACK = [sys.executable, "-c", "import sqlalchemy, pydantic, typer, yaml"]
FLOOR_PASS = [sys.executable, "-c", "pass"]
QMTL = [sys.executable, "-m", "qmtl_cli"]
WORLD = "demo-momentum"
READS = {
    "world list": ["world", "list"],
    f"world campaign {WORLD}": ["world", "campaign", WORLD],
    "promote --list": ["promote", "--list"],
    f"world decision {WORLD}": ["world", "decision", WORLD],
    "audit log --limit 20": ["audit", "log", "--limit", "20"],
}


def _env(home: Path | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if home is not None:
        env["QMTL_HOME"] = str(home)
        env["QMTL_WORLDS_DIR"] = str(home / "worlds")
        env.pop("QMTL_SERVER", None)
    return env


def build_demo_store(home: Path) -> None:
    """A small demo store: what `make demo` records up to its first campaign-loop pass."""
    shutil.copytree(ROOT / "worlds", home / "worlds")
    env = _env(home)
    returns = str(ROOT / "worlds" / "data" / "demo-returns.csv")
    steps = [["world", "validate", "--all", "--record"],
             ["world", "evaluate", WORLD, "--record", "--returns", returns],
             ["world", "campaign-loop", "--world", WORLD, "--once", "--execute"]]
    for argv in steps:
        # Non-zero exits are part of the demo's story (blocked, waiting); only a bug (1) is fatal.
        done = subprocess.run(QMTL + argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode == 1:
            raise SystemExit(f"building the demo store failed at {' '.join(argv)}: {done.stderr.strip()}")


def _run_once(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and the child's CPU seconds (user + system: what the load inflates least)."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = child.stderr.read() if child.stderr else b""
    _, status, usage = os.wait4(child.pid, 0)
    elapsed = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode not in (0, 10, 11, 12):  # blocked/waiting/fail-closed are answers, not failures
        raise SystemExit(f"{' '.join(argv)} exited {child.returncode}: {stderr.decode(errors='replace').strip()}")
    return elapsed, usage.ru_utime + usage.ru_stime


def interleaved(commands: dict[str, list[str]], env: dict[str, str], runs: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds per command, the commands taking turns round after round."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for name, argv in commands.items():  # one warm-up each: OS caches and .pyc files
        _run_once(argv, env)
    for _ in range(runs):
        for name, argv in commands.items():
            samples[name].append(_run_once(argv, env))
    return {name: (statistics.median(w for w, _ in values), statistics.median(c for _, c in values))
            for name, values in samples.items()}


def _row(name: str, seconds: tuple[float, float], floor: tuple[float, float], goal: float | None) -> str:
    ratio, cpu_ratio = seconds[0] / floor[0], seconds[1] / floor[1]
    verdict = "" if goal is None else ("" if ratio <= goal else f"  MISSES goal <= {goal}x")
    return (f"{name:<40}{seconds[0] * 1000:8.1f} ms {ratio:5.2f}x   "
            f"cpu {seconds[1] * 1000:7.1f} ms {cpu_ratio:5.2f}x{verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15, help="rounds (each command once a round)")
    parser.add_argument("--home", type=Path, help="a demo store (QMTL_HOME) with its worlds/ beside it")
    parser.add_argument("--help-only", action="store_true", help="only the --help rows")
    args = parser.parse_args()

    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}, "
          f"{os.cpu_count()} cores; medians of {args.runs} interleaved rounds")
    plain = _env(None)
    helps = interleaved({"python -c pass": FLOOR_PASS, "qmtl --help": QMTL + ["--help"],
                         "qmtl world --help": QMTL + ["world", "--help"]}, plain, args.runs)
    base = helps.pop("python -c pass")
    print(_row("python -c pass", base, base, None))
    for name, seconds in helps.items():
        print(_row(name, seconds, base, HELP_GOAL if name == "qmtl --help" else None))
    if args.help_only:
        return

    with tempfile.TemporaryDirectory(prefix="qmtl-cli-bench-") as tmp:
        home = args.home.resolve() if args.home else Path(tmp) / "home"
        if args.home is None:
            build_demo_store(home)
        reads = {"import sqlalchemy, pydantic, typer, yaml": FLOOR_STACK}
        reads.update({f"qmtl {name}": QMTL + argv for name, argv in READS.items()})
        times = interleaved(reads, _env(home), args.runs)
    floor = times.pop("import sqlalchemy, pydantic, typer, yaml")
    print(_row("import sqlalchemy,pydantic,typer,yaml", floor, floor, None))
    for name, seconds in times.items():
        print(_row(name, seconds, floor, READ_GOAL))


if __name__ == "__main__":
    main()
