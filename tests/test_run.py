"""`qmtl run`: new bars fed in the domain the world decides; paper campaigns advance on real data."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from qmtl_core.domains import DecisionEnvelope
from qmtl_core.sdk import Runner
from qmtl_core.service import WorldService
from tests.cli_helpers import enter_stage_at, qmtl, qmtl_process
from tests.test_serve import real_server  # noqa: F401 - fixture: a real qmtl serve on a free port

ROOT = Path(__file__).resolve().parent.parent
SMA = ROOT / "examples/strategies/sma_crossover.py"
GOOG = ROOT / "worlds/data/GOOG.csv"

pytestmark = pytest.mark.usefixtures("cli_mode")  # every CLI call: local store, then through the HTTP API
WORLD = "paper-test"
#: When the tests' strategies entered paper: after the backtest's bars (hist ends 2012-06-01),
#: before the paper bars they are fed (from 2012-06-04).
PAPER_SINCE = "2012-06-02"
POLICY = """\
world: paper-test
policy_version: 1
allow_live: true
periods_per_year: 252
costs: {fee_bps: 1.0, slippage_bps: 2.0}
rules:
  - {id: sharpe, metric: sharpe, min: 0.3, stages: [backtest]}
  - {id: drawdown, metric: max_drawdown, max: 0.5}
  - {id: trades, metric: n_trades, min: 1, severity: soft}
campaign:
  backtest: {window: 365d, min_observations: 200}
  paper: {window: 30d, min_observations: 20}
governance:
  live_promotion: {mode: disabled}
risk: {snapshot_max_age: 1h, decision_ttl: 10m}
"""
ALWAYS_LONG = """\
from qmtl_core.sdk import Node, StreamInput, Strategy, TradeOrderPublisherNode


class AlwaysLong(Strategy):
    def setup(self) -> None:
        price = StreamInput(name="price", interval="1d")
        target = Node(input=price, compute_fn=lambda view: 1.0, name="long")
        self.add_nodes(price, target, TradeOrderPublisherNode(target, symbol="GOOG"))
