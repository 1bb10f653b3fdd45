"""Print a risk snapshot carrying a strategy's realized paper (or, with --stage live, live) returns,
its covariance and stress scenarios, for the demo.

A real deployment has a risk engine post these, as a trusted producer (a ``producer`` token, or an
OS account in the world's ``risk.producers``); the demo stands one in. The returns are the
strategy's last ``--days`` daily returns from ``worlds/data/demo-returns.csv`` (real GOOG prices),
replayed as the most recent ``--days`` observations ending now, one every ``--spacing-seconds``
(a day by default), so the snapshot is fresh and the paper
window advances by exactly that much data. The covariance is measured on the strategy's (and any
``--book`` strategies') last ``--cov-days`` returns; the stress scenarios are historical: each
strategy's actual return on GOOG's two worst days of that window. ``demo-momentum``'s ``book_var``
and ``book_stress`` rules gate on them. Only observations after the strategy entered
paper count: the demo posts one a second, as if just observed. Pipe it to the hub:

    .venv/bin/python examples/paper_snapshot.py --world demo-momentum --strategy sma_10_30 --days 12 \\
        | qmtl risk put -
"""

from __future__ import annotations

import argparse
import csv
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", required=True)
    parser.add_argument("--strategy", required=True)
    parser.add_argument("--days", type=int, required=True, help="paper days observed so far")
    parser.add_argument("--returns", default=str(ROOT / "worlds/data/demo-returns.csv"))
    parser.add_argument("--stage", default="paper", choices=["paper", "live"],
                        help="which stage's realized returns these are")
    parser.add_argument("--book", action="append", default=[],
                        help="another strategy in the snapshot's book (repeatable); weights are equal")
    parser.add_argument("--cov-days", type=int, default=250, help="returns the covariance is measured on")
    parser.add_argument("--spacing-seconds", type=int, default=86400,
                        help="seconds between two observations (default: a day)")
    args = parser.parse_args()
    names = [args.strategy, *args.book]
    with open(args.returns, newline="") as fh:
        rows = [row for row in csv.DictReader(fh) if all(row[n] for n in names)]
    values = [float(row[args.strategy]) for row in rows[-args.days:]]
    window = rows[-args.cov_days:]
    matrix = [[float(row[n]) for n in names] for row in window]
    means = [sum(col) / len(window) for col in zip(*matrix)]
    covariance = {f"{a},{b}": sum((m[i] - means[i]) * (m[j] - means[j]) for m in matrix) / (len(window) - 1)
                  for i, a in enumerate(names) for j, b in enumerate(names) if j >= i}
    worst = sorted(window, key=lambda row: float(row["buy_hold"]))[:2]
    stress = {f"goog_{row['timestamp']}": {n: float(row[n]) for n in names} for row in worst}
    now = datetime.now(timezone.utc).replace(microsecond=0)
    step = timedelta(seconds=args.spacing_seconds)
    last = now if args.spacing_seconds < 86400 else now.replace(hour=0, minute=0, second=0)
    points = [{"ts": (last - step * (len(values) - 1 - i)).isoformat().replace("+00:00", "Z"),
               "r": r} for i, r in enumerate(values)]
    snapshot = {
        "world_id": args.world,
        "version": f"{args.stage}-{args.strategy}-{args.days}-{now:%Y%m%dT%H%M%S}",
        "as_of": now.isoformat().replace("+00:00", "Z"),
        "ttl_sec": 3600,
        "weights": {n: 1.0 / len(names) for n in names},
        "covariance": covariance,
        "stress": stress,
        "realized_returns": {args.strategy: points},
        "provenance": {"actor": "demo-risk-engine", "stage": args.stage},
    }
    print(json.dumps(snapshot, indent=2))


if __name__ == "__main__":
    main()
