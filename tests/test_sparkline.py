"""Terminal sparklines of equity curves in ``qmtl world runs`` and ``qmtl world campaign``: the
characters, the pass/warn/fail colours on a terminal, plain text (no ANSI codes) when piped."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from qmtl_cli._sparkline import BLOCKS, equity, equity_sparkline, gate_status, resample, sparkline, styled_sparkline
from tests.cli_helpers import qmtl, qmtl_process

SPARK = set(BLOCKS)


def test_sparkline_characters() -> None:
    assert sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == "▁▂▃▄▅▆▇█"
    assert sparkline([8, 1]) == "█▁"
    assert sparkline([]) == "" and sparkline([float("nan")]) == ""
    assert sparkline([3, 3, 3]) == "▄▄▄"  # flat: mid-height, not an error
    assert sparkline([0, float("nan"), 1]) == "▁█"
    assert len(sparkline(range(1000), width=20)) == 20
    assert sparkline(range(1000), width=20)[-1] == "█" and sparkline(range(1000), width=20)[0] == "▁"


def test_resample_keeps_the_ends_and_equity_compounds() -> None:
    values = list(range(100))
    assert resample(values, 10) == [9, 19, 29, 39, 49, 59, 69, 79, 89, 99]
    assert resample(values[:5], 10) == values[:5]
    assert equity([0.1, -0.5, float("nan"), 1.0]) == pytest.approx([1.1, 0.55, 0.55, 1.1])
    assert equity_sparkline([0.01] * 30, width=10) == "▁▂▂▃▄▅▅▆▇█"  # compounding bends upwards
    assert equity_sparkline([-0.01] * 30, width=5)[0] == "█"


def test_gate_status() -> None:
    assert gate_status([]) is None
    assert gate_status([{"status": "pass", "severity": "blocking"}]) == "pass"
    assert gate_status([{"status": "fail", "severity": "soft"}, {"status": "pass", "severity": "blocking"}]) == "warn"
    assert gate_status([{"status": "fail", "severity": "info"}]) == "pass"  # info only reports
    assert gate_status([{"status": "fail", "severity": "blocking"}, {"status": "warn", "severity": "soft"}]) == "fail"


@pytest.mark.parametrize(("status", "code"), [("pass", "32"), ("warn", "33"), ("fail", "31")])
def test_colour_on_a_terminal(status: str, code: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    monkeypatch.delenv("NO_COLOR", raising=False)
    buf = io.StringIO()
    Console(file=buf, force_terminal=True, color_system="standard").print(styled_sparkline([0.01, -0.02, 0.03], status))
    assert f"\x1b[{code}m" in buf.getvalue() and "▁" in buf.getvalue()
    plain = io.StringIO()
    Console(file=plain, force_terminal=False).print(styled_sparkline([0.01, -0.02, 0.03], status))
    assert "\x1b[" not in plain.getvalue() and plain.getvalue().strip() == equity_sparkline([0.01, -0.02, 0.03])


@pytest.fixture
def world(store_url: str, worlds_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    from tests._service import Clock, make_service
    from tests.test_report import POLICY, T0, build_world

    (worlds_dir / "rep.yaml").write_text(POLICY)
    monkeypatch.setenv("QMTL_WORLDS_DIR", str(worlds_dir))
    monkeypatch.setenv("QMTL_DATABASE_URL", store_url)
    svc = make_service(store_url, worlds_dir, tmp_path / "home", Clock(T0)).as_actor("cron")
    try:
        build_world(svc)
        curves = {(r["strategy_id"], r["stage"]): [x[1] for x in r["returns"]]
                  for r in svc.run_returns("rep", latest_per_stage=True)}
    finally:
        svc.close()
    return {"curves": curves}


def _line_of(text: str, *words: str) -> str:
    return next(line for line in text.splitlines() if all(w in line.split() for w in words))


def test_runs_table_shows_each_runs_curve(world: dict[str, Any]) -> None:
    ran = qmtl("world", "runs", "rep")
    assert ran.exit_code == 0, ran.stderr
    assert "equity" in ran.stdout.splitlines()[0] and "\x1b[" not in ran.stdout
    for (sid, stage), returns in world["curves"].items():
        line = _line_of(ran.stdout, sid, stage)
        assert equity_sparkline(returns) in line, (sid, stage, line)
    history = qmtl("world", "runs", "rep", "--strategy", "a", "--history")
    assert all(any(ch in SPARK for ch in line) for line in history.stdout.splitlines()[2:])
    assert qmtl("world", "runs", "rep", "--json").json()["runs"][0].keys() >= {"run_id", "metrics"}


def test_campaign_shows_the_chained_curve_and_status(world: dict[str, Any]) -> None:
    ran = qmtl("world", "campaign", "rep")
    assert ran.exit_code == 0, ran.stderr
    chained = world["curves"][("a", "backtest")] + world["curves"][("a", "paper")] + world["curves"][("a", "live")]
    header = _line_of(ran.stdout, "a", "live_campaign")
    assert equity_sparkline(chained, width=24) in header and header.split()[-1] == "pass"
    assert _line_of(ran.stdout, "c", "backtest_campaign").split()[-1] == "fail"
    assert "\x1b[" not in ran.stdout
    assert "strategies" in qmtl("world", "campaign", "rep", "--json").json()


def test_piped_output_has_no_ansi_codes(world: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)  # only the pipe decides here
    for args in (("world", "runs", "rep"), ("world", "campaign", "rep")):
        ran = qmtl_process(*args)
        assert ran.exit_code == 0, ran.stderr
        assert "\x1b[" not in ran.stdout and any(ch in SPARK for ch in ran.stdout)
