"""A CLI people enjoy (issue 18, items 1-6): each numbered finding as a regression test."""

from __future__ import annotations

import json
import re
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest

from qmtl_core.errors import AmbiguousId, NotFoundError
from qmtl_core.id_prefix import resolve_prefix, short_id
from qmtl_core.timeutil import human_duration
from tests.cli_helpers import qmtl, qmtl_process

ROOT = Path(__file__).resolve().parent.parent
HEX_A = "abcd1234" + "0" * 56
HEX_B = "abcd5678" + "1" * 56


# --- 1. after make demo, the README's examples see the demo -------------------------------------------
def test_readme_try_it_points_at_the_demo_store_and_path() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Try it", 1)[1].split("\n## ", 1)[0]
    demo_home = re.search(r"^DEMO_HOME := \$\(CURDIR\)/(\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert demo_home is not None
    assert f"export QMTL_HOME=$PWD/{demo_home.group(1)}" in section
    assert "PATH=$PWD/.venv/bin:$PATH" in section and "QMTL_WORLDS_DIR=$PWD/worlds" in section
    assert "--install-completion" in section  # shell completion is documented


# --- 2. names with short ids; any unique prefix, as git does ------------------------------------------
def test_resolve_prefix_rule() -> None:
    ids = [HEX_A, HEX_B, "sma_10_30"]
    assert resolve_prefix("abcd1", ids, what="strategy") == HEX_A
    assert resolve_prefix("sma_10_30", ids, what="strategy") == "sma_10_30"
    with pytest.raises(AmbiguousId) as amb:
        resolve_prefix("abcd", ids, what="strategy")
    assert amb.value.exit_code == 2 and amb.value.details["candidates"] == [HEX_A, HEX_B]
    with pytest.raises(NotFoundError):
        resolve_prefix("abc", ids, what="strategy")  # shorter than git's 4: never a guess
    with pytest.raises(NotFoundError):
        resolve_prefix("ffff", ids, what="strategy")
    assert short_id(HEX_A) == "abcd12340000" and short_id("sma_10_30") == "sma_10_30"


@pytest.fixture
def hex_world(qmtl_env: dict[str, str], tmp_path: Path, cli_mode: str) -> str:
    metrics = tmp_path / "m.json"
    metrics.write_text(json.dumps({"x": {"sharpe": 1.2, "max_drawdown": 0.1}}))
    for sid in (HEX_A, HEX_B):
        assert qmtl("world", "evaluate", "demo-momentum", "--strategy", sid, "--metrics", str(metrics)).exit_code == 10
    from qmtl_core.config import Settings
    from qmtl_core.service import WorldService

    svc = WorldService(Settings.resolve())
    svc.register_strategy("demo-momentum", strategy_id=HEX_A, name="SmaCrossover")
    svc.close()
    return "demo-momentum"


def test_tables_show_names_and_short_ids(hex_world: str) -> None:
    for argv in (("world", "runs", hex_world), ("world", "campaign", hex_world), ("world", "decision", hex_world)):
        out = qmtl(*argv)
        assert out.exit_code == 0, out.stderr
        assert HEX_A not in out.stdout and HEX_B not in out.stdout
        assert "SmaCrossover abcd12340000" in out.stdout and "abcd56781111" in out.stdout
    # --json keeps the full ids: scripts never get a shortened one
    assert {r["strategy_id"] for r in qmtl("world", "runs", hex_world, "--json").json()["runs"]} == {HEX_A, HEX_B}


def test_unique_prefixes_are_accepted_and_ambiguous_ones_list_candidates(hex_world: str) -> None:
    runs = qmtl("world", "runs", hex_world, "--strategy", "abcd1", "--json")
    assert runs.exit_code == 0 and {r["strategy_id"] for r in runs.json()["runs"]} == {HEX_A}
    camp = qmtl("world", "campaign", hex_world, "-s", "abcd5678", "--json")
    assert [v["strategy_id"] for v in camp.json()["strategies"]] == [HEX_B]
    amb = qmtl("world", "runs", hex_world, "--strategy", "abcd")
    assert amb.exit_code == 2 and HEX_A in amb.stderr and HEX_B in amb.stderr and amb.stderr.count("\n") == 1
    doc = qmtl("world", "decision", hex_world, "--strategy", "abcd", "--json")
    assert doc.exit_code == 2 and doc.json()["error"] == "ambiguous_id"
    assert doc.json()["details"]["candidates"] == [HEX_A, HEX_B]
    assert qmtl("world", "runs", hex_world, "--strategy", "abc").exit_code == 3
    # a money-moving command resolves the same way: an ambiguous prefix changes nothing
    before = qmtl("audit", "log", "--json").json()["entries"]
    assert qmtl("world", "demote", hex_world, "abcd", "--reason", "x").exit_code == 2
    assert qmtl("audit", "log", "--json").json()["entries"] == before


# --- 3. human durations; one reason printed once -------------------------------------------------------
def test_human_durations() -> None:
    assert human_duration(timedelta(minutes=17, seconds=1.328945)) == "17m 1s"
    assert human_duration(timedelta(days=272, hours=8, minutes=19, seconds=33)) == "272d 8h"
    assert human_duration(timedelta(days=1)) == "1d" and human_duration(45) == "45s"
    assert human_duration(0) == "0s" and human_duration(-90) == "-1m 30s"


def test_freshness_and_blocked_action_read_as_people_write() -> None:
    from qmtl_core.campaign import StrategyState, WorldState, tick
    from tests.test_campaign_tick import NOW, POLICY, _run, _snap

    done = StrategyState("s", "paper", {"paper": _run("paper", days=31, n=25)})
    snap = _snap({"s": 25}, age=timedelta(days=272, hours=8, minutes=19))
    action = tick(WorldState("w", POLICY, (done,), snap), NOW)[0]
    assert (action.action, action.reason) == ("blocked", "risk_snapshot_lagging")
    assert "lags 272d 8h (max 15m)" in action.detail
    assert "risk_snapshot_lagging" not in action.detail  # the reason is not repeated in its own detail
    assert not re.search(r"\d+ days?, \d+:\d\d|\d:\d\d:\d\d\.\d", action.detail)


# --- 4. required options marked; --once needs --world or --all; events tail follows from now ----------
@pytest.mark.parametrize("argv", [("approve",), ("reject",), ("world", "halt"), ("world", "resume"),
                                  ("world", "demote"), ("world", "rollback")])
def test_reason_is_marked_required(argv: tuple[str, ...]) -> None:
    text = qmtl(*argv, "--help").stdout
    line = next(ln for ln in text.splitlines() if "--reason" in ln)
    assert "[required]" in line or "[required]" in text.split("--reason", 1)[1].split("--json", 1)[0]
    docs = (ROOT / "docs" / "cli.md").read_text()
    section = docs.split(f"## qmtl {' '.join(argv)}\n", 1)[1].split("\n## ", 1)[0]
    assert "[required]" in section.split("--reason", 1)[1].split("--json", 1)[0]


def test_campaign_loop_needs_world_or_all(qmtl_env: dict[str, str], cli_mode: str) -> None:
    before = qmtl("audit", "log", "--json").json()["entries"]
    ran = qmtl("world", "campaign-loop", "--once", "--execute")
    assert ran.exit_code == 2 and "--world" in ran.stderr and "--all" in ran.stderr
    assert qmtl("audit", "log", "--json").json()["entries"] == before  # nothing ran
    assert qmtl("world", "campaign-loop", "--all", "--once").exit_code in (0, 10, 11, 12)


# --- 5. --json errors as JSON; --json --version; world list exit 2 on invalid worlds -------------------
@pytest.mark.parametrize("argv", [
    ("--json", "world", "halt"),                      # missing argument
    ("world", "halt", "w", "--json"),                 # missing required option
    ("--json", "no-such-command"),
    ("--json", "world", "runs", "w", "--bogus"),
    ("--json", "world", "report", "w", "--top", "0"),  # out of range
])
def test_json_usage_errors_are_one_json_document(argv: tuple[str, ...]) -> None:
    ran = qmtl_process(*argv)
    assert ran.exit_code == 2
    doc = json.loads(ran.stdout)
    assert doc["exit_code"] == 2 and doc["error"] == "usage" and doc["message"]
    assert ran.stderr.startswith("qmtl: error: ") and ran.stderr.count("\n") == 1 and "Traceback" not in ran.stderr


def test_usage_errors_without_json_keep_the_usage_block() -> None:
    ran = qmtl_process("world", "halt")
    assert ran.exit_code == 2 and ran.stdout == "" and "Usage: qmtl world halt" in ran.stderr


def test_json_version() -> None:
    from qmtl_core._version import __version__

    for argv in (("--json", "--version"), ("--version", "--json")):
        ran = qmtl(*argv)
        assert ran.exit_code == 0 and ran.json() == {"version": __version__}
    assert qmtl("--version").stdout == f"qmtl {__version__}\n"


def test_world_list_exits_2_when_a_world_is_invalid(qmtl_env: dict[str, str], worlds_dir: Path,
                                                   cli_mode: str) -> None:
    assert qmtl("world", "list").exit_code == 0
    (worlds_dir / "broken.yaml").write_text("world: broken\npolicy_version: 1\nrulez: []\n")
    ran = qmtl("world", "list")
    assert ran.exit_code == 2 and "broken" in ran.stdout and "invalid" in ran.stdout
    doc = qmtl("world", "list", "--json")
    assert doc.exit_code == 2 and [w["valid"] for w in doc.json()["worlds"] if w["world"] == "broken"] == [False]


# --- 6. make test shows progress; README outputs are ignored by git ------------------------------------
def test_make_test_shows_progress() -> None:
    recipe = (ROOT / "Makefile").read_text().split("\ntest:", 1)[1].split("\n\n", 1)[0]
    pytest_line = next(ln for ln in recipe.splitlines() if "pytest" in ln and "-m pytest" in ln)
    assert " -q" not in pytest_line and "--durations" in pytest_line


def test_readme_outputs_are_ignored_by_git() -> None:
    readme = (ROOT / "README.md").read_text()
    written = set(re.findall(r"^qmtl [^\n#]*?(?:--out|>) ([\w.\-/]+)", readme, re.M))
    written |= set(re.findall(r"^\(?head [^\n#]*> ([\w.\-]+)", readme, re.M))
    assert {"policy.schema.json", "history.csv", "new-bars.csv", "report.html", "charts"} <= written
    for path in written - {p for p in written if p.startswith(("/", "~", "$"))}:  # only files in the repo
        probe = path + "/x.png" if "." not in path else path
        ignored = subprocess.run(["git", "check-ignore", "-q", probe], cwd=ROOT)
        assert ignored.returncode == 0, f"{path} (written by a README example) is not in .gitignore"


def test_events_tail_follows_from_now(real_server) -> None:  # type: ignore[no-untyped-def]
    import os
    import sys
    import time

    url, token, env = real_server
    client_env = {k: v for k, v in env.items() if k not in ("QMTL_DATABASE_URL", "QMTL_WORLDS_DIR")}
    client_env.update({"QMTL_SERVER": url, "QMTL_TOKEN": token, "QMTL_HOME": str(Path(env["QMTL_HOME"]).parent / "c")})
    cmd = [sys.executable, "-m", "qmtl_cli"]
    old = subprocess.run([*cmd, "world", "evaluate", "gov", "--strategy", "old", "--stage", "paper"],
                         env=client_env, capture_output=True, text=True, cwd=ROOT)
    assert old.returncode == 12, old.stderr
    tail = subprocess.Popen([*cmd, "events", "tail", "--world", "gov", "--limit", "1", "--json"], env=client_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    # Record new runs until the tail has seen one: it must never print the entries from before it started.
    deadline = time.monotonic() + 60
    n = 0
    while tail.poll() is None and time.monotonic() < deadline:
        n += 1
        subprocess.run([*cmd, "world", "evaluate", "gov", "--strategy", f"new{n}", "--stage", "paper"],
                       env=client_env, capture_output=True, cwd=ROOT)
        time.sleep(0.5)
    out, err = tail.communicate(timeout=30)
    assert tail.returncode == 0, err
    event = json.loads(out)
    assert event["kind"] == "run.recorded" and event["subject"].startswith("new"), event
    replay = subprocess.run([*cmd, "events", "tail", "--world", "gov", "--since", "0", "--limit", "1", "--json"],
                            env={**os.environ, **client_env}, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert json.loads(replay.stdout)["kind"] == "policy.recorded"


from tests.test_serve import real_server  # noqa: E402,F401  (the fixture: a real qmtl serve on a free port)
