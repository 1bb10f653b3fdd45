"""``qmtl world validate|list|show`` on the bundled worlds; policy versions recorded on both backends."""

from __future__ import annotations

import pytest

from pathlib import Path

from tests.cli_helpers import qmtl, qmtl_process
from tests.test_authority import OS_USER

pytestmark = pytest.mark.usefixtures("cli_mode")


def test_validate_all_json(qmtl_env: dict[str, str]) -> None:
    ran = qmtl("world", "validate", "--all", "--json")
    assert ran.exit_code == 0
    doc = ran.json()
    assert doc["valid"] is True and len(doc["results"]) >= 3
    assert all(r["ok"] and r["policy_version"] >= 1 for r in doc["results"])


def test_validate_paths_and_all_together_is_usage_error(qmtl_env: dict[str, str], worlds_dir: Path) -> None:
    ran = qmtl("world", "validate", str(worlds_dir / "demo-momentum.yaml"), "--all")
    assert ran.exit_code == 2 and "not both" in ran.stderr


def test_list_json_records_nothing(qmtl_env: dict[str, str]) -> None:
    first = qmtl("--json", "world", "list").json()
    names = [w["world"] for w in first["worlds"]]
    assert {"demo-momentum", "auto-carry", "research-sandbox"} <= set(names)
    assert all(w["valid"] and len(w["content_hash"]) == 64 for w in first["worlds"])
    assert all(w["in_force_version"] is None for w in first["worlds"])
    qmtl("world", "list")
    assert qmtl("audit", "log", "--json").json()["entries"] == []  # a read: nothing recorded
    assert qmtl("world", "validate", "--all", "--record").exit_code == 0
    listed = qmtl("--json", "world", "list").json()["worlds"]
    assert all(w["in_force_version"] == w["policy_version"] for w in listed)
    log = qmtl("audit", "log", "--json", "--kind", "policy.*").json()["entries"]
    assert sorted(e["world"] for e in log) == sorted(names) and {e["actor"] for e in log} == {OS_USER}


def test_show_json_and_human(qmtl_env: dict[str, str]) -> None:
    assert qmtl("world", "show", "demo-momentum", "--json").json()["policy_versions"] == []  # reads record nothing
    assert qmtl("world", "validate", "--all", "--record").exit_code == 0
    doc = qmtl("world", "show", "demo-momentum", "--json").json()
    assert doc["policy"]["governance"]["live_promotion"]["approval_ttl"] == "3d"
    assert doc["policy_versions"][0]["policy_version"] == 1
    human = qmtl("world", "show", "demo-momentum")
    assert human.exit_code == 0 and "manual_approval" in human.stdout and "max_drawdown" in human.stdout


def test_show_unknown_world_suggests(qmtl_env: dict[str, str]) -> None:
    ran = qmtl("world", "show", "demo-momentun")
    assert ran.exit_code == 3 and "did you mean 'demo-momentum'" in ran.stderr


def test_changed_policy_needs_a_new_version_and_is_ledgered_with_a_diff(
        qmtl_env: dict[str, str], worlds_dir: Path) -> None:
    path = worlds_dir / "research-sandbox.yaml"
    assert qmtl("world", "validate", "--record", str(path)).exit_code == 0
    path.write_text(path.read_text().replace("min: 0.3}", "min: 0.4}"))
    stale = qmtl_process("world", "validate", "--record", str(path))
    assert stale.exit_code == 4 and "policy_version: 2" in stale.stderr
    assert qmtl("world", "show", "research-sandbox").exit_code == 0  # a read: shows the version in force
    path.write_text(path.read_text().replace("policy_version: 1", "policy_version: 2"))
    recorded = qmtl("world", "validate", "--record", str(path), "--json").json()["recorded"]
    assert recorded == {"research-sandbox": {"policy_version": 2, "status": "adopted", "newly_recorded": True}}
    entries = qmtl("audit", "log", "--world", "research-sandbox", "--json").json()["entries"]
    assert [e["kind"] for e in entries] == ["policy.recorded", "policy.changed"]
    diff = entries[-1]["payload"]["diff"]
    assert "-  - {id: sharpe, metric: sharpe, min: 0.3}" in diff
    assert "+  - {id: sharpe, metric: sharpe, min: 0.4}" in diff
    # Comments alone are not a new policy.
    before = len(qmtl("audit", "log", "--json").json()["entries"])
    path.write_text(path.read_text() + "# a note\n")
    assert qmtl("world", "validate", "--record", str(path)).exit_code == 0
    assert len(qmtl("audit", "log", "--json").json()["entries"]) == before
    versions = qmtl("world", "show", "research-sandbox", "--json").json()["policy_versions"]
    assert [v["policy_version"] for v in versions] == [1, 2]
    assert qmtl("audit", "verify").exit_code == 0


def test_missing_worlds_dir_is_bad_input(tmp_path: Path) -> None:
    ran = qmtl_process("--worlds-dir", str(tmp_path / "nope"), "world", "list")  # a local option
    assert ran.exit_code == 2 and "does not exist" in ran.stderr
