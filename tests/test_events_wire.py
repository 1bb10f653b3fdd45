"""Control events over the wire: a real ``qmtl serve``, a subscriber in another process, and the
shadow flow end to end (submit → /events → run → no order at the broker → the live gate reads
the shadow window)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qmtl_core.controlbus import activation_updated, decision_updated, queue_update, tagquery_upsert
from qmtl_core.ledger import LedgerEntry
from qmtl_core.service._events import events_from_entry
from tests.cli_helpers import enter_stage_at
from tests.test_run import PAPER_SINCE, Broker, _bars
from tests.test_serve import real_server  # noqa: F401 - fixture: a real qmtl serve on a free port
from tests.test_shadow_run import ALWAYS_LONG, POLICY, WORLD

ROOT = Path(__file__).resolve().parent.parent
#: A remote subscriber: follows /events for one world and domain, prints each event as a JSON line,
#: and stops after the first queue_update (or fails after a minute).
SUBSCRIBER = """
import json, sys
from websockets.sync.client import connect
url, token, world, domain = sys.argv[1:5]
ws_url = url.replace("http://", "ws://") + f"/events?world={world}&domain={domain}&since=0"
with connect(ws_url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=10) as ws:
    print(json.dumps({"connected": True}), flush=True)
    while True:
        event = json.loads(ws.recv(timeout=60))
        print(json.dumps(event), flush=True)
        if event["type"] == "queue_update":
            break
