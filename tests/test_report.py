"""``qmtl world report``: what the page says (gate table golden, evidence hashes, timeline), the
options (--strategy, --at, --format png, --json), the edge cases (no strategies, unknown world),
``qmtl promote --list`` naming each pending request's report, and the series behind the charts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.cli_helpers import qmtl
from tests._service import Clock, make_service

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)
POLICY = """\
world: rep
description: report test world
policy_version: 1
allow_live: true
rules:
  - {id: sharpe, metric: sharpe, min: 0.3}
  - {id: drawdown, metric: max_drawdown, max: 0.25}
  - {id: vol_band, metric: annual_volatility, min: 0.01, max: 0.5}
  - {id: trades, metric: n_trades, min: 30, severity: soft, stages: [backtest]}
  - {id: history, metric: effective_history_years, min: 1, stages: [backtest]}
  - {id: tail, metric: cvar_95, max: 0.01, severity: info}
validation: {on_missing_metric: fail}
campaign:
  backtest: {window: 300d, min_observations: 250}
  paper: {window: 10d, min_observations: 8}
governance:
  live_promotion:
    mode: manual_approval
    approvers: [alice, bob, carol]
    required_approvals: 2
    cooldown: 0s
    max_live_slots: 2
risk: {snapshot_max_age: 1h, decision_ttl: 10m}
"""


# --- a world with backtest, paper and live history --------------------------------------------------------
def build_world(svc: Any, world: str = "rep") -> dict[str, Any]:
    """``a``: backtest → paper → live (carol asks, alice and bob approve), then 40 live days;
    ``b``: paper, its request pending; ``c``: backtest only, failing. The world was halted and
    resumed once. Returns moments and ids the tests look for."""
    from tests.test_governance import Setup

    s = Setup(svc, world)
    s.ready("a", "b")
    s.backtest("c", mean=-0.001)
    # halted and resumed before anything went live: a halt takes live strategies back to paper
    svc.set_halted(world, halted=True, reason="broker outage")
    svc.set_halted(world, halted=False, reason="broker back")
    rid = svc.as_actor("carol").promote(world, "a", reason="30 paper days clean").request_id
    svc.as_actor("alice").decide_request(rid, decision="approve", reason="drawdown within budget")
    svc.clock.advance(minutes=1)
    svc.as_actor("bob").decide_request(rid, decision="approve", reason="agreed")
    live_at = svc.clock()
    svc.clock.advance(days=1)
    svc.clock.advance(days=40)  # live returns count only when observed after a went live
    now = svc.clock()
    live = [(now - timedelta(days=40 - i), 0.0015 * (1 if i % 4 else -1.2)) for i in range(40)]
    svc.record_evaluation(world, strategy_id="a", stage="live", returns=live)
    svc.clock.advance(hours=1)
    s.snapshot(["a", "b"], 12, version="p12-again")  # fresh evidence for b's request
    pending = svc.as_actor("carol").promote(world, "b", reason="paper looks good")
    assert pending.status == "pending", pending.to_dict()
    return {"live_at": live_at, "request_a": rid, "request_b": pending.request_id,
            "evidence_b": pending.gate.evidence_hash}


@pytest.fixture
def world(store_url: str, worlds_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    (worlds_dir / "rep.yaml").write_text(POLICY)
    monkeypatch.setenv("QMTL_WORLDS_DIR", str(worlds_dir))
    monkeypatch.setenv("QMTL_DATABASE_URL", store_url)
    svc = make_service(store_url, worlds_dir, tmp_path / "home", Clock(T0)).as_actor("cron")
    try:
        built = build_world(svc)
    finally:
        svc.close()
    return {**built, "home": tmp_path / "home", "worlds": worlds_dir, "store_url": store_url}


# --- reading the page ----------------------------------------------------------------------------------
class Tables(HTMLParser):
    """Every ``<table>``: its class, data attributes and rows of cell text."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[dict[str, Any]] = []
        self._stack: list[dict[str, Any]] = []
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self.attrs: list[tuple[str, str, str | None]] = []  # (tag, attribute, value) of every element

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.attrs.extend((tag, k, v) for k, v in attrs)
        a = dict(attrs)
        if tag == "table":
            self._stack.append({"class": a.get("class") or "", "attrs": a, "rows": [], "head": []})
        elif tag == "tr" and self._stack:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None and self._stack:
            self._stack[-1]["rows"].append(self._row)
            self._row = None
        elif tag == "table" and self._stack:
            t = self._stack.pop()
            t["head"], t["rows"] = (t["rows"][0], t["rows"][1:]) if t["rows"] else ([], [])
            self.tables.append(t)

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse(path: Path) -> Tables:
    p = Tables()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def tables(parsed: Tables, cls: str) -> list[dict[str, Any]]:
    return [t for t in parsed.tables if cls in t["class"].split()]


