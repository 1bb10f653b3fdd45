"""`qmtl submit` and `Runner.submit(strategy, world=...)`: one submission path, on SQLite and PostgreSQL."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qmtl_core.sdk import Runner, run_backtest, strategy_id
from qmtl_core.submit import load_strategy_file, pick_strategy
from tests._service import make_service
from tests.cli_helpers import qmtl, qmtl_process

ROOT = Path(__file__).resolve().parent.parent
SMA = ROOT / "examples/strategies/sma_crossover.py"
MR = ROOT / "examples/strategies/mean_reversion.py"
GOOG = ROOT / "worlds/data/GOOG.csv"

pytestmark = pytest.mark.usefixtures("cli_mode")  # every CLI call: local store, then through the HTTP API


@pytest.fixture(autouse=True)
def _fresh_runner() -> Iterator[None]:
    Runner.reset()
    yield
    Runner.reset()


class RecordingService:
    """An execution service that only remembers what reached it."""

    def __init__(self) -> None:
        self.orders: list[dict[str, Any]] = []

    def post_order(self, order: dict[str, Any]) -> None:
        self.orders.append(order)


def _id_of(path: Path, **params: Any) -> str:
    cls = pick_strategy(load_strategy_file(path), path)
    return strategy_id(cls(**params))


@pytest.mark.parametrize(("path", "extra", "code", "status"), [
    (SMA, [], 0, "pending"),
    (MR, [], 10, "rejected"),
    (MR, ["--param", "allow_short=false"], 0, "pending"),
])
def test_submit_each_example_strategy(qmtl_env: dict[str, str], path: Path, extra: list[str], code: int,
                                      status: str) -> None:
    ran = qmtl("submit", str(path), "--world", "research-sandbox", *extra, "--json")
    assert ran.exit_code == code, ran.stderr
    doc = ran.json()
    params = {"allow_short": False} if extra else {}
    assert doc["strategy_id"] == _id_of(path, **params)
    assert (doc["status"], doc["accepted"], doc["stage"]) == (status, code == 0, "backtest")
    # unknown to the world before this submission: the decision falls back to backtest
    assert (doc["execution_domain"], doc["downgrade_reason"], doc["decision"]) == (
        "backtest", "decision_unavailable", None)
    assert doc["backtest"]["data"].endswith("GOOG.csv") and doc["backtest"]["bars"] == 2148
    # the world's costs (research-sandbox: 2 bps fee, 5 bps slippage) and n_trades from the fills
    cls = pick_strategy(load_strategy_file(path), path)
    direct = run_backtest(cls(**params), GOOG, fee_bps=2.0, slippage_bps=5.0)
    assert (doc["backtest"]["fee_bps"], doc["backtest"]["slippage_bps"]) == (2.0, 5.0)
    assert doc["backtest"]["n_trades"] == direct.n_trades == doc["run"]["metrics"]["n_trades"]
    assert doc["run"]["metric_sources"]["n_trades"] == "request.metrics"
    assert doc["run"]["metric_sources"]["sharpe"] == "request.returns"
    assert doc["run"]["metrics"]["n_observations"] == 2148 != direct.n_trades
    assert doc["run"]["stage"] == "backtest" and doc["run"]["run_id"] == "backtest-20130301"
    assert doc["run"]["status"] == ("fail" if code else "pass")
    assert doc["orders"]["published"] == 0
    if code == 0:
        assert doc["next_step"]["action"] == "promote_to_paper"
        assert doc["next_step"]["command"] == "qmtl world campaign-loop --world research-sandbox --once --execute"


def test_rejected_exits_10_and_explains_the_gate(qmtl_env: dict[str, str]) -> None:
    ran = qmtl("submit", str(SMA), "--world", "demo-momentum")
    assert ran.exit_code == 10, ran.stderr
    out = ran.stdout
    assert "status    rejected" in out
    assert "fail  drawdown  max_drawdown 0.3325" in out and "above max 0.3" in out
    assert "downgraded: decision_unavailable" in out
    assert "next      blocked (validation_failed)" in out
    # long-only passes every gate of the same world: pending, with the step that promotes it
    ok = qmtl("submit", str(SMA), "--world", "demo-momentum", "--param", "allow_short=false")
    assert ok.exit_code == 0, ok.stderr
    assert "status    pending" in ok.stdout and "campaign-loop --world demo-momentum" in ok.stdout


def test_resubmit_is_idempotent(qmtl_env: dict[str, str]) -> None:
    first = qmtl("submit", str(SMA), "--world", "research-sandbox", "--json").json()
    second = qmtl("submit", str(SMA), "--world", "research-sandbox", "--json").json()
    log_before = qmtl("audit", "log", "--json").json()
    third = qmtl("submit", str(SMA), "--world", "research-sandbox", "--json").json()
    assert first["strategy_id"] == second["strategy_id"] == third["strategy_id"]
    assert first["run"]["run_id"] == second["run"]["run_id"] == third["run"]["run_id"]
    assert [d["run"]["revision"] for d in (first, second, third)] == [1, 1, 1]
    assert (first["run"]["created"], second["run"]["created"], third["run"]["created"]) == (True, False, False)
    assert (first["registered"], second["registered"]) == (True, False)
    runs = qmtl("world", "runs", "research-sandbox", "--history", "--json").json()["runs"]
    assert len(runs) == 1
    assert qmtl("audit", "log", "--json").json() == log_before  # nothing changed, nothing recorded
    # known to the world now: the decision comes from its stage, no downgrade
    assert second["downgrade_reason"] is None
    assert second["decision"]["reason"] == "backtest_campaign"
    assert second["execution_domain"] == "backtest"
    # other data is other evidence: a new run (named after the data's end), not a new revision
    short = Path(qmtl_env["QMTL_HOME"]) / "short.csv"
    short.parent.mkdir(parents=True, exist_ok=True)
    short.write_text("".join(GOOG.read_text().splitlines(keepends=True)[:1500]))
    other = qmtl("submit", str(SMA), "--world", "research-sandbox", "--data", str(short), "--json").json()
    assert other["strategy_id"] == first["strategy_id"]
    assert other["run"]["run_id"] != first["run"]["run_id"] and other["run"]["revision"] == 1


def test_changed_code_is_a_new_strategy(qmtl_env: dict[str, str], tmp_path: Path) -> None:
    copy = tmp_path / "sma.py"
    shutil.copy(SMA, copy)
    a = qmtl("submit", str(copy), "--world", "research-sandbox", "--json").json()
    assert a["strategy_id"] == _id_of(SMA)  # the id covers code, not where the file lives
    copy.write_text(copy.read_text() + "\n# a comment changes the code hash\n")
    b = qmtl("submit", str(copy), "--world", "research-sandbox", "--json").json()
    assert b["strategy_id"] != a["strategy_id"] and b["code_hash"] != a["code_hash"]
    c = qmtl("submit", str(copy), "--world", "research-sandbox", "--param", "fast=5", "--json").json()
    assert c["strategy_id"] not in (a["strategy_id"], b["strategy_id"]) and c["params"]["fast"] == 5


def test_domain_shadow_is_kept_and_publishes_no_orders(qmtl_env: dict[str, str]) -> None:
    ran = qmtl("submit", str(SMA), "--world", "research-sandbox", "--domain", "shadow", "--json")
    assert ran.exit_code == 0, ran.stderr
    doc = ran.json()
    assert (doc["execution_domain"], doc["downgrade_reason"]) == ("shadow", None)
    assert doc["context"]["requested_domain"] == "shadow" and doc["context"]["allow_live"] is False
    assert doc["queues"] == ["research-sandbox.shadow.mirror.price"]  # live inputs' mirror, never live
    assert doc["orders"]["published"] == 0
    human = qmtl("submit", str(SMA), "--world", "research-sandbox", "--domain", "shadow")
    assert "domain    shadow  (requested shadow)" in human.stdout


def test_runner_submit_records_like_the_cli(store_url: str, worlds_dir: Path, tmp_path: Path,
                                            qmtl_env: dict[str, str]) -> None:
    """Runner.submit with a WorldService plugged in is the CLI's submission, and shadow stays orderless."""
    service = make_service(store_url, worlds_dir, tmp_path / "home")
    try:
        Runner.use_world_service(service)
        Runner.set_enable_trade_submission(True)
        broker = RecordingService()
        Runner.set_trade_execution_service(broker)
        strat = pick_strategy(load_strategy_file(SMA), SMA)()
        res = Runner.submit(strat, world="research-sandbox", execution_domain="shadow")
        sub = res.submission
        assert res.strategy_id == sub.strategy_id == strategy_id(strat)
        assert res.context.execution_domain == "shadow"
        assert all(n.compute_context == res.context for n in strat.nodes)
        assert (sub.status, sub.run.run_id, sub.run.revision, sub.run.created) == (
            "pending", "backtest-20130301", 1, True)
        # the strategy's row carries what was submitted
        info = service.strategy_info("research-sandbox", res.strategy_id)
        assert info is not None and info["name"] == "SmaCrossover" and info["code_hash"] == sub.code_hash
        assert info["submitter"] == service.actor and info["stage"] == "backtest"
        # stream live-like bars through the shadow-context DAG: it computes, the gate blocks every order
        price = strat.nodes[0]
        closes = np.concatenate([np.linspace(100, 80, 30), np.linspace(80, 120, 30)])
        outs = []
        for i, px in enumerate(closes):
            bar = {"open": px, "high": px, "low": px, "close": px, "volume": 1.0}
            outs.append(Runner.feed_queue_data(price, "research-sandbox.shadow.mirror.price", 86400,
                                               1_700_000_000 + 86400 * i, bar))
        assert broker.orders == [] and Runner.order_stats.published == 0
        assert Runner.order_stats.blocked["domain_shadow"] >= 1
    finally:
        service.close()
    # the CLI submitting the same file finds the very same run: no new revision
    cli = qmtl("submit", str(SMA), "--world", "research-sandbox", "--json").json()
    assert cli["strategy_id"] == res.strategy_id
    assert (cli["run"]["run_id"], cli["run"]["revision"], cli["run"]["created"]) == ("backtest-20130301", 1, False)


