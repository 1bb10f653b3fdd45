"""Returns and metrics files: wide and long, CSV, Parquet and JSON; errors name the row and column."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from qmtl_core.datafiles import read_metrics, read_returns
from qmtl_core.errors import DataFileError

WIDE = "timestamp,a,b\n2026-01-01,0.01,\n2026-01-02,-0.02,0.005\n2026-01-05,0.03,0.001\n"


def _w(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_wide_csv_with_leading_history_gap(tmp_path: Path) -> None:
    t = read_returns(_w(tmp_path, "r.csv", WIDE))
    assert t.strategies == ("a", "b") and len(t.timestamps) == 3
    assert np.isnan(t.matrix[1, 0]) and t.matrix[1, 1] == 0.005
    assert [r for _, r in t.series("b")] == [0.005, 0.001]


def test_long_csv_pivots_to_the_same_table(tmp_path: Path) -> None:
    long = ("strategy,timestamp,return\nb,2026-01-02,0.005\na,2026-01-01,0.01\na,2026-01-02,-0.02\n"
            "a,2026-01-05,0.03\nb,2026-01-05,0.001\n")
    t1 = read_returns(_w(tmp_path, "w.csv", WIDE))
    t2 = read_returns(_w(tmp_path, "l.csv", long))
    assert t1.strategies == t2.strategies and t1.timestamps == t2.timestamps
    np.testing.assert_array_equal(t1.matrix, t2.matrix)


@pytest.mark.parametrize(("text", "fragment"), [
    ("timestamp,a\n2026-01-01,0.01\n2026-01-02,abc\n", "r.csv:3:a: 'abc' is not a number"),
    ("timestamp,a\n2026-01-01,0.01\nnot-a-date,0.02\n", "r.csv:3:timestamp: 'not-a-date'"),
    ("timestamp,a\n2026-01-02,0.01\n2026-01-01,0.02\n", "r.csv:3:timestamp: timestamp 2026-01-01 is not after"),
    ("timestamp,a\n2026-01-01,0.01\n2026-01-02,0.01,9\n", "r.csv:3: 3 cells but the header has 2"),
    ("timestamp,a\n2026-01-01,0.01\n2026-01-02,\n2026-01-03,0.01\n", "'a' has no return at 2026-01-02"),
    ("timestamp,a\n2026-01-01,inf\n", "r.csv:2:a: infinite value"),
    ("day,a\n2026-01-01,0.01\n", "no timestamp column"),
    ("timestamp\n2026-01-01\n", "no strategy columns"),
    ("timestamp,a,a\n2026-01-01,1,2\n", "column 'a' appears twice"),
    ("timestamp,a\n", "no data rows"),
    ("", "the file is empty"),
    ("timestamp,a\n2026-01-01,\n", "'a' has no returns"),
    ("strategy,timestamp,return\na,2026-01-01,0.1\na,2026-01-01,0.2\n", "r.csv:3: a second return for a"),
    ("strategy,timestamp,return\na,2026-01-01,\n", "r.csv:2:return: missing return"),
])
def test_bad_returns_files(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(DataFileError) as caught:
        read_returns(_w(tmp_path, "r.csv", text))
    assert fragment in caught.value.one_line() and caught.value.exit_code == 2


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match="no such file"):
        read_returns(tmp_path / "nope.csv")


def test_parquet_needs_pyarrow_or_reads(tmp_path: Path) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        p = _w(tmp_path, "r.parquet", "x")
        with pytest.raises(DataFileError, match="needs pyarrow"):
            read_returns(p)
        return
    p = tmp_path / "r.parquet"
    pq.write_table(pa.table({"timestamp": ["2026-01-01", "2026-01-02"], "a": [0.01, -0.02]}), p)
    t = read_returns(p)
    assert t.strategies == ("a",) and t.matrix.tolist() == [[0.01, -0.02]]


def test_metrics_json_shapes(tmp_path: Path) -> None:
    a = read_metrics(_w(tmp_path, "a.json", json.dumps({"strategies": {"s": {"sharpe": 1.2, "n_trades": 40}}})))
    b = read_metrics(_w(tmp_path, "b.json", json.dumps({"s": {"sharpe": 1.2, "n_trades": 40}})))
    c = read_metrics(_w(tmp_path, "c.json", json.dumps([{"strategy_id": "s", "sharpe": 1.2, "n_trades": 40}])))
    assert a == b == c == {"s": {"sharpe": 1.2, "n_trades": 40.0}}
    nul = read_metrics(_w(tmp_path, "d.json", json.dumps({"s": {"sharpe": None}})))
    assert math.isnan(nul["s"]["sharpe"])


def test_metrics_csv(tmp_path: Path) -> None:
    m = read_metrics(_w(tmp_path, "m.csv", "strategy,sharpe,max_drawdown\ns1,1.5,0.1\ns2,,0.3\n"))
    assert m["s1"] == {"sharpe": 1.5, "max_drawdown": 0.1} and math.isnan(m["s2"]["sharpe"])


@pytest.mark.parametrize(("name", "text", "fragment"), [
    ("m.csv", "strategy,sharp\ns,1\n", "unknown metric 'sharp' (did you mean 'sharpe'?)"),
    ("m.csv", "strategy,sharpe\ns,1\ns,2\n", "m.csv:3: strategy 's' appears twice"),
    ("m.csv", "name,sharpe\ns,1\n", "no 'strategy' column"),
    ("m.csv", "strategy,sharpe\ns,x\n", "m.csv:2:sharpe: 'x' is not a number"),
    ("m.json", "{\"s\": {\"sharpe\": 1,}}", "m.json:1:"),
    ("m.json", "[1, 2]", "item 0 needs a 'strategy_id'"),
    ("m.json", "\"x\"", "expected an object"),
])
def test_bad_metrics_files(tmp_path: Path, name: str, text: str, fragment: str) -> None:
    with pytest.raises(DataFileError) as caught:
        read_metrics(_w(tmp_path, name, text))
    assert fragment in caught.value.one_line()