GATE_HEAD = ["stage", "rule", "metric", "observed", "threshold", "status", "severity", "metric source"]
GOLDEN_A = [
    ["backtest", "sharpe", "sharpe", "5.25281", "≥ 0.3", "pass", "blocking", "request.returns"],
    ["backtest", "drawdown", "max_drawdown", "0.0499972", "≤ 0.25", "pass", "blocking", "request.returns"],
    ["backtest", "vol_band", "annual_volatility", "0.160204", "0.01 … 0.5", "pass", "blocking", "request.returns"],
    ["backtest", "trades", "n_trades", "-", "≥ 30", "fail", "soft", "-"],
    ["backtest", "history", "effective_history_years", "1.5873", "≥ 1", "pass", "blocking", "request.returns"],
    ["backtest", "tail", "cvar_95", "0.0185795", "≤ 0.01", "fail", "info", "request.returns"],
    ["paper", "sharpe", "sharpe", "10.7471", "≥ 0.3", "pass", "blocking", "risk_snapshot:p12"],
    ["paper", "drawdown", "max_drawdown", "0.001", "≤ 0.25", "pass", "blocking", "risk_snapshot:p12"],
    ["paper", "vol_band", "annual_volatility", "0.0234482", "0.01 … 0.5", "pass", "blocking", "risk_snapshot:p12"],
    ["paper", "tail", "cvar_95", "0.001", "≤ 0.01", "pass", "info", "risk_snapshot:p12"],
    ["live", "sharpe", "sharpe", "7.40443", "≥ 0.3", "pass", "blocking", "request.returns"],
    ["live", "drawdown", "max_drawdown", "0.0018", "≤ 0.25", "pass", "blocking", "request.returns"],
    ["live", "vol_band", "annual_volatility", "0.0229727", "0.01 … 0.5", "pass", "blocking", "request.returns"],
    ["live", "tail", "cvar_95", "0.0018", "≤ 0.01", "pass", "info", "request.returns"],
]