NO_CLASS = "from qmtl_core.sdk import Strategy\nfrom base_strategies import Imported\n\nX = Imported\n"
BASE = """\
from qmtl_core.sdk import Node, StreamInput, Strategy, TradeOrderPublisherNode


class Imported(Strategy):
    def setup(self) -> None:
        price = StreamInput(name="price", interval="1d")
        sig = Node(input=price, compute_fn=lambda v: 1.0, name="long")
        self.add_nodes(price, sig, TradeOrderPublisherNode(sig))
"""


def test_no_strategy_or_several_exit_2_listing_them(qmtl_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "base_strategies.py").write_text(BASE)
    none = tmp_path / "none.py"
    none.write_text(NO_CLASS)  # imports a strategy (from the file next to it) but defines none
    ran = qmtl("submit", str(none), "--world", "research-sandbox")
    assert ran.exit_code == 2
    assert ran.stderr.strip().splitlines() == [
        f"qmtl: error: {none} defines no Strategy subclass (define a class that subclasses "
        "qmtl_core.sdk.Strategy and implements setup(); imported classes do not count)"]

    two = tmp_path / "two.py"
    two.write_text(SMA.read_text() + "\n\nclass SlowCrossover(SmaCrossover):\n"
                   "    defaults = {**SmaCrossover.defaults, \"fast\": 20, \"slow\": 50}\n")
    ran = qmtl("submit", str(two), "--world", "research-sandbox", "--json")
    assert ran.exit_code == 2
    assert ran.json()["details"]["strategies"] == ["SmaCrossover", "SlowCrossover"]
    assert "defines 2 strategies: SmaCrossover, SlowCrossover" in ran.stderr
    assert "--strategy" in ran.stderr
    wrong = qmtl("submit", str(two), "--world", "research-sandbox", "--strategy", "Nope")
    assert wrong.exit_code == 2 and "it defines: SmaCrossover, SlowCrossover" in wrong.stderr
    picked = qmtl("submit", str(two), "--world", "research-sandbox", "--strategy", "SlowCrossover", "--json")
    assert picked.exit_code in (0, 10), picked.stderr  # picked and judged (it may fail a gate)
    assert picked.json()["strategy"] == "SlowCrossover" and picked.json()["params"]["slow"] == 50


