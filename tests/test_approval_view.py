"""The approval view (issue 18, items 8-10): what an approver reads before signing, in the terminal
(``qmtl promote --show``) and as JSON, locally and through the HTTP API, on both backends."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest

from qmtl_core.approval_view import checklist, correlation, min_track_record_length
from tests._service import Clock, make_service
from tests.cli_helpers import qmtl
from tests.test_governance import Setup, policy_text


def test_min_track_record_length_follows_bailey_lopez_de_prado() -> None:
    # eq. 11 with normal returns (skew 0, kurtosis 3): 1 + (1 + SR²/2)·(z/SR)²
    z = 1.6448536269514722
    assert min_track_record_length(0.1, 0.0, 0.0) == pytest.approx(1 + (1 + 0.01 / 2) * (z / 0.1) ** 2)
    # negative skew and fat tails need a longer record for the same Sharpe
    assert min_track_record_length(0.1, -1.0, 6.0) > min_track_record_length(0.1, 0.0, 0.0)  # type: ignore[operator]
    assert min_track_record_length(0.0, 0.0, 0.0) is None and min_track_record_length(-0.1, 0.0, 0.0) is None
    assert min_track_record_length(math.nan, 0.0, 0.0) is None


def test_checklist_marks_each_condition_and_never_hides_an_unknown_block() -> None:
    rows = checklist([{"code": "risk_snapshot_lagging", "detail": "lags 2h"}, {"code": "approval_required",
                                                                              "detail": "0 of 2"},
                      {"code": "some_new_gate", "detail": "from a newer qmtl"}])
    failing = {r["condition"]: r["detail"] for r in rows if not r["ok"]}
    assert failing == {"a fresh risk snapshot covers the strategy": "lags 2h",
                       "the required approvals are in": "0 of 2", "some_new_gate": "from a newer qmtl"}
    assert sum(r["ok"] for r in rows) == 9


def test_correlation_on_common_timestamps() -> None:
    a = [("t1", 0.01), ("t2", -0.02), ("t3", 0.03), ("t4", 0.0)]
    b = [("t2", -0.04), ("t3", 0.06), ("t4", 0.0), ("t5", 9.0), ("t1", 0.02)]
    assert correlation(a, b) == (pytest.approx(1.0), 4)
    assert correlation(a, [("t1", 1.0)]) == (None, 1)


@pytest.fixture
def pending(qmtl_env: dict[str, str], worlds_dir: Path, tmp_path: Path) -> str:
    (worlds_dir / "gov.yaml").write_text(policy_text())
    svc = make_service(qmtl_env["QMTL_DATABASE_URL"], worlds_dir, tmp_path / "h", Clock())
    Setup(svc).ready("a")
    request_id = svc.as_actor("carol").promote("gov", "a", reason="paper is clean").request_id
    svc.close()
    assert request_id is not None
    return request_id


@pytest.mark.usefixtures("cli_mode")
def test_promote_show_opens_the_request_as_an_approver_reads_it(pending: str) -> None:
    doc = qmtl("promote", "--show", pending[3:9], "--json")
    assert doc.exit_code == 0, doc.stderr
    view: dict[str, Any] = doc.json()
    assert view["request"]["request_id"] == pending and view["request"]["requester"] == "carol"
    rows = {r["condition"]: r for r in view["checklist"]}
    assert not rows["the required approvals are in"]["ok"] and rows["the strategy is in paper"]["ok"]
    assert view["stages"] == ["backtest", "paper"]
    sharpe = next(r for r in view["side_by_side"] if r["metric"] == "sharpe")
    assert set(sharpe["values"]) == {"backtest", "paper"}
    assert any(c.startswith("paper: annualised figures extrapolate") for c in view["caveats"])
    assert view["small_sample"]["n_observations"] == 12 and view["small_sample"]["min_track_record_length"]
    assert view["risk"]["weight"] == 1.0 and view["risk"]["snapshot"]["version"] == "p12"
    assert re.fullmatch(r"[0-9a-f]{64}", view["evidence"]["request"]) and view["evidence"]["unchanged"]

    human = qmtl("promote", "--show", pending)
    assert human.exit_code == 0, human.stderr
    text = human.stdout
    order = [text.index(s) for s in ("live gate", "stages side by side", "small sample", "risk evidence",
                                     f"evidence {view['evidence']['request']}")]
    assert order == sorted(order)  # in the order an approver needs it
    assert "✗ the required approvals are in" in text and "✓ the world is not halted" in text
    # no "-0.0" cells (a random request id such as pr-0c2f... is not one)
    assert not re.search(r"(?<!\w)-0(\.0+)?%?(?![\w.])", text)
    assert "Bailey & López de Prado" in text
    total = next(ln for ln in text.splitlines() if ln.startswith("total return"))
    assert total.count("%") == 2  # one unit for every stage
    assert qmtl("promote", "--show", "pr-ffffffffffff").exit_code == 3


@pytest.mark.usefixtures("cli_mode")
def test_later_stages_zoomed_and_distributions_match_numpy(pending: str, qmtl_env: dict[str, str],
                                                           worlds_dir: Path, tmp_path: Path) -> None:
    import numpy as np

    from qmtl_core.report._collect import collect
    from qmtl_core.report._render import render_html

    svc = make_service(qmtl_env["QMTL_DATABASE_URL"], worlds_dir, tmp_path / "h4", Clock())
    try:
        stored = {r["stage"]: np.array([p[1] for p in r["returns"]])
                  for r in svc.run_returns("gov", strategy_id="a", latest_per_stage=True)}
        page = render_html(collect(svc, "gov"))
    finally:
        svc.close()
    view = qmtl("promote", "--show", pending, "--json").json()["comparison"]
    paper, back = stored["paper"], stored["backtest"]
    (zoom,) = view["zoomed"]
    assert (zoom["stage"], zoom["n"], zoom["backtest_tail_n"]) == ("paper", paper.size, paper.size)
    assert zoom["equity"] == pytest.approx(np.cumprod(1 + paper).tolist())
    assert zoom["backtest_tail_total_return"] == pytest.approx(np.prod(1 + back[-paper.size:]) - 1)
    for stage, r in (("backtest", back), ("paper", paper)):
        d = view["distributions"][stage]
        assert d["n"] == r.size and d["quantiles"]["5%"] == pytest.approx(np.quantile(r, 0.05))
        assert d["quantiles"]["50%"] == pytest.approx(np.median(r))
    human = qmtl("promote", "--show", pending).stdout
    assert "later stages zoomed" in human and f"paper   {paper.size:>4} obs" in human
    assert "return distributions" in human and human.index("later stages zoomed") < human.index("risk evidence")
    # the report's approval view carries the same chart, with ids of its own
    approval = page[page.index(f'id="approve-{pending}"'):page.index('id="strategies"')]
    assert 'data-chart="approval-stages"' in approval and f"paper ({paper.size} obs)" in approval
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))


def test_report_opens_the_pending_request_first_with_one_unit_and_no_negative_zero(
        pending: str, qmtl_env: dict[str, str], worlds_dir: Path, tmp_path: Path) -> None:
    from qmtl_core.report._collect import collect
    from qmtl_core.report._render import _pct, render_html

    assert _pct(-1e-6) == "0.0%" and _pct(-0.0) == "0.0%" and _pct(-0.0012) == "-0.1%"
    svc = make_service(qmtl_env["QMTL_DATABASE_URL"], worlds_dir, tmp_path / "h2", Clock())
    try:
        report = collect(svc, "gov")
    finally:
        svc.close()
    view = report.approvals[pending]
    assert view["request"]["request_id"] == pending and not view["allowed_now"]
    page = render_html(report)
    assert page.index(f'id="approve-{pending}"') < page.index('id="strategies"')
    assert view["evidence"]["request"] in page and "✗ the required approvals are in" in page
    metrics_rows = re.findall(r"<tr><td>total_return</td>(.*?)</tr>", page)
    assert metrics_rows and all(cell.endswith("%") for row in metrics_rows
                                for cell in re.findall(r'<td class="num">([^<]*)</td>', row))
    assert not re.search(r">-0(\.0+)?%?<", page)


@pytest.mark.usefixtures("cli_mode")
def test_a_policy_changed_since_the_request_shows_as_a_diff(pending: str, qmtl_env: dict[str, str],
                                                            worlds_dir: Path, tmp_path: Path) -> None:
    """The approver sees what changed between the recorded versions, not just that something did."""
    from qmtl_core.report._collect import collect
    from qmtl_core.report._render import render_html

    (worlds_dir / "gov.yaml").write_text(policy_text(version=2, cooldown="48h", slots=1))
    svc = make_service(qmtl_env["QMTL_DATABASE_URL"], worlds_dir, tmp_path / "h3", Clock())
    try:
        assert svc.as_actor("cron").load_world("gov").proposal is not None  # a governed change
        for approver in ("alice", "bob"):
            svc.as_actor(approver).approve_policy("gov", version=2, reason="slower cadence")
        report = collect(svc, "gov")
    finally:
        svc.close()
    doc = qmtl("promote", "--show", pending, "--json")
    assert doc.exit_code == 0, doc.stderr
    pol = doc.json()["policy"]
    assert pol["changed"] and (pol["version_at_request"], pol["version_now"]) == (1, 2)
    diff = pol["diff"].splitlines()
    assert diff[:2] == ["--- gov v1", "+++ gov v2"]
    assert "-policy_version: 1" in diff and "+policy_version: 2" in diff
    assert "-    cooldown: 24h" in diff and "+    cooldown: 48h" in diff and "+    max_live_slots: 1" in diff
    assert not any(line.startswith(("+", "-")) and "sharpe" in line for line in diff)  # only what changed
    human = qmtl("promote", "--show", pending).stdout
    assert "policy changed since the request opened: version 1 -> 2" in human
    assert "+    cooldown: 48h" in human and "-    cooldown: 24h" in human
    page = render_html(report)
    assert '<span class="add">+    cooldown: 48h</span>' in page and '<span class="del">-    cooldown: 24h</span>' in page
