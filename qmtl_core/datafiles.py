"""Reading returns and metrics files (CSV, Parquet, JSON); every error names the row and column.

Returns come **wide** (a ``timestamp`` column, then one column per strategy) or **long**
(``strategy,timestamp,return``). Either way they become a ``ReturnsTable``: one row per strategy on
a shared, increasing time axis, NaN where a strategy has no history yet. A hole after a strategy's
first return is an error, not a silent gap: metrics over a series with holes are not what they say.

Metrics come as JSON (``{"strategies": {id: {metric: value}}}``, ``{id: {...}}`` or a list of
``{"strategy_id": id, ...}``) or CSV (``strategy`` column, one column per metric; an empty cell is
"not measured").
"""

from __future__ import annotations

import csv
import difflib
import io
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qmtl_core import grammar
from qmtl_core.errors import DataFileError
from qmtl_core.grammar import GrammarError
from qmtl_core.metric_names import KNOWN_METRICS

if TYPE_CHECKING:
    import numpy as np

TIME_COLUMNS = ("timestamp", "date", "time", "ts", "datetime")
STRATEGY_COLUMNS = ("strategy", "strategy_id")
RETURN_COLUMNS = ("return", "returns", "r", "ret")


@dataclass(frozen=True)
class ReturnsTable:
    """Returns of many strategies on one time axis: ``matrix[i, t]`` is strategy ``i`` at ``t``."""

    strategies: tuple[str, ...]
    timestamps: tuple[datetime, ...]
    matrix: "np.ndarray"

    def row(self, strategy: str) -> "np.ndarray":
        """One strategy's returns on the shared axis (NaN before its history starts)."""
        return self.matrix[self.strategies.index(strategy)]

    def series(self, strategy: str) -> list[tuple[datetime, float]]:
        """One strategy's observed ``(timestamp, return)`` pairs."""
        row = self.row(strategy)
        return [(t, float(r)) for t, r in zip(self.timestamps, row) if not math.isnan(r)]


def parse_timestamp(text: str, *, where: str) -> datetime:
    """A timestamp of the shared grammar; naive values are taken as UTC (return files rarely
    carry a zone)."""
    try:
        return grammar.parse_timestamp(text, naive_utc=True)
    except GrammarError as exc:
        raise DataFileError(f"{where}: {exc.message}", hint=exc.hint) from None


def _number(text: Any, *, where: str) -> float:
    try:
        return grammar.parse_number(text)
    except GrammarError as exc:
        raise DataFileError(f"{where}: {exc.message}", hint=exc.hint) from None


