"""A backtest whose equity reaches zero is a liquidation, and ``--param`` is typed by the defaults.

A short that loses more than the account used to produce returns below -1 that the metrics refuse,
so ``submit`` blamed the user's returns and left a registered strategy with no run behind. Now the
account is liquidated at that close (return -1, trading stops), the run is recorded and gated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import sqlalchemy as sa

from qmtl_core.errors import UsageError
from qmtl_core.sdk import Bars, Node, StreamInput, Strategy, TradeOrderPublisherNode, View, run_backtest
from qmtl_core.store import open_store, schema
from qmtl_core.submit import parse_params
from tests.cli_helpers import qmtl

OPENS = [100.0, 100.0, 150.0, 400.0, 400.0, 410.0]
CLOSES = [100.0, 120.0, 300.0, 400.0, 410.0, 420.0]


def _bars() -> Bars:
    return Bars.from_columns({
        "timestamp": np.array([f"2024-01-0{i + 1}" for i in range(6)], dtype="datetime64[ns]"),
        "open": OPENS, "close": CLOSES, "high": [max(o, c) + 1 for o, c in zip(OPENS, CLOSES)],
        "low": [min(o, c) - 1 for o, c in zip(OPENS, CLOSES)], "volume": [1000.0] * 6})


class ShortAll(Strategy):
    """Shorts the whole account once, on the first bar (close 100), and holds."""

    defaults: ClassVar[dict[str, Any]] = {"target": -1.0}

    def setup(self) -> None:
        self.price = StreamInput(name="price", interval="1d")
        sig = Node(self.price, self.signal, name="sig", period=1)
        self.add_nodes(self.price, sig, TradeOrderPublisherNode(sig))

    def signal(self, view: View) -> Any:
        return self.params["target"] if float(view[self.price].close[-1]) == 100.0 else None


def test_equity_reaching_zero_is_a_liquidation() -> None:
    res = run_backtest(ShortAll(), _bars())
    # short 0.01 units at 100 with cash 1 -> cash 2; close 120: equity 0.8; close 300: 2 - 3 < 0.
    assert res.returns.tolist() == pytest.approx([0.0, -0.2, -1.0])
    assert res.equity[-1] == 0.0 and len(res.timestamps) == 3
    assert res.extra["liquidated_at"].startswith("2024-01-03T00:00:00")
    assert res.to_dict()["liquidated_at"] == res.extra["liquidated_at"]
    assert [f.bar for f in res.fills] == [1]  # trading stopped: no fill after the liquidation
    from qmtl_core.metrics import compute_metrics

    m = compute_metrics(res.returns)
    assert m["total_return"] == -1.0 and m["max_drawdown"] == 1.0


def test_an_account_that_survives_is_not_liquidated() -> None:
    res = run_backtest(ShortAll(target=-0.1), _bars())
    assert "liquidated_at" not in res.extra and len(res.returns) == 6
    assert res.returns.min() > -1.0


def _write_case(tmp_path: Path) -> tuple[Path, Path]:
    strategy = tmp_path / "short_all.py"
    strategy.write_text(
        "from typing import Any, ClassVar\n"
        "from qmtl_core.sdk import Node, StreamInput, Strategy, TradeOrderPublisherNode\n\n\n"
        "class ShortAll(Strategy):\n"
        "    defaults: ClassVar[dict[str, Any]] = {'target': -1.0, 'allow_short': True, 'fast': 5}\n\n"
        "    def setup(self) -> None:\n"
        "        self.price = StreamInput(name='price', interval='1d')\n"
        "        sig = Node(self.price, self.signal, name='sig', period=1)\n"
        "        self.add_nodes(self.price, sig, TradeOrderPublisherNode(sig))\n\n"
        "    def signal(self, view: Any) -> Any:\n"
        "        return self.params['target'] if self.params['allow_short'] else 0.0\n")
    rows = ["timestamp,open,high,low,close,volume"]
    for i in range(60):  # the price quadruples from day 10 on
        price = 100.0 if i < 10 else 400.0
        rows.append(f"2024-{1 + i // 28:02d}-{1 + i % 28:02d},{price},{price + 1},{price - 1},{price},1000")
    bars = tmp_path / "bars.csv"
    bars.write_text("\n".join(rows) + "\n")
    return strategy, bars


def _count(url: str, table: sa.Table) -> int:
    store = open_store(url)
    try:
        with store.read() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() or 0)
    finally:
        store.dispose()


@pytest.mark.usefixtures("cli_mode")
def test_submit_records_and_gates_a_liquidated_run(tmp_path: Path, qmtl_env: dict[str, str], store_url: str) -> None:
    strategy, bars = _write_case(tmp_path)
    ran = qmtl("submit", str(strategy), "--world", "research-sandbox", "--data", str(bars), "--json")
    assert ran.exit_code == 10, ran.stderr  # recorded and gated: a blocking rule fails
    doc = ran.json()
    assert doc["status"] == "rejected" and doc["run"]["status"] == "fail"
    assert doc["run"]["metrics"]["total_return"] == -1.0 and doc["run"]["metrics"]["max_drawdown"] == 1.0
    assert doc["backtest"]["liquidated_at"].startswith("2024-01-11")
    assert _count(store_url, schema.evaluation_runs) == 1
    again = qmtl("submit", str(strategy), "--world", "research-sandbox", "--data", str(bars), "--json")
    assert again.exit_code == 10 and again.json()["strategy_id"] == doc["strategy_id"]
    assert _count(store_url, schema.run_revisions) == 1  # idempotent: no new revision


BAD_PARAMS = [
    ("allow_short=maybe", "--param allow_short=maybe: allow_short takes true or false"),
    ("fast=abc", "--param fast=abc: fast takes an integer"),
    ("fast=1_0", "fast takes an integer"),
    ("target=1_0", "target takes a finite number"),
    ("target=nan", "target takes a finite number"),
    ("fsat=3", "has no parameter 'fsat' (did you mean 'fast'?)"),
]


@pytest.mark.usefixtures("cli_mode")
def test_submit_param_typed_by_defaults(tmp_path: Path, qmtl_env: dict[str, str], store_url: str) -> None:
    strategy, bars = _write_case(tmp_path)
    for param, fragment in BAD_PARAMS:
        ran = qmtl("submit", str(strategy), "--world", "research-sandbox", "--data", str(bars), "--param", param)
        assert ran.exit_code == 2 and fragment in ran.stderr, (param, ran.stderr)
        assert "fix the strategy code" not in ran.stderr and "Traceback" not in ran.stderr
    assert _count(store_url, schema.strategies) == 0 and _count(store_url, schema.ledger) == 0
    # A valid typed value is the same strategy as its default spelled another way.
    one = qmtl("submit", str(strategy), "--world", "research-sandbox", "--data", str(bars), "--json",
               "--param", "target=-1", "--param", "allow_short=TRUE")
    two = qmtl("submit", str(strategy), "--world", "research-sandbox", "--data", str(bars), "--json")
    assert one.json()["strategy_id"] == two.json()["strategy_id"]


def test_param_types() -> None:
    defaults = {"flag": True, "n": 5, "x": 0.5, "name": "a", "items": [1], "opt": None}
    assert parse_params(["flag=FALSE", "n=+7", "x=2", "name=1_0", "items=[2, 3]", "opt=[1]"], defaults) == {
        "flag": False, "n": 7, "x": 2.0, "name": "1_0", "items": [2, 3], "opt": [1]}
    assert isinstance(parse_params(["x=2"], defaults)["x"], float)  # the same id as x=2.0
    for item in ("flag=1", "n=5.0", "n=0x5", "x=1,5", "items={}"):
        with pytest.raises(UsageError):
            parse_params([item], defaults)
    with pytest.raises(UsageError, match="given twice"):
        parse_params(["n=1", "n=2"], defaults)