"""


@pytest.fixture
def broker() -> Iterator[Broker]:
    b = Broker()
    yield b
    b.close()


def _client(real: tuple[str, str, dict[str, str]], home: Path) -> dict[str, str]:
    url, token, server_env = real
    env = {k: v for k, v in server_env.items() if k not in ("QMTL_DATABASE_URL",)}
    env.update({"QMTL_SERVER": url, "QMTL_TOKEN": token, "QMTL_HOME": str(home)})
    return env


def test_shadow_end_to_end_through_a_real_server(real_server: tuple[str, str, dict[str, str]],  # noqa: F811
                                                 worlds_dir: Path, tmp_path: Path, broker: Broker) -> None:
    (worlds_dir / f"{WORLD}.yaml").write_text(POLICY)  # the server reads this worlds dir
    env = _client(real_server, tmp_path / "client")
    strat = tmp_path / "always_long.py"
    strat.write_text(ALWAYS_LONG)
    hist, _ = _bars(tmp_path, "hist.csv", "2004-01-01", "2012-06-01")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "qmtl_cli", *args], env=env, capture_output=True,
                              text=True, cwd=ROOT, timeout=180)

    # a subscriber in its own process, following the world's shadow domain until a queue_update
    sub = subprocess.Popen([sys.executable, "-c", SUBSCRIBER, real_server[0], real_server[1], WORLD, "shadow"],
                           env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(sub.stdout.readline()) == {"connected": True}  # subscribed before the submission
        submitted = cli("submit", str(strat), "--world", WORLD, "--data", str(hist), "--domain", "shadow", "--json")
        assert submitted.returncode == 0, submitted.stderr
        sid = json.loads(submitted.stdout)["strategy_id"]
        out, err = sub.communicate(timeout=120)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.communicate()
    assert sub.returncode == 0, err
    seen = [json.loads(line) for line in out.splitlines()]
    # only shadow-domain or domain-less (world-wide) events pass the filter: never the backtest run
    assert seen and all(e["execution_domain"] in (None, "shadow") for e in seen)
    events = [e for e in seen if e["type"] in ("tagquery.upsert", "queue_update")]
    assert [e["type"] for e in events] == ["tagquery.upsert", "queue_update"]
    assert events[0]["seq"] < events[1]["seq"]  # in order
    expected = {"tags": ["price"], "interval": 86400,
                "queues": [{"queue": f"{WORLD}.shadow.mirror.price", "global": False}],
                "match_mode": "any", "world_id": WORLD, "execution_domain": "shadow", "version": 1}
    assert events[1]["data"] == expected and events[1]["execution_domain"] == "shadow"
    assert events[1]["etag"] == queue_update(**{k: v for k, v in expected.items() if k != "version"}).etag
    # resubmitting the same strategy announces nothing new (no new ledger entry)
    before = len(json.loads(cli("audit", "log", "--world", WORLD, "--json").stdout)["entries"])
    assert cli("submit", str(strat), "--world", WORLD, "--data", str(hist), "--domain", "shadow").returncode == 0
    assert len(json.loads(cli("audit", "log", "--world", WORLD, "--json").stdout)["entries"]) == before
    # resumable: from just before the queue_update, only it comes again
    again = cli("events", "tail", "--world", WORLD, "--since", str(events[1]["seq"] - 1), "--limit", "1", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["data"] == expected

    # the campaign takes it to paper; shadow bars flow with every order blocked at the gate
    assert '"promote_to_paper"' in cli("world", "campaign-loop", "--world", WORLD, "--once", "--execute",
                                       "--json").stdout
    enter_stage_at(WORLD, sid, PAPER_SINCE, store_url=real_server[2]["QMTL_DATABASE_URL"])
    gate = json.loads(cli("promote", sid, "--world", WORLD, "--dry-run", "--json").stdout)["gate"]
    assert "shadow_window_incomplete" in [r["code"] for r in gate["reasons"]]
    a, n_a = _bars(tmp_path, "a.csv", "2012-06-04", "2012-10-31")
    ran = cli("run", str(strat), "--world", WORLD, "--data", str(a), "--domain", "shadow",
              "--broker-webhook", broker.url, "--json")
    assert ran.returncode == 0, ran.stderr
    doc = json.loads(ran.stdout)
    assert doc["execution_domain"] == "shadow" and doc["orders"]["blocked"] == {"domain_shadow": 1}
    assert broker.orders == []
    assert doc["run"]["window"]["n_observations"] == n_a and doc["run"]["evidence_class"] == "qmtl replay"
    (view,) = json.loads(cli("world", "campaign", WORLD, "--strategy", sid, "--json").stdout)["strategies"]
    shadow = next(p for p in view["progress"] if p["stage"] == "shadow")
    assert shadow["n_observations"] == n_a and shadow["satisfied"]
    gate = json.loads(cli("promote", sid, "--world", WORLD, "--dry-run", "--json").stdout)["gate"]
    assert not {"shadow_window_incomplete", "evidence_untrusted"} & {r["code"] for r in gate["reasons"]}
    assert gate["evidence"]["shadow_run"]["window"]["n_observations"] == n_a
    assert gate["evidence"]["shadow_run"]["evidence_class"] == "qmtl replay"


def _entry(kind: str, payload: dict[str, Any], seq: int = 7) -> LedgerEntry:
    return LedgerEntry(seq=seq, ts="2026-03-02T12:00:00.000000Z", actor="otto", kind=kind, world="w",
                       subject="s", reason="r", payload=payload, prev_hash="0" * 64, hash="1" * 64)


def test_activation_and_decision_events_carry_the_bus_payload() -> None:
    from datetime import datetime, timezone

    from qmtl_core.domains import DecisionEnvelope

    envelope = DecisionEnvelope("w", "a", "live", "live_activation", datetime(2026, 3, 2, 12, tzinfo=timezone.utc),
                                600, "e" * 64, 3, allow_live=True)
    row = {"strategy_id": "a", "stage": "live", "weight": 0.25, "run_id": "paper-1", "etag": "x" * 64,
           "activated_at": "2026-03-02T12:00:00Z"}
    events = events_from_entry(_entry("promotion.applied", {"changed": {"a": "live"}, "activations": [row]}),
                               lambda world, sid, at: envelope if (world, sid) == ("w", "a") else None)
    assert [e["type"] for e in events] == ["activation_updated", "decision_updated"]
    assert events[0]["data"] == dict(activation_updated(world_id="w", strategy_id="a", stage="live", active=True,
                                                        weight=0.25, run_id="paper-1", etag="x" * 64).payload)
    assert events[0]["execution_domain"] == "live" and events[0]["seq"] == 7
    assert events[1]["data"] == dict(decision_updated(envelope).payload)
    # a demotion to backtest drops the activation row: inactive, weight 0
    gone = events_from_entry(_entry("strategy.demoted", {"changed": {"a": "backtest"}, "activations": []}),
                             lambda *_: None)
    assert [(e["type"], e["data"]["active"], e["data"]["weight"]) for e in gone] == [
        ("activation_updated", False, 0.0)]
    # halt/resume: a decision per activation
    halted = events_from_entry(_entry("world.halted", {"activations": [row]}), lambda *_: envelope)
    assert [e["type"] for e in halted] == ["decision_updated"]
    # announcements rebuild the exact bus event
    up = tagquery_upsert(tags=["t"], interval=60, world_id="w", execution_domain="shadow")
    (ev,) = events_from_entry(_entry("tagquery.upserted", {"etag": up.etag, "data": dict(up.payload)}),
                              lambda *_: None)
    assert (ev["type"], ev["data"], ev["etag"]) == ("tagquery.upsert", dict(up.payload), up.etag)