@pytest.mark.parametrize(("text", "line", "what"), [
    ("from qmtl_core.sdk import Strategy\n\nclass Broken(Strategy:\n    pass\n", 3, "SyntaxError"),
    ("import json\nimport qmtl_no_such_package\n", 2, "ModuleNotFoundError: No module named 'qmtl_no_such_package'"),
    ("from qmtl_core.sdk import *\n\n\nclass Boom(Strategy):\n    def setup(self):\n"
     "        price = StreamInput()\n        sig = Node(input=price, compute_fn=lambda v: 1 / 0, name='s')\n"
     "        self.add_nodes(price, sig, TradeOrderPublisherNode(sig))\n", 7, "ZeroDivisionError"),
])
def test_broken_strategy_file_is_one_line_naming_file_and_line(qmtl_env: dict[str, str], tmp_path: Path,
                                                               text: str, line: int, what: str,
                                                               cli_mode: str) -> None:
    path = tmp_path / "broken.py"
    path.write_text(text)
    if cli_mode == "remote" and what == "ZeroDivisionError":
        # raised while backtesting, which needs the world's costs from the server: through the API
        ran = qmtl("submit", str(path), "--world", "research-sandbox")
    else:
        # remote: a server that does not exist, since the file is imported here before any request
        server = ["--server", "http://127.0.0.1:9"] if cli_mode == "remote" else []
        ran = qmtl_process(*server, "submit", str(path), "--world", "research-sandbox")
    assert ran.exit_code == 2
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in ran.stderr, ran.stderr
    assert lines[0].startswith(f"qmtl: error: {path}:{line}: ") and what in lines[0]
    assert ran.stdout == ""