def test_gate_table_golden(world: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "a.html"
    ran = qmtl("world", "report", "rep", "--strategy", "a", "--out", str(out))
    assert ran.exit_code == 0, ran.stderr
    gates = tables(parse(out), "gates")
    assert len(gates) == 1 and gates[0]["attrs"]["data-strategy"] == "a"
    assert gates[0]["head"] == GATE_HEAD
    assert gates[0]["rows"] == GOLDEN_A


def test_gate_table_matches_the_store(world: dict[str, Any], tmp_path: Path) -> None:
    """Every strategy's gate rows are its runs' rule results, stage by stage (not only a's)."""
    from qmtl_core.report._assemble import fmt

    out = tmp_path / "all.html"
    assert qmtl("world", "report", "rep", "--out", str(out)).exit_code == 0
    parsed = parse(out)
    svc = make_service(world["store_url"], world["worlds"], world["home"])
    try:
        runs = svc.list_runs("rep")
    finally:
        svc.close()
    for table in tables(parsed, "gates"):
        sid = table["attrs"]["data-strategy"]
        latest: dict[str, Any] = {}
        for r in runs:
            if r.strategy_id == sid:
                latest.setdefault(r.stage, r)
        expected = [[stage, g["id"], g["metric"], fmt(g["observed"], 6), None, g["status"], g["severity"],
                     g.get("source") or "-"]
                    for stage in ("backtest", "paper", "live") if stage in latest for g in latest[stage].rule_results]
        got = [[row[0], row[1], row[2], row[3], None, row[5], row[6], row[7]] for row in table["rows"]]
        assert got == expected, sid
    assert sorted(t["attrs"]["data-strategy"] for t in tables(parsed, "gates")) == ["a", "b", "c"]


@pytest.mark.usefixtures("cli_mode")
def test_report_contents_and_json(world: dict[str, Any]) -> None:
    ran = qmtl("world", "report", "rep", "--json")
    assert ran.exit_code == 0, ran.stderr
    doc = ran.json()
    path = Path(doc["path"])
    assert path == world["home"] / "reports" / "rep.html" and path.exists()
    assert doc["format"] == "html" and doc["files"] == [str(path)]
    assert doc["strategies_total"] == 3 and sorted(doc["strategies_in_full"]) == ["a", "b", "c"]
    assert [p["evidence_hash"] for p in doc["pending_requests"]] == [world["evidence_b"]]
    by_id = {s["strategy_id"]: s for s in doc["strategies"]}
    assert by_id["a"]["stage"] == "live" and list(by_id["a"]["runs"]) == ["backtest", "paper", "live"]
    assert by_id["b"]["pending_requests"][0]["request_id"] == world["request_b"]
    assert [a["strategy_id"] for a in doc["activations"] if a["stage"] == "live"] == ["a"]
    kinds = [t["kind"] for t in doc["timeline"]]
    for kind in ("strategy.promoted", "promotion.requested", "promotion.approved", "promotion.applied",
                 "world.halted", "world.resumed"):
        assert kind in kinds, kind
    approvals = [(t["actor"], t["reason"]) for t in doc["timeline"] if t["kind"] == "promotion.approved"]
    assert ("alice", "drawdown within budget") in approvals and ("bob", "agreed") in approvals

    html = path.read_text(encoding="utf-8")
    parsed = parse(path)
    assert world["evidence_b"] in html  # the approver sees exactly what they approve
    assert html.count('data-chart="tearsheet"') == 3
    assert all(cls in html for cls in ("kind-promotion-approved", "kind-world-halted", "kind-promotion-applied"))
    monthly = tables(parsed, "monthly")
    assert len(monthly) == 3 and {row[0] for t in monthly for row in t["rows"]} >= {"backtest", "paper", "live"}
    summary = tables(parsed, "summary")[0]
    assert [row[0] for row in summary["rows"]] == ["b", "a", "c"]  # ranked by sharpe, best first
    activations = tables(parsed, "activations")[0]["rows"]
    assert [r[:3] for r in activations] == [["a", "live", "0.5"], ["b", "paper", "0"]]
    assert "approved by alice (drawdown within budget), bob (agreed)" in activations[0][5]


def test_page_references_nothing_outside_itself(world: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    assert qmtl("world", "report", "rep", "--out", str(out)).exit_code == 0
    parsed = parse(out)
    html = out.read_text(encoding="utf-8")
    for tag, attr, value in parsed.attrs:
        if attr in ("src", "href", "xlink:href", "action", "srcset", "poster", "data"):
            assert value is not None and value.startswith("#"), (tag, attr, value)
        assert not (attr.startswith("xmlns") and value), (tag, attr, value)  # no namespace URLs either
    assert not re.search(r"<(link|iframe|object|embed|img|base)\b", html)
    assert "@import" not in html and "@font-face" not in html
    assert re.findall(r"url\((?!#)", html) == []
    assert re.findall(r"https?://", html) == []


@pytest.mark.usefixtures("cli_mode")
def test_strategy_filter(world: dict[str, Any]) -> None:
    ran = qmtl("world", "report", "rep", "--strategy", "b", "--json")
    assert ran.exit_code == 0, ran.stderr
    doc = ran.json()
    path = Path(doc["path"])
    assert path == world["home"] / "reports" / "rep" / "b.html"
    assert [s["strategy_id"] for s in doc["strategies"]] == ["b"] and doc["strategy"] == "b"
    parsed = parse(path)
    assert [t["attrs"]["data-strategy"] for t in tables(parsed, "gates")] == ["b"]
    assert [row[0] for row in tables(parsed, "summary")[0]["rows"]] == ["b"]
    assert all(t["strategy_id"] in (None, "b") for t in doc["timeline"])
    missing = qmtl("world", "report", "rep", "--strategy", "zz")
    assert missing.exit_code == 3 and "zz" in missing.stderr


@pytest.mark.usefixtures("cli_mode")
def test_at_reports_the_past(world: dict[str, Any]) -> None:
    at = (world["live_at"] + timedelta(hours=1)).isoformat()
    ran = qmtl("world", "report", "rep", "--at", at, "--json")
    assert ran.exit_code == 0, ran.stderr
    doc = ran.json()
    assert doc["at"].startswith(at[:16])
    by_id = {s["strategy_id"]: s for s in doc["strategies"]}
    assert by_id["a"]["stage"] == "live" and list(by_id["a"]["runs"]) == ["backtest", "paper"]  # no live run yet
    assert by_id["a"]["next_action"] is None and by_id["a"]["progress"][1]["stage"] == "paper"
    # then, the loop's first request for b was pending (voided later by new evidence), not today's
    [then] = doc["pending_requests"]
    assert then["strategy_id"] == "b" and then["request_id"] != world["request_b"]
    assert then["evidence_hash"] != world["evidence_b"]
    kinds = [t["kind"] for t in doc["timeline"]]
    assert "promotion.applied" in kinds and kinds.index("world.resumed") < kinds.index("promotion.applied")
    assert doc["notes"]
    html = Path(doc["path"]).read_text(encoding="utf-8")
    assert "as of" in html

    before = qmtl("world", "report", "rep", "--at", "2020-01-01T00:00Z", "--json")
    assert before.exit_code == 0 and before.json()["strategies_total"] == 0 and before.json()["path"] is None
    bad = qmtl("world", "report", "rep", "--at", "yesterday")
    assert bad.exit_code == 2 and "--at" in bad.stderr


@pytest.mark.usefixtures("cli_mode")
def test_png_format(world: dict[str, Any], tmp_path: Path) -> None:
    target = tmp_path / "charts"
    ran = qmtl("world", "report", "rep", "--format", "png", "--out", str(target), "--json")
    assert ran.exit_code == 0, ran.stderr
    files = [Path(f) for f in ran.json()["files"]]
    # a (paper, live) and b (paper) also get their later stages zoomed; c (backtest only) does not
    assert sorted(f.name for f in files) == ["a-monthly.png", "a-stages.png", "a.png", "b-monthly.png",
                                            "b-stages.png", "b.png", "c-monthly.png", "c.png"]
    for f in files:
        assert f.parent == target and f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5_000
    default = qmtl("world", "report", "rep", "--format", "png", "--strategy", "a")
    assert default.exit_code == 0, default.stderr
    assert (world["home"] / "reports" / "rep" / "a-charts" / "a.png").exists()
    assert "wrote 3 PNG files" in default.stdout
    wrong = qmtl("world", "report", "rep", "--format", "png", "--out", str(tmp_path / "x.html"))
    assert wrong.exit_code == 2 and "directory" in wrong.stderr
    unknown = qmtl("world", "report", "rep", "--format", "pdf")
    assert unknown.exit_code == 2 and "html or png" in unknown.stderr


@pytest.mark.usefixtures("cli_mode")
def test_world_without_strategies_and_unknown_world(qmtl_env: dict[str, str], tmp_path: Path) -> None:
    empty = qmtl("world", "report", "research-sandbox")
    assert empty.exit_code == 0 and "no strategies yet" in empty.stdout
    assert not (tmp_path / "home" / "reports").exists()
    doc = qmtl("world", "report", "research-sandbox", "--json").json()
    assert doc["path"] is None and doc["strategies_total"] == 0 and doc["files"] == []
    unknown = qmtl("world", "report", "no-such-world")
    assert unknown.exit_code == 3 and "no-such-world" in unknown.stderr
    assert qmtl("world", "report", "no-such-world", "--json").json()["exit_code"] == 3


def test_promote_list_names_each_pending_requests_report(world: dict[str, Any]) -> None:
    listed = qmtl("promote", "--list", "--json").json()["requests"]
    [req] = listed
    path = world["home"] / "reports" / "rep" / "b.html"
    assert req["report"] == {"path": str(path), "state": "not written", "command": "qmtl world report rep --strategy b"}
    human = qmtl("promote", "--list")
    assert f"report {world['request_b']}: {path} [not written] (write it: qmtl world report rep --strategy b)" \
        in human.stdout
    assert qmtl("world", "report", "rep", "--strategy", "b").exit_code == 0
    assert qmtl("promote", "--list", "--json").json()["requests"][0]["report"]["state"] == "current"
    path.write_text(path.read_text().replace(world["evidence_b"], "0" * 64))  # a report of older evidence
    assert f"[stale] (write it: qmtl world report rep --strategy b)" in qmtl("promote", "--list").stdout


def test_report_help_stays_light() -> None:
    code = ("import sys; from qmtl_cli.app import main\n"
            "sys.argv=['qmtl','world','report','--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "sys.stderr.write(repr([m for m in ('numpy','matplotlib','jinja2','sqlalchemy') if m in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--format" in proc.stdout and proc.stderr.strip() == "[]"


# --- what is shown in full in a big world --------------------------------------------------------------
def test_big_world_shows_top_bottom_live_and_pending_in_full() -> None:
    from qmtl_core.report._assemble import StageRun, StrategyReport, _choose_full

    def strategy(i: int, stage: str = "backtest", pending: bool = False) -> StrategyReport:
        run = StageRun("backtest", "r", 1, "pass", 1, "t", {"sharpe": float(i)}, [], {}, [])
        s = StrategyReport(f"s{i:02d}", stage, {"backtest": run}, [], None, None,
                           [{"request_id": "x"}] if pending else [], [])
        s.rank_value = float(i)
        return s

    many = [strategy(i) for i in range(30)] + [strategy(12, "live"), strategy(13, pending=True)]
    many[12] = strategy(40 + 12)  # renumber so ids stay unique
    many[13] = strategy(40 + 13)
    _choose_full(many, top=3, order="desc", only=None)
    full = {s.strategy_id: s.section for s in many if s.full}
    assert full == {"s53": "top", "s52": "top", "s29": "top", "s00": "bottom", "s01": "bottom", "s02": "bottom",
                    "s12": "live", "s13": "pending"}


# --- the series behind the charts ----------------------------------------------------------------------
def test_series_match_pandas() -> None:
    import pandas as pd

    from qmtl_core.report._series import chain, equity, monthly_returns, rolling_sharpe, underwater

    rng = np.random.default_rng(1)
    stamps = pd.date_range("2023-01-02", periods=400, freq="D", tz="UTC")
    r = rng.normal(0.0005, 0.01, 400)
    ours = rolling_sharpe(r, 63, 252)
    rolled = pd.Series(r).rolling(63)
    theirs = (rolled.mean() / rolled.std(ddof=1) * np.sqrt(252)).to_numpy()
    assert np.allclose(ours, theirs, equal_nan=True, atol=1e-9)
    wealth = equity(r)
    assert np.allclose(wealth, np.cumprod(1 + r))
    dd = underwater(wealth)
    peak = np.maximum.accumulate(np.concatenate(([1.0], wealth)))[1:]
    assert np.allclose(dd, wealth / peak - 1) and dd.max() <= 0
    chained = chain({"backtest": [[t.isoformat(), x] for t, x in zip(stamps[:300], r[:300])],
                     "paper": [[t.isoformat(), x] for t, x in zip(stamps[300:], r[300:])]})
    assert chained.stages == ("backtest", "paper") and chained.bounds == (0, 300, 400)
    rows = monthly_returns(chained)
    series = pd.Series(r, index=stamps)
    expected = (1 + series).groupby([series.index.year, series.index.month]).prod() - 1
    got = {}
    for row in rows:
        for m, v in enumerate(row["months"], start=1):
            if v is not None:
                got.setdefault((row["year"], m), []).append(v)
    # a month split between stages shows in both rows; compounded together they give the month
    for (year, month), value in expected.items():
        assert np.isclose(np.prod([1 + v for v in got[(year, month)]]) - 1, value)
    assert [(row["stage"], row["year"]) for row in rows] == [("backtest", 2023), ("paper", 2023), ("paper", 2024)]


def test_rolling_sharpe_short_and_flat() -> None:
    from qmtl_core.report._series import rolling_sharpe

    assert np.isnan(rolling_sharpe(np.full(10, 0.01), 63)).all()
    flat = rolling_sharpe(np.zeros(100), 63)
    assert np.isnan(flat).all()


def test_svg_is_cleaned_for_inlining() -> None:
    from qmtl_core.report._charts import clean_svg

    raw = ('<?xml version="1.0"?>\n<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "http://www.w3.org/x.dtd">\n'
           '<svg xmlns:xlink="http://www.w3.org/1999/xlink" width="10" xmlns="http://www.w3.org/2000/svg">'
           '<metadata><rdf:RDF xmlns:cc="http://creativecommons.org/ns#"/></metadata>'
           '<defs><clipPath id="p1"/></defs><g clip-path="url(#p1)"><use xlink:href="#m2"/></g></svg>')
    out = clean_svg(raw, "s0")
    assert out == '<svg width="10"><defs><clipPath id="s0-p1"/></defs><g clip-path="url(#s0-p1)"><use href="#s0-m2"/></g></svg>'
    assert "http" not in out


def test_json_document_is_serialisable(world: dict[str, Any]) -> None:
    from qmtl_core.report._collect import collect

    svc = make_service(world["store_url"], world["worlds"], world["home"])
    try:
        report = collect(svc, "rep")
    finally:
        svc.close()
    doc = json.loads(json.dumps(report.to_dict()))
    assert doc["rank_metric"] == "sharpe" and doc["policy"]["mode"] == "manual_approval"
    a = next(s for s in report.strategies if s.strategy_id == "a")
    assert a.to_dict(returns=True)["runs"]["live"]["returns"][0][1] == pytest.approx(-0.0018)


def test_untrusted_text_is_escaped() -> None:
    from qmtl_core.report._render import _environment

    html = _environment().get_template("_entry.html.j2").render(t={
        "kind": "promotion.approved", "ts": "2026-03-02T12:00:00Z", "seq": 1, "strategy_id": "a<i>",
        "actor": "mallory", "reason": "<script>alert(1)</script>", "codes": ["<x>"], "extra": ""})
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "a&lt;i&gt;" in html


def test_many_activations_fold_away_live_first() -> None:
    from qmtl_core.report._assemble import Report, StrategyReport
    from qmtl_core.report._render import ACTIVATION_LIMIT, render_html

    n = ACTIVATION_LIMIT + 5
    acts = [{"strategy_id": f"p{i:02d}", "stage": "paper", "weight": 0.0, "run_id": None, "etag": "e",
             "activated_at": "2026-03-02T12:00:00Z", "why": None} for i in range(n - 1)]
    acts.append({"strategy_id": "z-live", "stage": "live", "weight": 0.5, "run_id": "r", "etag": "e",
                 "activated_at": "2026-03-02T12:00:00Z", "why": None})
    strategies = [StrategyReport(a["strategy_id"], a["stage"], {}, [], None, a, [], []) for a in acts]
    strategies[-1].full, strategies[-1].section = True, "live"
    report = Report(world="w", generated_at="2026-03-02T12:00:00.000000Z", at=None,
                    policy={"policy_version": 1, "allow_live": True, "mode": "auto_apply", "approvers": [],
                            "required_approvals": 1, "max_live_slots": 1, "periods_per_year": 252,
                            "description": None},
                    rank_metric="sharpe", rank_order="desc", strategies=strategies, activations=acts, set_version=3,
                    halted=True, timeline=[], pending=[], top=10)
    html = render_html(report)
    parsed = Tables()
    parsed.feed(html)
    first, rest = tables(parsed, "activations")
    assert first["rows"][0][:2] == ["z-live", "live"] and len(first["rows"]) == ACTIVATION_LIMIT
    assert len(rest["rows"]) == 5 and "<details><summary>5 more" in html and "HALTED" in html
    assert "no stored returns to chart" in html  # a strategy with no runs still renders
    assert '<a href="#s-z-live">z-live</a>' in html and '<a href="#s-p00">' not in html  # links only to sections


@pytest.mark.parametrize("name", ["../escape.png", "/tmp/abs.png", ".hidden.png", "sub/dir.png"])
def test_report_files_from_a_server_stay_in_the_target_directory(tmp_path: Path, name: str) -> None:
    import base64

    from qmtl_core.errors import BadInputError
    from qmtl_core.report._document import save_report

    doc = {"format": "png", "png": {name: base64.b64encode(b"\x89PNG").decode()}}
    with pytest.raises(BadInputError):
        save_report(doc, tmp_path / "charts")
    assert not list(tmp_path.rglob("*.png"))
