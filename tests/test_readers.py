"""One grammar for every reader (``qmtl_core.grammar``): numbers, timestamps, JSON, encodings.

Each reader (returns, metrics CSV/JSON, bars, risk snapshots, HTTP documents, time options) is
fed the same spellings; the ones that do not mean what they look like are refused with exit 2,
naming the cell or option, and nothing is recorded.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from qmtl_core import grammar
from qmtl_core.datafiles import read_metrics, read_returns
from qmtl_core.errors import BadInputError, DataFileError
from qmtl_core.grammar import GrammarError, loads_json, parse_number, parse_timestamp
from qmtl_core.risk import SnapshotError, load_snapshot_text, parse_snapshot
from qmtl_core.sdk import load_bars
from qmtl_core.service._client import returns_from_doc, table_from_doc
from qmtl_core.store import open_store, schema
from qmtl_core.timeutil import parse_instant
from tests.cli_helpers import qmtl

BOM = "\ufeff"
#: Spellings Python's float() or YAML 1.1 would read as a number, which the grammar refuses.
NOT_NUMBERS = ["1_0", "1_00", "1,0", "1.2%", "0x10", "1e", "--1", "1.2.3", "١٢", "½", " 1 2", "inf",
               "-Infinity", "1e999", "+", ".", "e5", "0b1"]
NUMBERS = [("0", 0.0), ("-0.0125", -0.0125), ("+5", 5.0), (".5", 0.5), ("5.", 5.0), ("1.5e-3", 0.0015),
           ("1E+2", 100.0), ("  0.25 ", 0.25), ("007", 7.0)]
#: Calendar edges that overflow once converted to UTC, and impossible dates.
BAD_TIMES = ["0001-01-01T00:00:00+01:00", "9999-12-31T23:30:00-01:00", "2026-02-30", "2026-13-01",
             "2026-01-01T24:00Z", "20260101", "2026-W05", "2026-01-01T00:00:00+05", "1e9", "",
             "2026-01-01T00:00:00.1234567Z"]


# --- the grammar itself -------------------------------------------------------------------------
@pytest.mark.parametrize("text", NOT_NUMBERS)
def test_number_grammar_refuses(text: str) -> None:
    with pytest.raises(GrammarError):
        parse_number(text)


@pytest.mark.parametrize(("text", "value"), NUMBERS)
def test_number_grammar_reads(text: str, value: float) -> None:
    assert parse_number(text) == value


@pytest.mark.parametrize("text", ["", "NaN", "na", "NULL", "None", None])
def test_missing_words_are_not_measured_only_where_allowed(text: str | None) -> None:
    assert math.isnan(parse_number(text))
    with pytest.raises(GrammarError):
        parse_number(text, missing_ok=False)


def test_json_numbers_and_bools() -> None:
    assert parse_number(3) == 3.0 and parse_number(-0.5) == -0.5
    for bad in (True, float("inf"), 10**400):
        with pytest.raises(GrammarError):
            parse_number(bad)


@pytest.mark.parametrize("text", BAD_TIMES)
def test_timestamp_grammar_refuses(text: str) -> None:
    with pytest.raises(GrammarError):
        parse_timestamp(text, naive_utc=True)


def test_timestamp_grammar_reads() -> None:
    utc = timezone.utc
    assert parse_timestamp("2026-01-31") == datetime(2026, 1, 31, tzinfo=utc)
    assert parse_timestamp("2026-01-31T16:00:00+05:30") == datetime(2026, 1, 31, 10, 30, tzinfo=utc)
    assert parse_timestamp("2026-01-31 16:00z") == datetime(2026, 1, 31, 16, tzinfo=utc)
    assert parse_timestamp("0001-01-01T00:00:00-01:00") == datetime(1, 1, 1, 1, tzinfo=utc)
    assert parse_timestamp("2026-01-31T16:00", naive_utc=True) == datetime(2026, 1, 31, 16, tzinfo=utc)
    with pytest.raises(GrammarError, match="no time zone"):
        parse_timestamp("2026-01-31T16:00")


def test_json_duplicate_keys_nan_and_bom() -> None:
    assert loads_json(BOM + '{"a": {"b": 1}}') == {"a": {"b": 1}}
    for text, fragment in [('{"a": 1, "a": 2}', "'a' appears twice"),
                           ('{"x": {"b": 1, "b": 1}}', "'b' appears twice"),
                           ('[NaN]', "NaN is not valid JSON"), ('{"a": -Infinity}', "-Infinity"),
                           ('{"a": 1', "not valid JSON"), ("1" * 5000, "not valid JSON")]:
        with pytest.raises(GrammarError, match=fragment.replace("(", r"\(")):
            loads_json(text)


def test_bom_is_dropped_once_and_other_encodings_refused() -> None:
    assert grammar.decode_text((BOM + "x").encode()) == "x"
    with pytest.raises(UnicodeDecodeError):
        grammar.decode_text("é".encode("latin-1"))


# --- every reader uses it -----------------------------------------------------------------------
def _w(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


@pytest.mark.parametrize("cell", ["1_0", "1_00", "0x1", "1e999"])
def test_returns_cell_refused_by_the_grammar(tmp_path: Path, cell: str) -> None:
    for name, text, where in [("w.csv", f"timestamp,a\n2026-01-01,0.01\n2026-01-02,{cell}\n", "w.csv:3:a"),
                              ("l.csv", f"strategy,timestamp,return\na,2026-01-01,{cell}\n", "l.csv:2:return")]:
        with pytest.raises(DataFileError) as caught:
            read_returns(_w(tmp_path, name, text))
        assert where in caught.value.one_line() and caught.value.exit_code == 2


def test_metrics_cells_refused_by_the_grammar(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match=r"m.csv:2:sharpe: '1_0' is not a number"):
        read_metrics(_w(tmp_path, "m.csv", "strategy,sharpe\na,1_0\n"))
    with pytest.raises(DataFileError, match="'1_0' is not a number"):
        read_metrics(_w(tmp_path, "m.json", '{"a": {"sharpe": "1_0"}}'))


@pytest.mark.parametrize("text", [
    '{"a": {"sharpe": 1.0}, "a": {"sharpe": 9.0}}',
    '{"strategies": {"a": {"sharpe": 1.0}, "a": {"sharpe": 9.0}}}',
    '{"a": {"sharpe": 1.0, "sharpe": 9.0}}',
    '[{"strategy_id": "a", "sharpe": 1.0, "sharpe": 2.0}]',
])
def test_metrics_json_duplicate_keys_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(DataFileError, match="appears twice") as caught:
        read_metrics(_w(tmp_path, "m.json", text))
    assert caught.value.exit_code == 2


def test_bars_cells_refused_by_the_grammar(tmp_path: Path) -> None:
    head = "timestamp,open,high,low,close,volume\n"
    with pytest.raises(DataFileError, match=r"row 1 \(line 2\), column 'open': '1_00' is not a number"):
        load_bars(_w(tmp_path, "b.csv", head + "2026-01-01,1_00,101,99,100,5\n"))
    with pytest.raises(DataFileError, match="column 'timestamp': '0001-01-01T00:00:00\\+01:00' is outside"):
        load_bars(_w(tmp_path, "b.csv", head + "0001-01-01T00:00:00+01:00,100,101,99,100,5\n"))
    with pytest.raises(DataFileError, match="outside the range bars can hold"):
        load_bars(_w(tmp_path, "b.csv", head + "2300-01-01,100,101,99,100,5\n"))
    (tmp_path / "l.csv").write_bytes((head + "2026-01-01,100,101,99,100,5\n").encode("latin-1") + b"\xe9\n")
    with pytest.raises(DataFileError, match="not UTF-8"):
        load_bars(tmp_path / "l.csv")


@pytest.mark.parametrize("stamp", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:30:00-01:00"])
def test_calendar_edges_name_the_cell(tmp_path: Path, stamp: str) -> None:
    with pytest.raises(DataFileError, match=r"r.csv:2:timestamp: .* is outside the calendar"):
        read_returns(_w(tmp_path, "r.csv", f"timestamp,a\n{stamp},0.01\n"))
    with pytest.raises(SnapshotError, match="as_of .* outside the calendar"):
        parse_snapshot(_snapshot(as_of=stamp))
    with pytest.raises(BadInputError, match="--since: .* outside the calendar"):
        parse_instant(stamp, what="--since")
    with pytest.raises(BadInputError, match=r"returns\[0\] timestamp: .* outside the calendar"):
        returns_from_doc([[stamp, 0.01]])


def test_http_documents_use_the_grammar() -> None:
    with pytest.raises(BadInputError, match=r"returns\[0\]: '1_0' is not a number"):
        returns_from_doc([["2026-01-01T00:00Z", "1_0"]])
    with pytest.raises(BadInputError, match="matrix: '1_0' is not a number"):
        table_from_doc({"strategies": ["a"], "timestamps": ["2026-01-01T00:00Z"], "matrix": [["1_0"]]})
    table = table_from_doc({"strategies": ["a"], "timestamps": ["2026-01-01T00:00Z"], "matrix": [[None]]})
    assert table is not None and math.isnan(table.matrix[0, 0])


def _snapshot(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"world_id": "w", "version": "v1", "as_of": "2026-03-02T11:59:00Z",
                           "weights": {"s1": 1.0}, "provenance": {"actor": "risk", "stage": "paper"},
                           "realized_returns": {"s1": [{"ts": "2026-03-01T00:00:00Z", "r": 0.01}]}}
    doc.update(over)
    return doc


def test_snapshot_numbers_use_the_grammar() -> None:
    with pytest.raises(SnapshotError, match=r"weights.s1: '1_0' is not a number"):
        parse_snapshot(_snapshot(weights={"s1": "1_0"}))
    with pytest.raises(SnapshotError, match=r"realized_returns.s1.0.r: r: '1_0' is not a number"):
        parse_snapshot(_snapshot(realized_returns={"s1": [{"ts": "2026-03-01T00:00:00Z", "r": "1_0"}]}))
    assert parse_snapshot(_snapshot(weights={"s1": "1.0"})).weights == {"s1": 1.0}
    with pytest.raises(SnapshotError, match="'s1' appears twice"):
        load_snapshot_text('{"weights": {"s1": 0.5, "s1": 0.5}}', source="s.json")


def test_every_text_reader_accepts_a_bom(tmp_path: Path) -> None:
    t = read_returns(_w(tmp_path, "r.csv", BOM + "timestamp,a\n2026-01-01,0.01\n"))
    assert t.strategies == ("a",)
    assert read_metrics(_w(tmp_path, "m.csv", BOM + "strategy,sharpe\na,1.5\n")) == {"a": {"sharpe": 1.5}}
    assert read_metrics(_w(tmp_path, "m.json", BOM + '{"a": {"sharpe": 1.5}}')) == {"a": {"sharpe": 1.5}}
    bars = load_bars(_w(tmp_path, "b.csv", BOM + "timestamp,open,high,low,close,volume\n"
                                                 "2026-01-01,100,101,99,100,5\n"))
    assert float(bars.close[0]) == 100.0
    assert load_snapshot_text(BOM + json.dumps(_snapshot()), source="s.json").weights == {"s1": 1.0}
    from qmtl_core.policy import load_policy_file
    from tests.test_policy_loader import BASE

    assert load_policy_file(_w(tmp_path, "w.yaml", BOM + BASE)).world == "w"


# --- through the CLI, on both backends and both modes: exit 2, one line, nothing written ---------
def _counts(url: str) -> tuple[int, int, int, int]:
    store = open_store(url)
    try:
        with store.read() as conn:
            return tuple(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar()  # type: ignore[return-value]
                         for t in (schema.evaluation_runs, schema.risk_snapshots, schema.ledger,
                                   schema.run_revisions))
    finally:
        store.dispose()


@pytest.mark.usefixtures("cli_mode")
def test_cli_refuses_bad_cells_and_writes_nothing(tmp_path: Path, qmtl_env: dict[str, str], store_url: str) -> None:
    returns = _w(tmp_path, "r.csv", "timestamp,a\n2026-01-01,0.01\n2026-01-02,1_0\n")
    ran = qmtl("world", "evaluate", "demo-momentum", "--returns", str(returns), "--record")
    assert ran.exit_code == 2 and "r.csv:3:a: '1_0' is not a number" in ran.stderr
    assert "Traceback" not in ran.stderr and ran.stderr.strip().count("\n") == 0
    metrics = _w(tmp_path, "m.json", '{"a": {"sharpe": 0.1}, "a": {"sharpe": 9.0}}')
    ran = qmtl("world", "evaluate", "demo-momentum", "--metrics", str(metrics), "--record")
    assert ran.exit_code == 2 and "'a' appears twice" in ran.stderr
    snap = _snapshot(world_id="demo-momentum", as_of="9999-12-31T23:30:00-01:00")
    ran = qmtl("risk", "put", str(_w(tmp_path, "s.json", BOM + json.dumps(snap))))
    assert ran.exit_code == 2 and "outside the calendar" in ran.stderr
    for argv in (["audit", "log", "--since", "0001-01-01T00:00:00+01:00"],
                 ["world", "history", "demo-momentum", "--at", "9999-12-31T23:30-01:00"]):
        ran = qmtl(*argv)
        assert ran.exit_code == 2 and argv[-2] in ran.stderr and "outside the calendar" in ran.stderr, ran.stderr
    assert _counts(store_url) == (0, 0, 0, 0)
    # The same files, correct and with a BOM, are read.
    metrics = _w(tmp_path, "m.json", BOM + '{"s1": {"sharpe": 2.0, "max_drawdown": 0.1}}')
    assert qmtl("world", "evaluate", "demo-momentum", "--metrics", str(metrics), "--record").exit_code in (0, 10)
    good = _snapshot(world_id="demo-momentum", as_of=datetime.now(timezone.utc).isoformat())
    ran = qmtl("risk", "put", str(_w(tmp_path, "s.json", BOM + json.dumps(good))))
    assert ran.exit_code == 0, ran.stderr
    assert _counts(store_url)[:2] == (1, 1)


@pytest.mark.usefixtures("cli_mode")
def test_evaluate_without_a_file_is_idempotent_when_the_snapshot_is_unusable(
        tmp_path: Path, qmtl_env: dict[str, str], store_url: str) -> None:
    from datetime import timedelta

    metrics = _w(tmp_path, "m.json", '{"s1": {"sharpe": 2.0, "max_drawdown": 0.1}}')
    assert qmtl("world", "evaluate", "demo-momentum", "--metrics", str(metrics), "--record").exit_code in (0, 10)
    # Within its TTL but older than snapshot_max_age: "lags <age>", a note that changes every call.
    old = (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat()
    snap = _snapshot(world_id="demo-momentum", as_of=old, ttl_sec=86_400)
    assert qmtl("risk", "put", str(_w(tmp_path, "s.json", json.dumps(snap)))).exit_code == 0
    before = _counts(store_url)
    first = qmtl("world", "evaluate", "demo-momentum", "--strategy", "s1", "--stage", "paper")
    after_first = _counts(store_url)
    second = qmtl("world", "evaluate", "demo-momentum", "--strategy", "s1", "--stage", "paper")
    assert first.exit_code == second.exit_code and first.exit_code != 1, first.stderr
    assert after_first[0] == before[0] + 1  # the paper run, once
    assert _counts(store_url) == after_first  # identical content: no revision, no ledger entry


@pytest.mark.parametrize(("argv", "fragment"), [
    (["--lease-ttl", "0s"], "--lease-ttl must be longer than zero"),
    (["--lease-ttl", "soon"], "--lease-ttl: 'soon' is not a duration"),
    (["--interval", "0s"], "--interval must be longer than zero"),
])
def test_option_errors_name_the_option_given(worlds_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                             argv: list[str], fragment: str) -> None:
    monkeypatch.setenv("QMTL_WORLDS_DIR", str(worlds_dir))
    once = [] if "--interval" in argv else ["--once"]
    ran = qmtl("world", "campaign-loop", "--world", "demo-momentum", *once, *argv)
    assert ran.exit_code == 2 and fragment in ran.stderr, ran.stderr
