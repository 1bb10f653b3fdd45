"""``X-Allow-Live``: the caller's explicit intent on every call that would make or keep something live.

The matrix runs each live-changing route (promote under auto_apply, the last approval, rollback to a
set with a live strategy, resume, campaign/run with execute) through the real FastAPI app with the
header absent / ``false`` / malformed / ``true``, as a role that may call it and as one that may not,
in a world with ``allow_live`` true and false. A refused call must change nothing: the confirmed
call that follows it, on the same state, is what applies. Local mode goes through the same facade
(``--allow-live``, config ``allow_live``/``QMTL_ALLOW_LIVE``).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest

from qmtl_core.errors import LiveNotConfirmed
from qmtl_core.service._auth import create_token
from tests._remote import InProcessServer
from tests._service import Clock, make_service
from tests.cli_helpers import qmtl
from tests.test_governance import Setup, policy_text

HEADERS: dict[str, dict[str, str]] = {"absent": {}, "false": {"X-Allow-Live": "false"},
                                      "bogus": {"X-Allow-Live": "yes"}, "true": {"X-Allow-Live": "TRUE"}}


class Api:
    """An in-process ``qmtl serve`` with one token per role, and a setup facade (no live intent)."""

    def __init__(self) -> None:
        self.server = InProcessServer()
        svc = self.server.app.state.service
        self.tokens: dict[str, str] = {}
        with svc.store.write() as conn:
            for role, actor in (("reader", "rita"), ("submitter", "sam"), ("approver", "alice"),
                                ("approver", "bob"), ("operator", "otto")):
                self.tokens[actor] = create_token(conn, actor=actor, role=role, created_by="admin",
                                                  now=svc.clock())[1]
        self.http = httpx.Client(base_url="http://qmtl.test", transport=self.server)
        self.setup_svc = svc.as_actor("cron")
        self.setup_svc.clock = Clock(datetime.now(timezone.utc))
        # The setup acts with the live intent where it must put something live before the test.
        self.live_svc = self.setup_svc.confirming_live(True)

    def call(self, method: str, path: str, actor: str, header: str, body: Any = None) -> httpx.Response:
        return self.http.request(method, path, json=body,
                                 headers={"Authorization": f"Bearer {self.tokens[actor]}", **HEADERS[header]})

    def live(self, world: str) -> list[str]:
        return sorted(a["strategy_id"] for a in self.setup_svc.activations(world)["activations"]
                      if a["stage"] == "live")

    def ledger_size(self) -> int:
        return len(self.setup_svc.audit_log())


@pytest.fixture
def api(qmtl_env: dict[str, str], worlds_dir: Path) -> Any:
    (worlds_dir / "gov.yaml").write_text(policy_text())
    (worlds_dir / "auto.yaml").write_text(policy_text("auto", mode="auto_apply"))
    (worlds_dir / "nolive.yaml").write_text(policy_text("nolive", allow_live=False, mode="auto_apply"))
    a = Api()
    yield a
    a.http.close()


# --- each route: (world, set the scene, the call, its permitted actor) ------------------------------------
def _promote(a: Api, world: str) -> tuple[str, str, Any]:
    Setup(a.setup_svc, world).ready("a")
    return "POST", f"/worlds/{world}/promotions", {"strategy_id": "a", "reason": "go"}


def _campaign(a: Api, world: str) -> tuple[str, str, Any]:
    Setup(a.setup_svc, world).ready("a")
    return "POST", f"/worlds/{world}/campaign/run", {"execute": True, "holder": "h"}


def _approve(a: Api, world: str) -> tuple[str, str, Any]:
    Setup(a.setup_svc, world).ready("a")
    rid = a.setup_svc.as_actor("carol").promote(world, "a", reason="go").request_id
    a.setup_svc.as_actor("alice").decide_request(rid, decision="approve", reason="ok")
    return "POST", f"/promotions/{rid}/approve", {"reason": "ship it"}


def _rollback(a: Api, world: str) -> tuple[str, str, Any]:
    Setup(a.setup_svc, world).ready("a")
    rid = a.setup_svc.as_actor("carol").promote(world, "a", reason="go").request_id
    a.setup_svc.as_actor("alice").decide_request(rid, decision="approve", reason="ok")
    a.live_svc.as_actor("bob").decide_request(rid, decision="approve", reason="ok")
    a.setup_svc.demote(world, "a", reason="drill")  # rolling this back puts a live again
    return "POST", f"/worlds/{world}/rollback", {"reason": "undo the drill"}


def _resume(a: Api, world: str) -> tuple[str, str, Any]:
    a.setup_svc.set_halted(world, halted=True, reason="broker outage")
    a.setup_svc.load_world(world)  # the policy in force recorded, as any acting command does first
    return "POST", f"/worlds/{world}/resume", {"reason": "fixed"}


Route = Callable[[Api, str], tuple[str, str, Any]]
#: name -> (scene, world with allow_live true, the actor allowed to call it)
ROUTES: dict[str, tuple[Route, str, str]] = {
    "promote": (_promote, "auto", "sam"),
    "campaign_run": (_campaign, "auto", "otto"),
    "approve": (_approve, "gov", "bob"),
    "resume": (_resume, "gov", "otto"),
}
#: Rollback, since one gate guards every path into live (issue 20), never makes anything live on its
#: own: rows that would go live come back in paper with a request opened, so no intent is asked.
#: (Resume still asks for it: lifting the kill switch is a live change in itself.)
RESTORING: dict[str, tuple[Route, str, str]] = {
    "rollback": (_rollback, "gov", "otto"),
}


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_live_change_needs_the_header(api: Api, route: str) -> None:
    scene, world, actor = ROUTES[route]
    method, path, body = scene(api, world)
    before_live, before_ledger = api.live(world), api.ledger_size()
    for header in HEADERS:  # a role without the permission is refused first, whatever it sends
        denied = api.call(method, path, "rita", header, body)
        assert denied.status_code == 403, (header, denied.text)
    bogus = api.call(method, path, actor, "bogus", body)
    assert bogus.status_code == 400 and "X-Allow-Live must be true or false" in bogus.json()["message"]
    for header in ("absent", "false"):
        refused = api.call(method, path, actor, header, body)
        assert refused.status_code == 428, (header, refused.text)
        doc = refused.json()
        assert doc["error"] == "allow_live_required" and doc["exit_code"] == 10
        assert "nothing was changed" in doc["message"] and "\n" not in doc["message"]
    # Refusals wrote nothing: no activation, no ledger entry (not even the vote or the halt lift).
    assert (api.live(world), api.ledger_size()) == (before_live, before_ledger)
    done = api.call(method, path, actor, "true", body)
    assert done.status_code == 200, done.text
    if route != "resume":
        assert api.live(world) == ["a"]
    else:
        assert done.json()["changed"] is True


@pytest.mark.parametrize("route", ["promote", "campaign_run"])
def test_allow_live_false_still_applies_on_top(api: Api, route: str) -> None:
    """With the header a world whose policy says ``allow_live: false`` still puts nothing live; and
    without the header there is no 428 either, because nothing would go live."""
    scene, _, actor = ROUTES[route]
    method, path, body = scene(api, "nolive")
    for header in ("absent", "true"):
        r = api.call(method, path, actor, header, body)
        assert r.status_code == 200, r.text
        assert r.json()["exit_code"] == 10  # blocked by policy (allow_live_false)
        assert api.live("nolive") == []


def test_calls_that_change_nothing_live_need_no_header(api: Api) -> None:
    """Opening a request, a first approval, halting, planning: none makes anything live."""
    Setup(api.setup_svc, "gov").ready("a")
    opened = api.call("POST", "/worlds/gov/promotions", "sam", "absent", {"strategy_id": "a"})
    assert opened.status_code == 200 and opened.json()["status"] == "pending"
    first = api.call("POST", f"/promotions/{opened.json()['request_id']}/approve", "alice", "absent",
                     {"reason": "ok"})
    assert first.status_code == 200 and first.json()["status"] == "pending"
    assert api.call("POST", "/worlds/gov/halt", "otto", "absent", {"reason": "drill"}).status_code == 200
    plan = api.call("POST", "/worlds/auto/campaign/run", "otto", "absent", {"execute": False, "holder": "h"})
    assert plan.status_code == 200


# --- local mode: the same facade -----------------------------------------------------------------------
def test_local_facade_refuses_without_intent(store_url: str, worlds_dir: Path, tmp_path: Path) -> None:
    (worlds_dir / "auto.yaml").write_text(policy_text("auto", mode="auto_apply"))
    svc = make_service(store_url, worlds_dir, tmp_path / "h", Clock(datetime.now(timezone.utc)),
                       live=False).as_actor("cron")
    Setup(svc, "auto").ready("a")
    entries = len(svc.audit_log())
    with pytest.raises(LiveNotConfirmed, match="promoting a would put it live in auto"):
        svc.promote("auto", "a")
    # the library loop isolates worlds: this one is reported refused (exit 10), and nothing is written
    refused = Setup(svc, "auto").loop()
    assert (refused.status, refused.exit_code, refused.error) == ("refused", 10, "allow_live_required")
    assert "campaign loop would put a live" in (refused.message or "")
    assert len(svc.audit_log()) == entries
    assert svc.confirming_live().promote("auto", "a").status == "applied"
    svc.close()


@pytest.mark.usefixtures("cli_mode")
def test_cli_campaign_loop_needs_allow_live_for_apply(qmtl_env: dict[str, str], worlds_dir: Path,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (worlds_dir / "auto.yaml").write_text(policy_text("auto", mode="auto_apply"))
    svc = make_service(qmtl_env["QMTL_DATABASE_URL"], worlds_dir, tmp_path / "h",
                       Clock(datetime.now(timezone.utc)), live=False).as_actor("cron")
    Setup(svc, "auto").ready("a")
    svc.close()
    refused = qmtl("world", "campaign-loop", "--world", "auto", "--once", "--execute", "--json")
    assert refused.exit_code == 10
    world = refused.json()["worlds"][0]
    assert world["status"] == "refused" and "would put a live in auto" in world["message"]
    assert qmtl("world", "history", "auto", "--json").json()["live"] == []
    bad = qmtl("world", "campaign-loop", "--world", "auto", "--once", "--execute",
               env={"QMTL_ALLOW_LIVE": "yes"})
    assert bad.exit_code == 2 and "allow_live must be true or false" in bad.stderr
    # cron: the standing intent from the environment / config file
    monkeypatch.setenv("QMTL_ALLOW_LIVE", "true")
    done = qmtl("world", "campaign-loop", "--world", "auto", "--once", "--execute", "--json")
    assert done.exit_code == 0, done.stdout + done.stderr
    assert qmtl("world", "history", "auto", "--json").json()["live"] == ["a"]


@pytest.mark.parametrize("route", sorted(RESTORING))
def test_rollback_needs_no_intent_because_it_never_goes_live(api: Api, route: str) -> None:
    scene, world, actor = RESTORING[route]
    method, path, body = scene(api, world)
    for header in HEADERS:
        denied = api.call(method, path, "rita", header, body)
        assert denied.status_code == 403, (header, denied.text)
    done = api.call(method, path, actor, "absent", body)
    assert done.status_code == 200, done.text
    assert api.live(world) == []  # restored to paper; going live again takes the gate and a request