"""


@pytest.fixture(autouse=True)
def _fresh_runner() -> Iterator[None]:
    Runner.reset()
    yield
    Runner.reset()


@pytest.fixture
def env(qmtl_env: dict[str, str], worlds_dir: Path) -> dict[str, str]:
    (worlds_dir / f"{WORLD}.yaml").write_text(POLICY)
    return qmtl_env


def _bars(tmp: Path, name: str, first: str, last: str) -> tuple[Path, int]:
    """GOOG bars with first <= date <= last, as a CSV; returns the path and the number of bars.
    They are real, past prices: a test that feeds them to a strategy's paper or shadow stay dates
    the stay's start before them (``cli_helpers.enter_stage_at``), since only observations made
    during the stay count and none may be dated in the future (issue 19)."""
    header, *rows = GOOG.read_text().splitlines()
    keep = [r for r in rows if first <= r[:10] <= last]
    path = tmp / name
    path.write_text("\n".join([header, *keep]) + "\n")
    return path, len(keep)


@pytest.fixture
def data(tmp_path: Path) -> dict[str, tuple[Path, int]]:
    return {"hist": _bars(tmp_path, "hist.csv", "2004-01-01", "2012-06-01"),
            "a": _bars(tmp_path, "a.csv", "2012-06-04", "2012-10-04"),
            "b": _bars(tmp_path, "b.csv", "2012-09-27", "2013-03-01"),
            "overlap_b": _bars(tmp_path, "ob.csv", "2012-09-27", "2012-10-04")}


class Broker:
    """A local HTTP endpoint recording every order POSTed to it."""

    def __init__(self) -> None:
        self.orders: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.orders.append({"body": json.loads(body), "key": self.headers.get("Idempotency-Key")})
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/orders"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def broker() -> Iterator[Broker]:
    b = Broker()
    yield b
    b.close()


def _submit_and_promote(args: list[str], hist: Path) -> str:
    sub = qmtl("submit", *args, "--world", WORLD, "--data", str(hist), "--json")
    assert sub.exit_code == 0, sub.stderr
    assert sub.json()["status"] == "pending"
    loop = qmtl("world", "campaign-loop", "--world", WORLD, "--once", "--execute", "--json")
    assert '"promote_to_paper"' in loop.stdout, loop.stdout + loop.stderr
    sid = str(sub.json()["strategy_id"])
    enter_stage_at(WORLD, sid, PAPER_SINCE)
    return sid


def _paper_progress(sid: str) -> dict[str, Any]:
    doc = qmtl("world", "campaign", WORLD, "--strategy", sid, "--json").json()
    (view,) = doc["strategies"]
    assert view["stage"] == "paper" and view["phase"] == "paper_campaign"
    return next(p for p in view["progress"] if p["stage"] == "paper")


def test_run_advances_the_paper_campaign_on_new_bars(env: dict[str, str], data: dict[str, tuple[Path, int]],
                                                     broker: Broker) -> None:
    hist, _ = data["hist"]
    # still in backtest: nothing to feed, and the message says why
    early = qmtl("submit", str(SMA), "--world", WORLD, "--data", str(hist))
    assert early.exit_code == 0
    refused = qmtl("run", str(SMA), "--world", WORLD, "--data", str(data["a"][0]))
    assert refused.exit_code == 10
    assert "has SmaCrossover" in refused.stderr and "in backtest" in refused.stderr
    assert "campaign-loop --world paper-test --once --execute" in refused.stderr

    sid = _submit_and_promote([str(SMA)], hist)
    assert _paper_progress(sid)["n_observations"] == 0
    resubmit = qmtl("submit", str(SMA), "--world", WORLD, "--data", str(hist), "--json").json()
    assert (resubmit["status"], resubmit["stage"], resubmit["execution_domain"]) == ("active", "paper", "dryrun")

    a, n_a = data["a"]
    first = qmtl("run", str(SMA), "--world", WORLD, "--data", str(a), "--broker-webhook", broker.url, "--json")
    assert first.exit_code == 0, first.stderr
    doc = first.json()
    assert (doc["stage"], doc["execution_domain"], doc["decision"]["effective_mode"]) == ("paper", "dryrun", "paper")
    assert doc["bars"] == {"new": n_a, "duplicates": 0, "first_new": "2012-06-04T00:00:00.000000Z", "gaps": [],
                           "last_new": "2012-10-04T00:00:00.000000Z", "total_fed": n_a}
    run = doc["run"]
    assert (run["stage"], run["run_id"], run["revision"]) == ("paper", "paper-from-20120604", 1)
    assert run["window"]["n_observations"] == n_a and run["metrics"]["n_trades"] == doc["n_trades"]
    assert run["metric_sources"]["n_trades"] == "request.metrics"
    assert "--broker-webhook not used" in doc["note"] and broker.orders == []
    assert doc["orders"]["published"] == 0
    progress = _paper_progress(sid)
    assert progress["n_observations"] == n_a and progress["span_seconds"] > 30 * 86400

    # overlapping bars: the ones already fed are dropped, the rest appended to the same run
    b, n_b = data["b"]
    n_overlap = data["overlap_b"][1]
    second = qmtl("run", str(SMA), "--world", WORLD, "--data", str(b), "--json").json()
    assert second["bars"]["new"] == n_b - n_overlap and second["bars"]["duplicates"] == n_overlap
    assert second["bars"]["total_fed"] == n_a + n_b - n_overlap
    run2 = second["run"]
    assert (run2["run_id"], run2["revision"]) == ("paper-from-20120604", 2)
    assert run2["window"]["start"] == run["window"]["start"]
    assert run2["window"]["n_observations"] == n_a + n_b - n_overlap
    assert run2["window"]["end"].startswith("2013-03-01")
    assert run2["metrics"]["n_trades"] >= run["metrics"]["n_trades"]
    assert _paper_progress(sid)["n_observations"] == n_a + n_b - n_overlap

    # the same bars again: nothing new, no new revision
    again = qmtl("run", str(SMA), "--world", WORLD, "--data", str(b), "--json").json()
    assert again["bars"]["new"] == 0 and again["run"]["revision"] == 2 and "nothing new" in again["note"]
    history = qmtl("world", "runs", WORLD, "--stage", "paper", "--history", "--json").json()["runs"]
    assert [r["revision"] for r in history] == [2, 1]

    human = qmtl("run", str(SMA), "--world", WORLD, "--data", str(b))
    assert human.exit_code == 0 and "nothing new" in human.stdout and "domain    dryrun" in human.stdout
    campaign = qmtl("world", "campaign", WORLD, "--strategy", sid)
    assert "paper_campaign" in campaign.stdout and f"{n_a + n_b - n_overlap}/20 obs" in campaign.stdout


def test_run_refuses_old_or_changed_bars(env: dict[str, str], data: dict[str, tuple[Path, int]],
                                         tmp_path: Path) -> None:
    hist, _ = data["hist"]
    _submit_and_promote([str(SMA)], hist)
    # paper bars must come after everything the strategy was backtested on
    inside = qmtl("run", str(SMA), "--world", WORLD, "--data", str(hist))
    assert inside.exit_code == 2
    assert "is not after the data the strategy was backtested on (up to 2012-06-01" in inside.stderr
    a, _ = data["a"]
    assert qmtl("run", str(SMA), "--world", WORLD, "--data", str(a)).exit_code == 0
    old = qmtl_process("run", str(SMA), "--world", WORLD, "--data", str(hist))
    assert old.exit_code == 2
    assert old.stderr.strip().splitlines() == [
        f"qmtl: error: {hist}: bar 2004-08-19T00:00:00Z is older than the last bar already fed "
        "(2012-10-04T00:00:00Z) and was never fed; qmtl run only appends new bars "
        "(pass only bars after 2012-10-04T00:00:00Z)"]
    # a bar that was fed cannot come back different
    header, *rows = a.read_text().splitlines()
    changed = tmp_path / "changed.csv"
    last = rows[-1].split(",")
    last[4] = str(float(last[4]) + 1.0)
    changed.write_text("\n".join([header, ",".join(last)]) + "\n")
    diff = qmtl("run", str(SMA), "--world", WORLD, "--data", str(changed), "--json")
    assert diff.exit_code == 2 and diff.json()["error"] == "bar_changed"
    assert len(qmtl("world", "runs", WORLD, "--stage", "paper", "--history", "--json").json()["runs"]) == 1


def test_bars_dated_in_the_future_are_refused_before_anything_runs(env: dict[str, str],
                                                                   data: dict[str, tuple[Path, int]],
                                                                   tmp_path: Path) -> None:
    """A bar from the future was not observed: fed, it would count as evidence and wedge every real
    bar after it (runs only append). Refused, located, with nothing recorded (issue 19)."""
    hist, _ = data["hist"]
    header, *rows = data["a"][0].read_text().splitlines()
    tomorrow = (datetime.now(timezone.utc) + timedelta(days=1)).date().isoformat()
    ahead = tmp_path / "ahead.csv"
    ahead.write_text("\n".join([header, *rows[:3], tomorrow + rows[3][10:]]) + "\n")
    early = qmtl("submit", str(SMA), "--world", WORLD, "--data", str(ahead), "--json")
    assert early.exit_code == 2 and early.json()["error"] == "observation_in_future", early.stdout
    assert f"{ahead}: row 4 (bar): {tomorrow}T00:00:00Z is " in early.stderr and "in the future" in early.stderr
    assert qmtl("world", "runs", WORLD, "--json").json()["runs"] == []
    _submit_and_promote([str(SMA)], hist)
    fed = qmtl("run", str(SMA), "--world", WORLD, "--data", str(ahead), "--json")
    assert fed.exit_code == 2 and fed.json()["error"] == "observation_in_future"
    assert qmtl("world", "runs", WORLD, "--stage", "paper", "--json").json()["runs"] == []
    # the bars before it are fine on their own, and the real next bar is not wedged out
    a, n_a = data["a"]
    assert qmtl("run", str(SMA), "--world", WORLD, "--data", str(a), "--json").json()["bars"]["new"] == n_a


def test_run_needs_a_submitted_strategy(env: dict[str, str], data: dict[str, tuple[Path, int]]) -> None:
    ran = qmtl("run", str(SMA), "--world", WORLD, "--data", str(data["a"][0]), "--json")
    assert ran.exit_code == 3
    assert ran.json()["error"] == "strategy_not_submitted"
    assert "qmtl submit FILE --world paper-test" in ran.stderr


def _live_decisions(self: WorldService, world: str, *, strategy_id: str | None = None) -> list[DecisionEnvelope]:
    assert strategy_id is not None
    return [DecisionEnvelope(world, strategy_id, "live", "live_activation", datetime.now(timezone.utc),
                             600, "etag-live-test", 1, allow_live=True)]


def test_live_orders_go_only_through_the_gate_to_the_broker(env: dict[str, str], data: dict[str, tuple[Path, int]],
                                                            tmp_path: Path, broker: Broker,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    strat = tmp_path / "always_long.py"
    strat.write_text(ALWAYS_LONG)
    hist, _ = data["hist"]
    # buy-and-hold fails the drawdown gate: still submitted (known to the world), which is all run needs
    assert qmtl("submit", str(strat), "--world", WORLD, "--data", str(hist)).exit_code == 10
    # the world decides live for it (governance is another part of qmtl: stand in for its decision)
    monkeypatch.setattr(WorldService, "decisions", _live_decisions)
    one, _ = _bars(tmp_path, "one.csv", "2012-06-04", "2012-06-04")
    no_broker = qmtl("run", str(strat), "--world", WORLD, "--data", str(one))
    assert no_broker.exit_code == 12 and "no broker is configured" in no_broker.stderr
    several = qmtl("run", str(strat), "--world", WORLD, "--data", str(data["a"][0]),
                   "--broker-webhook", broker.url)
    assert several.exit_code == 2 and "live runs take one new bar at a time" in several.stderr
    assert broker.orders == []

    ran = qmtl("run", str(strat), "--world", WORLD, "--data", str(one), "--broker-webhook", broker.url, "--json")
    assert ran.exit_code == 0, ran.stderr
    doc = ran.json()
    assert (doc["stage"], doc["execution_domain"], doc["run"]) == ("live", "live", None)
    assert doc["orders"]["published"] == 1 and doc["orders"]["blocked"] == {}
    (posted,) = broker.orders
    order = posted["body"]
    assert (order["action"], order["target"], order["symbol"]) == ("TARGET", 1.0, "GOOG")
    assert (order["world_id"], order["execution_domain"], order["strategy_id"]) == (WORLD, "live", doc["strategy_id"])
    assert posted["key"] == order["client_order_id"]
    assert "realized live returns come from the broker" in doc["note"]
    # the process-wide switch is back off after the run
    assert Runner.trade_submission_enabled() is False and not Runner.has_trade_execution_service()
    # the bar is fed: sending it again posts nothing
    again = qmtl("run", str(strat), "--world", WORLD, "--data", str(one), "--broker-webhook", broker.url, "--json")
    assert again.exit_code == 0 and again.json()["bars"]["new"] == 0 and len(broker.orders) == 1


@pytest.mark.parametrize("cli_mode", ["remote"], indirect=True)
def test_submit_and_run_against_a_real_server(env: dict[str, str], data: dict[str, tuple[Path, int]],
                                              real_server: tuple[str, str, dict[str, str]],
                                              tmp_path: Path) -> None:
    """Real processes over a socket: the client has no store and no worlds of its own, loads and
    backtests the strategy itself, and the server records what it is sent."""
    url, token, server_env = real_server
    client_env = {k: v for k, v in server_env.items() if k not in ("QMTL_DATABASE_URL", "QMTL_WORLDS_DIR")}
    client_env.update({"QMTL_SERVER": url, "QMTL_TOKEN": token, "QMTL_HOME": str(tmp_path / "client-home")})

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "qmtl_cli", *args], env=client_env, capture_output=True,
                              text=True, cwd=ROOT, timeout=120)

    # default bars come from the *client's* worlds dir (data/GOOG.csv there), not the server's
    mine = tmp_path / "client-worlds"
    (mine / "data").mkdir(parents=True)
    (mine / "data" / "GOOG.csv").write_text("".join(GOOG.read_text().splitlines(keepends=True)[:501]))
    local_bars = cli("--worlds-dir", str(mine), "submit", str(SMA), "--world", "research-sandbox", "--json")
    assert local_bars.returncode in (0, 10), local_bars.stderr
    assert json.loads(local_bars.stdout)["backtest"]["bars"] == 500
    assert json.loads(local_bars.stdout)["backtest"]["data"] == str(mine / "data" / "GOOG.csv")

    hist, _ = data["hist"]
    sub = cli("submit", str(SMA), "--world", WORLD, "--data", str(hist), "--json")
    assert sub.returncode == 0, sub.stderr
    assert json.loads(sub.stdout)["status"] == "pending"
    loop = cli("world", "campaign-loop", "--world", WORLD, "--once", "--execute", "--json")
    assert '"promote_to_paper"' in loop.stdout, loop.stdout + loop.stderr  # (then 12: no risk snapshot yet)
    enter_stage_at(WORLD, json.loads(sub.stdout)["strategy_id"], PAPER_SINCE)
    a, n_a = data["a"]
    fed = cli("run", str(SMA), "--world", WORLD, "--data", str(a), "--json")
    assert fed.returncode == 0, fed.stderr
    doc = json.loads(fed.stdout)
    assert (doc["execution_domain"], doc["bars"]["new"]) == ("dryrun", n_a)
    assert (doc["run"]["run_id"], doc["run"]["revision"], doc["run"]["window"]["n_observations"]) == (
        "paper-from-20120604", 1, n_a)
    again = cli("run", str(SMA), "--world", WORLD, "--data", str(a))
    assert again.returncode == 0 and "nothing new" in again.stdout and "#1" in again.stdout
    old = cli("run", str(SMA), "--world", WORLD, "--data", str(hist))
    assert old.returncode == 2 and old.stderr.count("\n") == 1 and "was never fed" in old.stderr
    # every change is the token's actor's, on the server's store
    entries = json.loads(cli("audit", "log", "--world", WORLD, "--json").stdout)["entries"]
    kinds = [e["kind"] for e in entries if e["actor"] == "otto"]
    assert {"strategy.submitted", "run.recorded", "strategy.fed"} <= set(kinds)
    assert all(e["actor"] == "otto" for e in entries if e["kind"].startswith(("strategy.", "run.")))


def test_run_refuses_a_gap_unless_allowed(env: dict[str, str], data: dict[str, tuple[Path, int]],
                                          tmp_path: Path) -> None:
    """Issue 16 item 15: a 100-day hole in daily bars used to be booked as one daily return, and
    the skipped bars could never be fed afterwards."""
    hist, _ = data["hist"]
    _submit_and_promote([str(SMA)], hist)
    a, n_a = data["a"]
    assert qmtl("run", str(SMA), "--world", WORLD, "--data", str(a)).exit_code == 0
    after_gap, n_late = _bars(tmp_path, "late.csv", "2013-01-14", "2013-03-01")  # last fed: 2012-10-04
    refused = qmtl_process("run", str(SMA), "--world", WORLD, "--data", str(after_gap))
    assert refused.exit_code == 2
    assert refused.stderr.strip().splitlines() == [
        f"qmtl: error: {after_gap}: bar 2013-01-14T00:00:00Z comes 102d after the bar before it "
        "(2012-10-04T00:00:00Z); more than 10d (10 x the stream interval 1d, at least 4d) is a gap in the "
        "data (feed the missing bars between 2012-10-04T00:00:00Z and 2013-01-14T00:00:00Z first, or pass "
        "--allow-gap to book one return across the gap (the bars inside it can then never be fed))"]
    as_json = qmtl("run", str(SMA), "--world", WORLD, "--data", str(after_gap), "--json")
    assert as_json.exit_code == 2 and as_json.json()["error"] == "bars_gap"
    history = qmtl("world", "runs", WORLD, "--stage", "paper", "--history", "--json").json()["runs"]
    assert [r["revision"] for r in history] == [1]  # refused: nothing written

    allowed = qmtl("run", str(SMA), "--world", WORLD, "--data", str(after_gap), "--allow-gap", "--json")
    assert allowed.exit_code in (0, 10), allowed.stderr
    doc = allowed.json()
    assert doc["bars"]["gaps"] == [{"before": "2012-10-04T00:00:00.000000Z", "after": "2013-01-14T00:00:00.000000Z",
                                    "seconds": 102 * 86400.0}]
    run = doc["run"]
    assert run["revision"] == 2 and run["window"]["n_observations"] == n_a + n_late  # one return across it
    # the hole also lowers the returns' rate below periods_per_year: both are said
    assert run["warnings"] == [
        "warning: returns are spaced about 161 per year but periods_per_year is 252: annualised metrics "
        "(sharpe, annual_volatility, cagr) are off by a factor of about 1.3 or more",
        "warning: one return spans a gap of 102d (2012-10-04T00:00:00Z to 2013-01-14T00:00:00Z)"]
    assert any("--allow-gap: 102d gap 2012-10-04..2013-01-14 booked as one return" in e["reason"]
               for e in qmtl("audit", "log", "--world", WORLD, "--json").json()["entries"])
    # the consequence the flag states: the bars inside the gap can never be fed now
    inside, _ = _bars(tmp_path, "inside.csv", "2012-10-05", "2013-01-11")
    late = qmtl("run", str(SMA), "--world", WORLD, "--data", str(inside), "--json")
    assert late.exit_code == 2 and late.json()["error"] == "bars_too_old"
    human = qmtl("run", str(SMA), "--world", WORLD, "--data", str(after_gap))
    assert human.exit_code in (0, 10) and "one return spans a gap of 102d" in human.stdout


def test_run_feeds_the_bars_of_a_refused_gap_first(env: dict[str, str], data: dict[str, tuple[Path, int]],
                                                   tmp_path: Path) -> None:
    """After a refusal the missing bars can still be fed, then the ones that were refused."""
    hist, _ = data["hist"]
    _submit_and_promote([str(SMA)], hist)
    assert qmtl("run", str(SMA), "--world", WORLD, "--data", str(data["a"][0])).exit_code == 0
    after_gap, _ = _bars(tmp_path, "late.csv", "2013-01-14", "2013-03-01")
    assert qmtl("run", str(SMA), "--world", WORLD, "--data", str(after_gap)).exit_code == 2
    inside, _ = _bars(tmp_path, "inside.csv", "2012-10-05", "2013-01-11")
    assert qmtl("run", str(SMA), "--world", WORLD, "--data", str(inside)).exit_code == 0
    doc = qmtl("run", str(SMA), "--world", WORLD, "--data", str(after_gap), "--json").json()
    assert doc["bars"]["gaps"] == [] and doc["run"]["warnings"] == []
