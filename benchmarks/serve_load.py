"""Load on remote mode: 50 concurrent clients posting evaluations to two `qmtl serve` processes that
share one PostgreSQL, for 60 s. Prints requests/s and p50/p99 latency, then proves from the store
that no acknowledged run was lost and none was duplicated.

Every write appends to the hash-chained ledger, which serialises writers on its head row: the
throughput is that of one ordered chain, whatever the number of servers. The reference in the same
run is a plain `GET /healthz` loop (the HTTP stack without the store), so the ratio shows what the
evaluation itself costs.

Run: .venv/bin/python benchmarks/serve_load.py [--seconds 60] [--clients 50]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests._pg import PgCluster  # noqa: E402 (the same throwaway cluster the tests use)

WORLD = """\
world: load
policy_version: 1
rules:
  - {id: sharpe, metric: sharpe, min: 0.5}
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server {url} exited: {proc.stderr.read().decode()[-500:] if proc.stderr else ''}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit(f"server {url} did not come up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=50)
    args = parser.parse_args()

    cluster = PgCluster().start()
    url_db = cluster.new_database()
    tmp = Path(tempfile.mkdtemp(prefix="qmtl-load-"))
    (tmp / "worlds").mkdir()
    (tmp / "worlds" / "load.yaml").write_text(WORLD)
    env = {**os.environ, "QMTL_DATABASE_URL": url_db, "QMTL_WORLDS_DIR": str(tmp / "worlds"),
           "QMTL_HOME": str(tmp / "home"), "PYTHONPATH": str(ROOT)}
    qmtl = [sys.executable, "-m", "qmtl_cli"]
    token = subprocess.run([*qmtl, "token", "create", "--actor", "load", "--role", "operator", "--json"], env=env,
                           capture_output=True, text=True, check=True).stdout
    token = __import__("json").loads(token)["token"]
    servers = []
    try:
        for _ in range(2):
            port = _port()
            proc = subprocess.Popen([*qmtl, "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
            servers.append((f"http://127.0.0.1:{port}", proc))
        for url, proc in servers:
            _wait(url, proc)

        def hammer(path: str, body_for, seconds: float) -> tuple[list[float], list[str], int]:
            latencies: list[float] = []
            acked: list[str] = []
            errors = 0
            lock = threading.Lock()
            stop = time.monotonic() + seconds

            def client(i: int) -> None:
                nonlocal errors
                url = servers[i % len(servers)][0]
                with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
                    n = 0
                    while time.monotonic() < stop:
                        body, key = body_for(i, n)
                        t0 = time.perf_counter()
                        try:
                            r = http.request("POST" if body is not None else "GET", path, json=body)
                            ok = r.status_code == 200
                        except httpx.HTTPError:
                            ok = False
                        dt = time.perf_counter() - t0
                        with lock:
                            if ok:
                                latencies.append(dt)
                                if key:
                                    acked.append(key)
                            else:
                                errors += 1
                        n += 1

            threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return latencies, acked, errors

        ref_seconds = min(10.0, args.seconds / 4)
        ref_lat, _, ref_err = hammer("/healthz", lambda i, n: (None, None), ref_seconds)

        def evaluation(i: int, n: int) -> tuple[dict[str, object], str]:
            run_id = f"c{i}-r{n}"
            return ({"strategy_id": f"s{i}", "stage": "backtest", "run_id": run_id,
                     "metrics": {"sharpe": 0.4 + (n % 10) / 10}}, f"s{i}/{run_id}")

        lat, acked, errors = hammer("/worlds/load/evaluate", evaluation, args.seconds)

        import sqlalchemy as sa

        from qmtl_core.store import open_store, schema

        store = open_store(url_db)
        with store.read() as conn:
            rows = conn.execute(sa.select(schema.evaluation_runs.c.strategy_id, schema.evaluation_runs.c.run_id,
                                          schema.evaluation_runs.c.latest_revision)).all()
            revisions = conn.execute(sa.select(sa.func.count()).select_from(schema.run_revisions)).scalar()
        from qmtl_core import ledger

        with store.read() as conn:
            verified = ledger.verify(conn)
        store.dispose()
        stored = {f"{r.strategy_id}/{r.run_id}" for r in rows}
        lost = set(acked) - stored
        duplicated = len(acked) - len(set(acked))
        rps = len(lat) / args.seconds
        ref_rps = len(ref_lat) / ref_seconds
        q = statistics.quantiles(lat, n=100) if len(lat) >= 100 else [max(lat or [0])] * 99
        print(f"clients {args.clients}, servers 2, one PostgreSQL, {args.seconds:.0f} s")
        print(f"evaluations   {len(lat)} ok, {errors} failed: {rps:.0f} req/s, p50 {statistics.median(lat) * 1000:.1f} ms,"
              f" p99 {q[98] * 1000:.1f} ms")
        print(f"reference     GET /healthz {ref_rps:.0f} req/s ({ref_err} failed): evaluations run at "
              f"{rps / ref_rps:.2f}x the bare HTTP rate")
        print(f"store         {len(rows)} runs, {revisions} revisions; acknowledged {len(acked)}; "
              f"lost {len(lost)}; duplicated {duplicated}; every run one revision: "
              f"{all(r.latest_revision == 1 for r in rows)}; ledger verifies: {verified.ok}")
        if lost or duplicated or revisions != len(rows) or not verified.ok:
            raise SystemExit(1)
    finally:
        for _, proc in servers:
            proc.terminate()
        for _, proc in servers:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        cluster.stop()


if __name__ == "__main__":
    main()
