"""Order-gate blocks end to end (issue 18): orders a strategy builds while it is fed in shadow or in
paper are stopped by the one order gate, never reach the broker, and show up where an operator looks
(``qmtl_order_gate_blocks_total`` on a real ``qmtl serve``'s ``/metrics``, and the ledger entry of
each feed), all through the real commands, not by calling a counter."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.test_run import Broker, _bars
from tests.test_serve import real_server  # noqa: F401 - fixture: a real qmtl serve on a free port
from tests.test_shadow_run import ALWAYS_LONG, POLICY, WORLD

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def broker() -> Iterator[Broker]:
    b = Broker()
    yield b
    b.close()


def _gate_blocks(url: str, token: str) -> dict[str, float]:
    """``qmtl_order_gate_blocks_total`` of the test world by reason, parsed by prometheus_client."""
    r = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 200, r.text
    return {s.labels["reason"]: s.value for f in text_string_to_metric_families(r.text) for s in f.samples
            if s.name == "qmtl_order_gate_blocks_total" and s.labels["world"] == WORLD}


def test_blocked_orders_reach_metrics_and_the_ledger_not_the_broker(  # noqa: F811
        real_server: tuple[str, str, dict[str, str]], worlds_dir: Path, tmp_path: Path, broker: Broker) -> None:
    url, token, server_env = real_server
    (worlds_dir / f"{WORLD}.yaml").write_text(POLICY)  # the server reads this worlds dir
    env = {k: v for k, v in server_env.items() if k != "QMTL_DATABASE_URL"}
    env.update({"QMTL_SERVER": url, "QMTL_TOKEN": token, "QMTL_HOME": str(tmp_path / "client")})
    strat = tmp_path / "always_long.py"
    strat.write_text(ALWAYS_LONG)
    hist, _ = _bars(tmp_path, "hist.csv", "2004-01-01", "2012-06-01")
    a, _ = _bars(tmp_path, "a.csv", "2012-06-04", "2012-07-31")
    b, _ = _bars(tmp_path, "b.csv", "2012-08-01", "2012-10-31")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "qmtl_cli", *args], env=env, capture_output=True,
                              text=True, cwd=ROOT, timeout=300)

    submitted = cli("submit", str(strat), "--world", WORLD, "--data", str(hist), "--domain", "shadow", "--json")
    assert submitted.returncode == 0, submitted.stderr
    assert _gate_blocks(url, token) == {}  # a backtest builds no order for the broker
    loop = cli("world", "campaign-loop", "--world", WORLD, "--once", "--execute", "--json")
    assert '"promote_to_paper"' in loop.stdout, loop.stdout + loop.stderr

    shadow = cli("run", str(strat), "--world", WORLD, "--data", str(a), "--domain", "shadow",
                 "--broker-webhook", broker.url, "--json")
    assert shadow.returncode == 0, shadow.stderr
    assert json.loads(shadow.stdout)["orders"]["blocked"] == {"domain_shadow": 1}
    assert _gate_blocks(url, token) == {"domain_shadow": 1}

    paper = cli("run", str(strat), "--world", WORLD, "--data", str(a), "--broker-webhook", broker.url, "--json")
    assert paper.returncode == 0, paper.stderr
    assert json.loads(paper.stdout)["orders"]["blocked"] == {"domain_dryrun": 1}
    more = cli("run", str(strat), "--world", WORLD, "--data", str(b), "--domain", "shadow", "--json")
    assert more.returncode == 0, more.stderr
    # cumulative per reason, across the two fed series (paper's and shadow's) and across processes
    assert _gate_blocks(url, token) == {"domain_shadow": 2, "domain_dryrun": 1}
    assert broker.orders == []

    log = cli("audit", "log", "--kind", "strategy.fed", "--json")
    assert log.returncode == 0, log.stderr
    reasons = [e["reason"] for e in json.loads(log.stdout)["entries"]]
    assert sum("orders blocked by the order gate: domain_shadow 1" in r for r in reasons) == 2, reasons
    assert sum("orders blocked by the order gate: domain_dryrun 1" in r for r in reasons) == 1, reasons
