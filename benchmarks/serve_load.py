"""Load on remote mode: clients posting evaluations to two `qmtl serve` processes that share one
PostgreSQL. Three phases, each against the same servers:

1. reference: a closed loop of `GET /healthz` (the HTTP stack without the store);
2. closed loop: 50 clients each posting evaluations back to back for 60 s, the maximum rate;
3. open loop: evaluations sent at a fixed arrival rate (default half the closed-loop maximum), each
   timed from the moment it was due, not from when a client got round to sending it (so a stall
   shows as latency, as a real caller would see it, instead of as fewer requests).

Prints requests/s and p50/p99/max latency per phase, then proves from the store that no
acknowledged run was lost and none was duplicated, and that the ledger verifies.

Run: .venv/bin/python benchmarks/serve_load.py [--seconds 60] [--clients 50] [--rate R] [--open-seconds S]
"""

from __future__ import annotations

import argparse
import os
import queue
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


def _quantiles(latencies: list[float]) -> str:
    if not latencies:
        return "no latencies"
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 100 else [max(latencies)] * 99
    return (f"p50 {statistics.median(latencies) * 1000:.1f} ms, p99 {q[98] * 1000:.1f} ms, "
            f"max {max(latencies) * 1000:.1f} ms")


def open_loop(servers: list[tuple[str, subprocess.Popen[bytes]]], token: str, rate: float, seconds: float,
              workers: int) -> tuple[list[float], list[str], int]:
    """Evaluations due at ``start + k / rate``, sent by a pool of ``workers`` threads; each latency runs
    from when the request was due. A request no sender was free for waits, and that wait counts."""
    due: "queue.Queue[tuple[int, float] | None]" = queue.Queue()
    latencies: list[float] = []
    acked: list[str] = []
    errors = 0
    lock = threading.Lock()
    ready = threading.Barrier(workers + 1)

    def sender(w: int) -> None:
        nonlocal errors
        url = servers[w % len(servers)][0]
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
            ready.wait()
            while (item := due.get()) is not None:
                k, at = item
                delay = at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                key = (f"o{k % 50}", f"open-{k}")
                try:
                    r = http.post("/worlds/load/evaluate", json={"strategy_id": key[0], "stage": "backtest",
                                                                 "run_id": key[1], "metrics": {"sharpe": 0.4 + (k % 10) / 10}})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                done = time.perf_counter()
                with lock:
                    if ok:
                        latencies.append(done - at)
                        acked.append(f"{key[0]}/{key[1]}")
                    else:
                        errors += 1

    threads = [threading.Thread(target=sender, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    ready.wait()  # every sender has its client before the first request is due
    start = time.perf_counter() + 0.5
    total = int(rate * seconds)
    for k in range(total):  # handed out a little ahead of time; each sender waits for its moment
        at = start + k / rate
        while at - time.perf_counter() > 0.05:
            time.sleep(0.01)
        due.put((k, at))
    for _ in threads:
        due.put(None)
    for t in threads:
        t.join()
    return latencies, acked, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="closed-loop phase")
    parser.add_argument("--clients", type=int, default=50, help="closed-loop clients")
    parser.add_argument("--rate", type=float, default=None,
                        help="open-loop arrivals per second (default: half the closed-loop maximum)")
    parser.add_argument("--open-seconds", type=float, default=None, help="open-loop phase (default: --seconds)")
    parser.add_argument("--open-workers", type=int, default=200, help="open-loop senders (at most this many in flight)")
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
            # Every client is built (an SSL context each: slow on a loaded machine) before the clock starts.
            ready = threading.Barrier(args.clients + 1)
            stop = 0.0

            def client(i: int) -> None:
                nonlocal errors
                url = servers[i % len(servers)][0]
                with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
                    ready.wait()
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
            stop = time.monotonic() + seconds
            ready.wait()
            for t in threads:
                t.join()
            return latencies, acked, errors

        # Warm-up, not counted: every server process opens its pool's connections (a new PostgreSQL
        # backend each) on first use, which would otherwise be charged to the reference alone.
        hammer("/healthz", lambda i, n: (None, None), 3.0)
        ref_seconds = min(10.0, args.seconds / 4)
        ref_lat, _, ref_err = hammer("/healthz", lambda i, n: (None, None), ref_seconds)

        def evaluation(i: int, n: int) -> tuple[dict[str, object], str]:
            run_id = f"c{i}-r{n}"
            return ({"strategy_id": f"s{i}", "stage": "backtest", "run_id": run_id,
                     "metrics": {"sharpe": 0.4 + (n % 10) / 10}}, f"s{i}/{run_id}")

        lat, acked, errors = hammer("/worlds/load/evaluate", evaluation, args.seconds)
        rps = len(lat) / args.seconds
        rate = args.rate if args.rate is not None else rps / 2
        open_seconds = args.open_seconds if args.open_seconds is not None else args.seconds
        open_lat, open_acked, open_errors = open_loop(servers, token, rate, open_seconds, args.open_workers)
        acked += open_acked

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
        ref_rps = len(ref_lat) / ref_seconds
        print(f"load          {os.getloadavg()[0]:.1f} (1-minute average at the end; 2 cores shared)")
        print(f"reference     GET /healthz {ref_rps:.0f} req/s ({ref_err} failed), closed loop, {args.clients} clients")
        print(f"closed loop   {args.clients} clients, servers 2, one PostgreSQL, {args.seconds:.0f} s: "
              f"{len(lat)} ok, {errors} failed: {rps:.0f} evaluations/s, {_quantiles(lat)}; "
              f"{rps / ref_rps:.2f}x the bare HTTP rate")
        print(f"open loop     {rate:.0f} arrivals/s for {open_seconds:.0f} s "
              f"({'given' if args.rate is not None else 'half the closed-loop maximum'}): {len(open_lat)} ok, "
              f"{open_errors} failed, {len(open_lat) / open_seconds:.0f} evaluations/s, {_quantiles(open_lat)} "
              "(from when each was due)")
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
