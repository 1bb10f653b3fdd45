"""Global options, --version, config, error mapping and start-up cost of the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_helpers import qmtl, qmtl_process


def test_version_flag() -> None:
    from qmtl_core import __version__

    ran = qmtl("--version")
    assert ran.exit_code == 0 and ran.stdout.strip() == f"qmtl {__version__}"


def test_help_imports_no_heavy_libraries() -> None:
    code = ("import sys; from qmtl_cli.app import main\n"
            "sys.argv=['qmtl','--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "heavy=[m for m in ('numpy','sqlalchemy','fastapi','pydantic','pandas','rich') if m in sys.modules]\n"
            "sys.stderr.write(repr(heavy))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Usage" in proc.stdout
    assert proc.stderr.strip() == "[]"


@pytest.mark.parametrize("argv", [["world", "--help"], ["audit", "--help"], ["config", "--help"]])
def test_group_help_is_light_too(argv: list[str]) -> None:
    code = ("import sys; from qmtl_cli.app import main\n"
            f"sys.argv=['qmtl', *{argv!r}]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "sys.stderr.write(repr([m for m in ('numpy','sqlalchemy','fastapi') if m in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stderr.strip() == "[]"


def test_config_set_get_list_unset(tmp_path: Path) -> None:
    assert qmtl("config", "set", "server", "http://127.0.0.1:8765").exit_code == 0
    got = qmtl("config", "get", "server")
    assert got.exit_code == 0 and got.stdout.strip() == "http://127.0.0.1:8765"
    listed = qmtl("config", "list", "--json").json()
    assert listed["values"] == {"server": "http://127.0.0.1:8765"}
    assert Path(listed["path"]).read_text().strip() == 'server = "http://127.0.0.1:8765"'
    removed = qmtl("--json", "config", "unset", "server").json()
    assert removed["removed"] is True
    missing = qmtl("config", "get", "server")
    assert missing.exit_code == 3 and "not set" in missing.stderr


def test_config_unknown_key_suggests() -> None:
    ran = qmtl("config", "set", "servr", "x")
    assert ran.exit_code == 2
    assert ran.stderr.count("\n") == 1 and "did you mean 'server'" in ran.stderr


def test_config_json_errors_are_one_document() -> None:
    ran = qmtl("config", "get", "servr", "--json")
    assert ran.exit_code == 2
    doc = ran.json()
    assert doc["error"] == "invalid_config" and doc["exit_code"] == 2


def test_broken_config_file_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "h"
    home.mkdir()
    (home / "config.toml").write_text("server = [unclosed\n")
    ran = qmtl("--home", str(home), "config", "list")
    assert ran.exit_code == 2 and "not valid TOML" in ran.stderr and "Traceback" not in ran.stderr


def test_environment_variables_feed_global_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "envhome"
    monkeypatch.setenv("QMTL_HOME", str(home))
    assert qmtl("config", "set", "token", "abc").exit_code == 0
    assert (home / "config.toml").exists()
    monkeypatch.setenv("QMTL_JSON", "1")
    assert json.loads(qmtl("config", "get", "token").stdout)["value"] == "abc"


def test_unreachable_server_is_one_line_and_never_acts_locally(tmp_path: Path) -> None:
    ran = qmtl("--server", "http://127.0.0.1:9", "audit", "verify")
    assert ran.exit_code == 12 and "cannot reach qmtl server http://127.0.0.1:9" in ran.stderr
    assert ran.stderr.count("\n") == 1 and not (tmp_path / "home" / "qmtl.db").exists()
    local_only = qmtl("--server", "http://127.0.0.1:9", "token", "list")
    assert local_only.exit_code == 2 and "local store only" in local_only.stderr


def test_usage_error_exits_2() -> None:
    assert qmtl("world", "show").exit_code == 2
    assert qmtl("no-such-command").exit_code == 2


def test_unexpected_error_is_one_line_exit_1_and_debug_shows_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    from qmtl_core.service import WorldService

    def boom(self, **kw):  # type: ignore[no-untyped-def]
        raise RuntimeError("kaboom\nsecond line")

    monkeypatch.setattr(WorldService, "audit_log", boom)
    ran = qmtl("audit", "log")
    assert ran.exit_code == 1
    assert ran.stderr.strip().count("\n") == 0 and "kaboom" in ran.stderr
    assert "Traceback" not in ran.stderr
    debug = qmtl("--debug", "audit", "log")
    assert debug.exit_code == 1 and "Traceback" in debug.stderr


def test_subprocess_exit_codes_reach_the_shell(tmp_path: Path) -> None:
    ran = qmtl_process("config", "get", "nothing")
    assert ran.exit_code == 2 and ran.stdout == "" and "Traceback" not in ran.stderr