# --- tabular input ----------------------------------------------------------------------------------
def _read_rows(path: Path) -> tuple[list[str], Iterable[tuple[int, list[Any]]]]:
    """Header and ``(line number, cells)`` rows of a CSV or Parquet file."""
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return _parquet_rows(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataFileError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFileError(f"{path}: cannot read ({exc})") from None
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise DataFileError(f"{path}: the file is empty", hint="the first line must be a header") from None
    except csv.Error as exc:
        raise DataFileError(f"{path}:1: not valid CSV ({exc})") from None

    def rows() -> Iterable[tuple[int, list[Any]]]:
        try:
            for cells in reader:
                if cells and any(c.strip() for c in cells):
                    yield reader.line_num, cells
        except csv.Error as exc:
            raise DataFileError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None

    return header, rows()


def read_parquet_table(path: Path) -> Any:
    """A Parquet file as a ``pyarrow.Table``; a missing pyarrow or a broken file is one clear error."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataFileError(f"{path}: reading Parquet needs pyarrow",
                            hint="pip install 'qmtl[parquet]' or convert the file to CSV") from None
    try:
        return pq.read_table(path)
    except FileNotFoundError:
        raise DataFileError(f"{path}: no such file") from None
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataFileError(f"{path}: not a readable Parquet file ({exc})") from None


def _parquet_rows(path: Path) -> tuple[list[str], Iterable[tuple[int, list[Any]]]]:
    table = read_parquet_table(path)
    columns = table.to_pydict()
    header = list(columns)
    n = table.num_rows

    def cell(value: Any) -> Any:
        return value.isoformat() if hasattr(value, "isoformat") else value

    # Row numbers for Parquet are 1-based data rows (+1 so they read like CSV lines after a header).
    return header, ((i + 2, [cell(columns[h][i]) for h in header]) for i in range(n))


def _find(header: Sequence[str], names: Sequence[str]) -> int | None:
    lowered = [h.lower() for h in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    return None


def read_returns(path: Path | str) -> ReturnsTable:
    """Read a wide or long returns file into a ``ReturnsTable``."""
    path = Path(path)
    header, rows = _read_rows(path)
    if len(set(header)) != len(header):
        dup = next(h for h in header if header.count(h) > 1)
        raise DataFileError(f"{path}:1: column {dup!r} appears twice")
    t_col = _find(header, TIME_COLUMNS)
    s_col = _find(header, STRATEGY_COLUMNS)
    r_col = _find(header, RETURN_COLUMNS)
    if t_col is None:
        raise DataFileError(f"{path}:1: no timestamp column",
                            hint="name the first column 'timestamp' (wide) or use "
                                 "strategy,timestamp,return columns (long)")
    if s_col is not None and r_col is not None:
        return _long(path, header, rows, t_col, s_col, r_col)
    return _wide(path, header, rows, t_col)


def _wide(path: Path, header: list[str], rows: Iterable[tuple[int, list[Any]]], t_col: int) -> ReturnsTable:
    import numpy as np

    value_cols = [i for i in range(len(header)) if i != t_col]
    if not value_cols:
        raise DataFileError(f"{path}:1: no strategy columns besides {header[t_col]!r}")
    for i in value_cols:
        if not header[i]:
            raise DataFileError(f"{path}:1: column {i + 1} has no name")
    stamps: list[datetime] = []
    values: list[list[float]] = []
    for line, cells in rows:
        if len(cells) != len(header):
            raise DataFileError(f"{path}:{line}: {len(cells)} cells but the header has {len(header)}")
        stamp = parse_timestamp(str(cells[t_col]), where=f"{path}:{line}:{header[t_col]}")
        if stamps and stamp <= stamps[-1]:
            raise DataFileError(f"{path}:{line}:{header[t_col]}: timestamp {cells[t_col]} is not after "
                                "the previous row's", hint="sort the file by time; no duplicates")
        stamps.append(stamp)
        values.append([_number(cells[i], where=f"{path}:{line}:{header[i]}") for i in value_cols])
    if not stamps:
        raise DataFileError(f"{path}: no data rows after the header")
    matrix = np.ascontiguousarray(np.array(values, dtype=np.float64).T)
    names = tuple(header[i] for i in value_cols)
    _check_no_holes(path, names, tuple(stamps), matrix)
    return ReturnsTable(names, tuple(stamps), matrix)


def _long(path: Path, header: list[str], rows: Iterable[tuple[int, list[Any]]], t_col: int, s_col: int,
          r_col: int) -> ReturnsTable:
    import numpy as np

    cells_by_key: dict[tuple[str, datetime], float] = {}
    for line, cells in rows:
        strategy = _strategy_cell(path, line, cells, header, s_col)
        stamp = parse_timestamp(str(cells[t_col]), where=f"{path}:{line}:{header[t_col]}")
        if (strategy, stamp) in cells_by_key:
            raise DataFileError(f"{path}:{line}: a second return for {strategy} at {cells[t_col]}")
        value = _number(cells[r_col], where=f"{path}:{line}:{header[r_col]}")
        if math.isnan(value):
            raise DataFileError(f"{path}:{line}:{header[r_col]}: missing return",
                                hint="leave the row out instead")
        cells_by_key[(strategy, stamp)] = value
    if not cells_by_key:
        raise DataFileError(f"{path}: no data rows after the header")
    names = tuple(sorted({s for s, _ in cells_by_key}))
    stamps = tuple(sorted({t for _, t in cells_by_key}))
    s_index = {s: i for i, s in enumerate(names)}
    t_index = {t: i for i, t in enumerate(stamps)}
    matrix = np.full((len(names), len(stamps)), np.nan)
    for (s, t), v in cells_by_key.items():
        matrix[s_index[s], t_index[t]] = v
    _check_no_holes(path, names, stamps, matrix)
    return ReturnsTable(names, stamps, matrix)


def _strategy_cell(path: Path, line: int, cells: list[Any], header: list[str], s_col: int) -> str:
    """The row's strategy name, after checking the row has as many cells as the header."""
    if len(cells) != len(header):
        raise DataFileError(f"{path}:{line}: {len(cells)} cells but the header has {len(header)}")
    strategy = str(cells[s_col]).strip()
    if not strategy:
        raise DataFileError(f"{path}:{line}:{header[s_col]}: empty strategy name")
    return strategy


def _check_no_holes(path: Path, names: Sequence[str], stamps: Sequence[datetime], matrix: "np.ndarray") -> None:
    import numpy as np

    missing = np.isnan(matrix)
    for i, name in enumerate(names):
        row = missing[i]
        if row.all():
            raise DataFileError(f"{path}: strategy {name!r} has no returns")
        first = int(np.argmin(row))
        holes = np.flatnonzero(row[first:])
        if holes.size:
            at = stamps[first + int(holes[0])].isoformat()
            raise DataFileError(f"{path}: strategy {name!r} has no return at {at} after its history "
                                "started", hint="fill the gap (e.g. 0 for a flat day) or drop the strategy")


# --- metrics files ----------------------------------------------------------------------------------
def _check_metric_name(name: str, *, where: str) -> None:
    if name.startswith(EXTRA_PREFIX):
        _check_extra_name(name[len(EXTRA_PREFIX):], where=where)
        return
    if name not in KNOWN_METRICS:
        close = difflib.get_close_matches(name, sorted(KNOWN_METRICS), n=1)
        raise DataFileError(f"{where}: unknown metric {name!r}",
                            hint=f"did you mean {close[0]!r}?" if close else
                            "known: " + ", ".join(sorted(KNOWN_METRICS)))


#: A CSV column ``extra.<name>`` holds an extra metric (JSON: ``"extra": {name: value}``).
EXTRA_PREFIX = "extra."


def _check_extra_name(name: str, *, where: str) -> None:
    # An extra is any name a policy may declare (``metrics:``); a built-in name is not an extra.
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise DataFileError(f"{where}: extra metric name {name!r} must be lower case letters, digits and _")
    if name in KNOWN_METRICS:
        raise DataFileError(f"{where}: {name!r} is a built-in metric, not an extra",
                            hint="put it beside the other metrics, outside extra")


def read_metrics(path: Path | str) -> dict[str, dict[str, float]]:
    """Read a metrics file: ``{strategy: {metric: value}}`` (NaN = not measured).

    Extra metrics (``extra`` in JSON, ``extra.<name>`` columns in CSV) join the strategy's metrics
    under their own name; a rule can gate on one once the policy declares it under ``metrics:``.
    """
    path = Path(path)
    if path.suffix.lower() == ".json":
        return _metrics_json(path)
    header, rows = _read_rows(path)
    s_col = _find(header, STRATEGY_COLUMNS)
    if s_col is None:
        raise DataFileError(f"{path}:1: no 'strategy' column")
    for i, name in enumerate(header):
        if i != s_col:
            _check_metric_name(name, where=f"{path}:1:{i + 1}")
    out: dict[str, dict[str, float]] = {}
    for line, cells in rows:
        strategy = _strategy_cell(path, line, cells, header, s_col)
        if strategy in out:
            raise DataFileError(f"{path}:{line}: strategy {strategy!r} appears twice")
        out[strategy] = {header[i].removeprefix(EXTRA_PREFIX): _number(cells[i], where=f"{path}:{line}:{header[i]}")
                         for i in range(len(header)) if i != s_col}
    if not out:
        raise DataFileError(f"{path}: no data rows after the header")
    return out


def _metrics_json(path: Path) -> dict[str, dict[str, float]]:
    try:
        doc = grammar.loads_json(grammar.decode_text(path.read_bytes()))
    except FileNotFoundError:
        raise DataFileError(f"{path}: no such file") from None
    except GrammarError as exc:
        raise DataFileError(exc.at(str(path)), hint=exc.hint) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFileError(f"{path}: cannot read ({exc})") from None
    if isinstance(doc, dict) and isinstance(doc.get("strategies"), (dict, list)):
        doc = doc["strategies"]
    entries: list[tuple[str, Any]]
    if isinstance(doc, dict):
        entries = list(doc.items())
    elif isinstance(doc, list):
        entries = []
        for i, item in enumerate(doc):
            if not isinstance(item, dict) or not isinstance(item.get("strategy_id", item.get("strategy")), str):
                raise DataFileError(f"{path}: item {i} needs a 'strategy_id'")
            sid = item.get("strategy_id", item.get("strategy"))
            metrics = item.get("metrics", {k: v for k, v in item.items() if k not in ("strategy_id", "strategy")})
            entries.append((sid, metrics))
    else:
        raise DataFileError(f"{path}: expected an object of strategies or a list",
                            hint='e.g. {"strategies": {"s1": {"sharpe": 1.2}}}')
    out: dict[str, dict[str, float]] = {}
    for sid, metrics in entries:
        if not isinstance(metrics, dict):
            raise DataFileError(f"{path}: strategy {sid!r}: metrics must be an object")
        if sid in out:
            raise DataFileError(f"{path}: strategy {sid!r} appears twice")
        extra = metrics.get("extra", {})
        if not isinstance(extra, dict):
            raise DataFileError(f"{path}: strategy {sid!r}: extra must be an object of metric: value")
        for name in metrics:
            if name != "extra":
                _check_metric_name(name, where=f"{path}: strategy {sid!r}")
        for name in extra:
            _check_extra_name(name, where=f"{path}: strategy {sid!r} extra")
            if name in metrics:
                raise DataFileError(f"{path}: strategy {sid!r}: {name!r} is given twice")
        out[sid] = {name: _number(v, where=f"{path}: strategy {sid!r} {name}")
                    for name, v in metrics.items() if name != "extra"}
        out[sid].update({name: _number(v, where=f"{path}: strategy {sid!r} extra.{name}")
                         for name, v in extra.items()})
    if not out:
        raise DataFileError(f"{path}: no strategies")
    return out
