"""Prometheus metrics (issue 18, item 7): the store families, serve's /metrics, the loop's textfile,
and the shipped alert rules and dashboard checked by real tools (prometheus_client's parser, promtool)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from qmtl_core.telemetry import HttpMetrics, LoopMetrics, exposition, new_registry
from tests._service import Clock, make_service
from tests.cli_helpers import qmtl
from tests.test_governance import Setup, policy_text

ROOT = Path(__file__).resolve().parent.parent
PROM = ROOT / "docs" / "prometheus"
STORE_FAMILIES = {"qmtl_risk_snapshot_age_seconds", "qmtl_pending_approvals",
                  "qmtl_pending_approval_oldest_age_seconds", "qmtl_strategies", "qmtl_live_strategies",
                  "qmtl_order_gate_blocks", "qmtl_campaign_actions", "qmtl_promotion_blocks",
                  "qmtl_campaign_last_progress_timestamp_seconds"}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition, keyed (sample name, sorted labels); the parser rejects bad text."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def families(text: str) -> set[str]:
    return {f.name for f in text_string_to_metric_families(text)}


@pytest.fixture
def gov(qmtl_env: dict[str, str], worlds_dir: Path, tmp_path: Path) -> Any:
    (worlds_dir / "gov.yaml").write_text(policy_text())
    clock = Clock()
    svc = make_service(qmtl_env["QMTL_DATABASE_URL"], worlds_dir, tmp_path / "h", clock)
    Setup(svc).ready("a", "b")
    yield svc, clock
    svc.close()


def test_store_families_read_the_store(gov: Any) -> None:
    svc, clock = gov
    start = clock()
    opened = svc.as_actor("carol").promote("gov", "a", reason="paper is clean")
    assert opened.status == "pending"
    svc.set_halted("gov", halted=True, reason="drill")
    blocked = svc.as_actor("carol").promote("gov", "b", reason="try")
    assert blocked.status == "blocked"
    svc.register_strategy("gov", strategy_id="b", meta={"feed": {"orders_blocked": {"not_live": 3, "halted": 1}}})
    clock.advance(hours=2)
    found = samples(exposition(new_registry(svc.store, svc.clock)).decode())
    assert value(found, "qmtl_pending_approvals", world="gov") == 1
    assert value(found, "qmtl_pending_approval_oldest_age_seconds", world="gov") == 7200
    assert value(found, "qmtl_risk_snapshot_age_seconds", world="gov") == 7200  # as_of was `start`
    assert value(found, "qmtl_strategies", world="gov", stage="paper") == 2
    assert value(found, "qmtl_live_strategies", world="gov") == 0
    assert value(found, "qmtl_campaign_actions_total", world="gov", action="promote_to_paper",
                 outcome="executed") == 2
    # approval_required is not a block (it is what a request waits for): the ledger's reasons leave it out
    codes = [r.code for r in blocked.gate.reasons if r.code not in ("approval_required", "approvals_expired")]
    assert "world_halted" in codes
    for code in codes:
        assert value(found, "qmtl_promotion_blocks_total", world="gov", reason=code) == 1
    assert value(found, "qmtl_order_gate_blocks_total", world="gov", reason="not_live") == 3
    assert value(found, "qmtl_campaign_last_progress_timestamp_seconds", world="gov") == start.timestamp()
    assert families(exposition(new_registry(svc.store, svc.clock)).decode()) == STORE_FAMILIES


def test_loop_metrics_count_runs_actions_and_blocks() -> None:
    from datetime import datetime, timezone

    registry = CollectorRegistry()
    loop = LoopMetrics(registry)
    at = datetime(2026, 3, 2, tzinfo=timezone.utc)
    blocked = {"action": "blocked", "reason": "risk_snapshot_lagging", "outcome": "reported"}
    loop.observe({"world": "w", "status": "planned", "exit_code": 12, "actions": [blocked, blocked]}, at)
    loop.observe({"world": "w", "status": "busy", "exit_code": 0, "actions": []}, at)
    found = samples(exposition(registry).decode())
    assert value(found, "qmtl_loop_runs_total", world="w", exit_class="12") == 1
    assert value(found, "qmtl_loop_runs_total", world="w", exit_class="75") == 1
    assert value(found, "qmtl_loop_last_exit_code", world="w") == 75
    assert value(found, "qmtl_loop_last_run_timestamp_seconds", world="w") == at.timestamp()
    assert value(found, "qmtl_campaign_blocked_strategies", world="w", reason="risk_snapshot_lagging") == 2
    # the block clears when a later run no longer reports it
    loop.observe({"world": "w", "status": "planned", "exit_code": 0, "actions": []}, at)
    assert ("qmtl_campaign_blocked_strategies", (("reason", "risk_snapshot_lagging"), ("world", "w"))) \
        not in samples(exposition(registry).decode())


def test_serve_metrics_needs_a_token_and_labels_latency_by_route(gov: Any) -> None:
    import httpx

    from tests import _remote

    with httpx.Client(transport=_remote.InProcessServer(), base_url=_remote.SERVER) as http:  # closes the server
        assert http.get("/metrics", headers={"Authorization": "Bearer qmtl_wrong"}).status_code == 401
        assert http.get("/worlds/gov/runs").status_code == 200
        assert http.post("/worlds/gov/campaign/run", json={"holder": "h"}).status_code == 200
        r = http.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        found = samples(r.text)
    assert value(found, "qmtl_http_request_duration_seconds_count", method="GET", route="/worlds/{world}/runs",
                 status="200") == 1
    assert not any("/worlds/gov/" in str(labels) for _, labels in found)  # route templates, never raw paths
    assert sum(v for (n, labels), v in found.items() if n == "qmtl_loop_runs_total") == 1
    assert value(found, "qmtl_strategies", world="gov", stage="paper") == 2


@pytest.mark.usefixtures("cli_mode")
def test_campaign_loop_writes_the_textfile_atomically(gov: Any, tmp_path: Path) -> None:
    from tests import cli_helpers

    out = tmp_path / "prom"
    out.mkdir()
    path = out / "qmtl.prom"
    for _ in range(2):
        ran = qmtl("world", "campaign-loop", "--world", "gov", "--once", "--metrics-file", str(path))
        assert ran.exit_code in (0, 10, 11, 12), ran.stderr
    text = path.read_text()
    found = samples(text)
    assert sum(v for (n, _), v in found.items() if n == "qmtl_loop_runs_total") == 2  # carried over the rewrite
    assert [p.name for p in out.iterdir()] == ["qmtl.prom"]  # no temporary file left behind
    if cli_helpers.MODE == "local":
        assert STORE_FAMILIES <= families(text)  # the same store families as serve's /metrics
        assert value(found, "qmtl_strategies", world="gov", stage="paper") == 2
    before = qmtl("audit", "log", "--json").json()["entries"]
    bad = qmtl("world", "campaign-loop", "--world", "gov", "--once", "--execute",
               "--metrics-file", str(tmp_path / "missing" / "q.prom"))
    assert bad.exit_code == 2 and "--metrics-file" in bad.stderr and bad.stderr.count("\n") == 1
    assert qmtl("audit", "log", "--json").json()["entries"] == before  # refused before acting


def _all_family_names(svc: Any) -> set[str]:
    registry = new_registry(svc.store, svc.clock)
    LoopMetrics(registry)
    HttpMetrics(registry)
    return families(exposition(registry).decode())


def _referenced(expr: str) -> set[str]:
    return {re.sub(r"_(total|bucket|count|sum)$", "", m) for m in re.findall(r"\bqmtl_[a-z_]+", expr)}


def test_alerts_and_dashboard_use_only_exported_families(gov: Any) -> None:
    import yaml

    svc, _ = gov
    exported = _all_family_names(svc)
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"][0]["rules"]
    names = {r["alert"] for r in rules}
    assert {"QmtlRiskSnapshotStale", "QmtlLoopNotRun", "QmtlApprovalWaiting", "QmtlCampaignStalled"} <= names
    for rule in rules:
        assert _referenced(rule["expr"]) and _referenced(rule["expr"]) <= exported, rule["alert"]
    dashboard = json.loads((PROM / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = set().union(*(_referenced(e) for e in exprs))
    assert used <= exported and exported <= used  # every family on the dashboard, none made up


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool is not installed (make promtool installs Debian's prometheus package)")
def test_promtool_checks_and_unit_tests_the_alert_rules() -> None:
    check = subprocess.run(["promtool", "check", "rules", "alerts.yml"], cwd=PROM, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 6 rules found" in check.stdout
    unit = subprocess.run(["promtool", "test", "rules", "alerts.test.yml"], cwd=PROM, capture_output=True,
                          text=True)
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_loop_not_run_alert_would_fire_on_a_real_textfile(gov: Any, tmp_path: Path) -> None:
    """The textfile the loop writes is what the rule reads: promtool evaluates the rule on its values."""
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (make promtool installs Debian's prometheus package)")
    path = tmp_path / "q.prom"
    ran = qmtl("world", "campaign-loop", "--world", "gov", "--once", "--metrics-file", str(path))
    assert ran.exit_code in (0, 10, 11, 12)
    stamp = value(samples(path.read_text()), "qmtl_loop_last_run_timestamp_seconds", world="gov")
    assert abs(stamp - __import__("time").time()) < 600
    metrics = subprocess.run(["promtool", "check", "metrics"], input=path.read_text(), capture_output=True, text=True)
    assert metrics.returncode == 0, metrics.stdout + metrics.stderr



def test_store_families_are_read_at_most_once_per_max_age(gov: Any) -> None:
    """Scrape cost (issue 18): scrapes within ``max_age`` share one read of the store."""
    from qmtl_core.telemetry import StoreCollector

    reads: list[float] = []

    class Counting(StoreCollector):
        def _read(self) -> Any:
            reads.append(ticks[0])
            return super()._read()

    svc, clock = gov
    ticks = [100.0]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Counting(svc.store, svc.clock, max_age=5.0, monotonic=lambda: ticks[0]))

    def pending() -> float:
        return samples(exposition(registry).decode()).get(("qmtl_pending_approvals", (("world", "gov"),)), 0.0)

    assert pending() == 0 and len(reads) == 1
    assert svc.as_actor("carol").promote("gov", "a", reason="paper is clean").status == "pending"
    ticks[0] += 4.9
    assert pending() == 0 and len(reads) == 1  # the last collection, not a second read
    ticks[0] += 0.1
    assert pending() == 1 and len(reads) == 2

    def blocked() -> float:
        return samples(exposition(registry).decode()).get(
            ("qmtl_order_gate_blocks_total", (("reason", "domain_dryrun"), ("world", "gov"))), 0.0)

    # A long-lived collector re-reads only strategies updated since, and sees each new feed's counts.
    clock.advance(minutes=1)
    svc.register_strategy("gov", strategy_id="b", meta={"feed": {"orders_blocked": {"domain_dryrun": 2}}})
    ticks[0] += 5
    assert blocked() == 2
    clock.advance(minutes=1)
    svc.register_strategy("gov", strategy_id="b", meta={"feed": {"orders_blocked": {"domain_dryrun": 5}}})
    ticks[0] += 5
    assert blocked() == 5 and len(reads) == 4