def test_bad_inputs(qmtl_env: dict[str, str], tmp_path: Path) -> None:
    missing = qmtl("submit", str(tmp_path / "nope.py"), "--world", "research-sandbox")
    assert missing.exit_code == 2 and "no such strategy file" in missing.stderr
    assert qmtl("submit", str(SMA), "--world", "no-such-world").exit_code == 3
    bad_domain = qmtl("submit", str(SMA), "--world", "research-sandbox", "--domain", "liv")
    assert bad_domain.exit_code == 2 and "unknown execution domain" in bad_domain.stderr
    bad_param = qmtl("submit", str(SMA), "--world", "research-sandbox", "--param", "speed=3")
    assert bad_param.exit_code == 2 and "has no parameter 'speed'" in bad_param.stderr
    assert qmtl("submit", str(SMA), "--world", "research-sandbox", "--param", "fast").exit_code == 2
    bars = qmtl("submit", str(SMA), "--world", "research-sandbox", "--data", str(tmp_path / "x.csv"))
    assert bars.exit_code == 2 and "no such bars file" in bars.stderr


@pytest.mark.parametrize("cli_mode", ["local"], indirect=True)  # remote, real process: tests/test_run.py
def test_submit_json_before_the_subcommand_and_in_a_real_process(qmtl_env: dict[str, str]) -> None:
    ran = qmtl_process("--json", "submit", str(SMA), "--world", "research-sandbox")
    assert ran.exit_code == 0, ran.stderr
    doc = ran.json()  # exactly one JSON document on stdout
    assert doc["status"] == "pending" and doc["run"]["rules"]
    assert {r["id"] for r in doc["run"]["rules"]} >= {"sharpe", "drawdown"}


# --- the same submission in both modes ------------------------------------------------------------------
@pytest.mark.parametrize("cli_mode", ["local"], indirect=True)  # this test switches modes itself
def test_local_and_remote_submissions_print_the_same(qmtl_env: dict[str, str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """On one store: the first submission local, then the same through the HTTP API and back; once
    nothing changes any more, both modes print byte for byte the same (human and JSON)."""
    import qmtl_cli._state
    from tests import _remote

    monkeypatch.setattr(qmtl_cli._state, "TRANSPORT_FACTORY", _remote.factory)
    remote = ("--server", _remote.SERVER)
    args = ("submit", str(SMA), "--world", "demo-momentum", "--param", "allow_short=false")
    first = qmtl(*args, "--json")
    assert first.exit_code == 0 and first.json()["registered"] is True
    log_before = qmtl("audit", "log", "--json").stdout
    outs = {mode: [qmtl(*extra, *args, "--json"), qmtl(*extra, *args)] for mode, extra in
            (("remote", remote), ("local", ()))}
    for ran in (*outs["remote"], *outs["local"]):
        assert ran.exit_code == 0, ran.stderr
    docs = {mode: ran[0].json() for mode, ran in outs.items()}
    for d in docs.values():  # the decision is taken as of each call
        assert d["decision"]["as_of"] is not None
        d["decision"]["as_of"] = None
    assert docs["remote"] == docs["local"]  # JSON
    assert outs["remote"][1].stdout == outs["local"][1].stdout  # human
    doc = outs["remote"][0].json()
    assert (doc["registered"], doc["run"]["created"], doc["run"]["revision"]) == (False, False, 1)
    assert doc["run"]["run_id"] == first.json()["run"]["run_id"]
    assert qmtl("audit", "log", "--json").stdout == log_before  # nothing recorded by either mode
    # a rejected submission exits 10 through the API as well, naming the failed gate
    rejected = qmtl(*remote, "submit", str(SMA), "--world", "demo-momentum")
    assert rejected.exit_code == 10 and "fail  drawdown  max_drawdown 0.3325" in rejected.stdout


@pytest.mark.parametrize("cli_mode", ["local"], indirect=True)
def test_runner_submit_through_an_http_client(qmtl_env: dict[str, str]) -> None:
    """``Runner.use_world_service`` also takes a client: the backtest runs here, the run is recorded
    by the server (and is the very run the CLI then finds)."""
    from qmtl_core.service._client import HttpClient
    from tests._remote import SERVER, InProcessServer

    transport = InProcessServer()
    client = HttpClient(SERVER, None, transport=transport)
    try:
        Runner.use_world_service(client)
        strat = pick_strategy(load_strategy_file(SMA), SMA)()
        res = Runner.submit(strat, world="research-sandbox")
        sub = res.submission
        assert (res.context.execution_domain, res.context.downgrade_reason) == ("backtest", "decision_unavailable")
        assert (sub.status, sub.run.run_id, sub.run.revision, sub.run.created) == (
            "pending", "backtest-20130301", 1, True)
        assert sub.data.endswith("GOOG.csv") and sub.queues == ("research-sandbox.backtest.price",)
        assert sub.next_action is not None and sub.next_action.action == "promote_to_paper"
    finally:
        client.close()  # closes the transport (and the server's store) too
    cli = qmtl("submit", str(SMA), "--world", "research-sandbox", "--json").json()
    assert (cli["strategy_id"], cli["run"]["revision"], cli["run"]["created"]) == (res.strategy_id, 1, False)


@pytest.mark.parametrize("cli_mode", ["local"], indirect=True)  # raw HTTP, no CLI
def test_submission_routes_roles_and_not_found(qmtl_env: dict[str, str]) -> None:
    import httpx

    from qmtl_core.service._auth import create_token
    from tests._remote import SERVER, InProcessServer

    server = InProcessServer()
    svc = server.app.state.service
    with svc.store.write() as conn:
        tokens = {role: create_token(conn, actor=f"{role}-1", role=role, created_by="admin", now=svc.clock())[1]
                  for role in ("reader", "submitter", "approver")}
    http = httpx.Client(base_url=SERVER, transport=server)
    try:
        def call(method: str, path: str, role: str | None, body: Any = None) -> httpx.Response:
            headers = {"Authorization": f"Bearer {tokens[role]}"} if role else {"Authorization": "Bearer "}
            return http.request(method, path, json=body, headers=headers)

        body = {"strategy_id": "abc", "name": "X", "meta": {"submission": {"params": {}}}}
        assert call("POST", "/worlds/research-sandbox/strategies", None, body).status_code == 401
        for role in ("reader", "approver"):
            refused = call("POST", "/worlds/research-sandbox/strategies", role, body)
            assert refused.status_code == 403 and refused.json()["error"] == "forbidden"
        made = call("POST", "/worlds/research-sandbox/strategies", "submitter", body)
        assert made.status_code == 200 and made.json()["changed"] is True
        row = made.json()["strategy"]
        assert (row["stage"], row["name"], row["submitter"]) == ("backtest", "X", "submitter-1")
        again = call("POST", "/worlds/research-sandbox/strategies", "submitter", body).json()
        assert again["changed"] is False
        assert call("GET", "/worlds/research-sandbox/strategies/abc", "reader").json()["meta"] == body["meta"]
        missing = call("GET", "/worlds/research-sandbox/strategies/nope", "reader")
        assert missing.status_code == 404 and missing.json()["error"] == "strategy_not_found"
        no_world = call("GET", "/worlds/no-such-world/strategies/abc", "reader")
        assert no_world.status_code == 404 and no_world.json()["error"] == "world_not_found"
        # compare-and-set on meta: a stale expectation is a conflict (exit 4), nothing written
        stale = call("POST", "/worlds/research-sandbox/strategies", "submitter",
                     {"strategy_id": "abc", "meta": {"feed": {"bars": {}}}, "expect_meta": {"feed": {"x": 1}},
                      "kind": "strategy.fed"})
        assert stale.status_code == 409 and stale.json()["exit_code"] == 4
        # the ledger kind is one of the two a submission writes, nothing else
        odd = call("POST", "/worlds/research-sandbox/strategies", "submitter", {**body, "kind": "strategy.promoted"})
        assert odd.status_code == 400 and odd.json()["exit_code"] == 2
    finally:
        http.close()  # closes the transport (and the server's store) too
