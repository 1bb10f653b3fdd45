"""OHLCV bars: the container, a causal window onto them, and CSV/Parquet loading with precise errors."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from qmtl_core.errors import DataFileError
from qmtl_core.grammar import GrammarError, parse_number, parse_timestamp

__all__ = ["BAR_FIELDS", "Bars", "BarsWindow", "load_bars"]

#: Price/volume fields in the order they are stored in the engine's (5, n) buffer.
BAR_FIELDS: Final[tuple[str, ...]] = ("open", "high", "low", "close", "volume")
COLUMNS: Final[tuple[str, ...]] = ("timestamp", *BAR_FIELDS)

FloatArray = npt.NDArray[np.float64]
_EPOCH: Final[datetime] = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _readonly(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    a.flags.writeable = False
    return a


@dataclass(frozen=True)
class Bars:
    """A validated, read-only series of OHLCV bars; timestamps are UTC ``datetime64[ns]``."""

    timestamp: npt.NDArray[np.datetime64]
    open: FloatArray
    high: FloatArray
    low: FloatArray
    close: FloatArray
    volume: FloatArray

    def __len__(self) -> int:
        return int(self.close.shape[0])

    @classmethod
    def from_columns(cls, columns: Mapping[str, Sequence[Any] | npt.NDArray[Any]], *,
                     source: str = "<bars>", validate: bool = True) -> Bars:
        """Build from arrays keyed ``timestamp, open, high, low, close, volume``.

        ``timestamp`` may be ``datetime64`` (naive = UTC), aware ``datetime`` objects or
        integer epoch nanoseconds.
        """
        missing = [c for c in COLUMNS if c not in columns]
        if missing:
            raise DataFileError(f"{source}: missing column(s) {', '.join(missing)}",
                                hint=f"bars need the columns {', '.join(COLUMNS)}",
                                details={"file": source, "missing": missing})
        ts = _as_datetime64(columns["timestamp"], source)
        fields = {f: np.array(columns[f], dtype=np.float64) for f in BAR_FIELDS}
        n = ts.shape[0]
        for f, arr in fields.items():
            if arr.ndim != 1 or arr.shape[0] != n:
                raise DataFileError(f"{source}: column {f!r} has {arr.shape[0]} values, "
                                    f"timestamp has {n}")
        if validate:
            _validate(ts, fields, source, lines=None)
        return cls(timestamp=_readonly(ts), **{f: _readonly(a) for f, a in fields.items()})

    def slice(self, start: int, stop: int) -> Bars:
        """Bars ``[start, stop)`` (views, still read-only)."""
        return Bars(self.timestamp[start:stop], self.open[start:stop], self.high[start:stop],
                    self.low[start:stop], self.close[start:stop], self.volume[start:stop])

    def matrix(self) -> FloatArray:
        """The price/volume fields as a contiguous (5, n) array in ``BAR_FIELDS`` order."""
        return np.ascontiguousarray(np.vstack([self.open, self.high, self.low, self.close, self.volume]))


class BarsWindow:
    """The last ``period`` bars up to the current one, as read-only views of the engine's buffer.

    The buffer behind it is filled one bar at a time by the backtest engine, so nothing reachable
    from a window (not even ``.base``) holds a bar later than the one being computed.
    """

    __slots__ = ("_buf", "_ts", "_lo", "_hi")

    def __init__(self, buf: FloatArray, ts: npt.NDArray[np.datetime64], lo: int, hi: int) -> None:
        self._buf = buf
        self._ts = ts
        self._lo = lo
        self._hi = hi

    def __len__(self) -> int:
        return self._hi - self._lo

    @property
    def timestamp(self) -> npt.NDArray[np.datetime64]:
        """Bar timestamps (UTC ``datetime64[ns]``), oldest first."""
        return self._ts[self._lo:self._hi]

    @property
    def open(self) -> FloatArray:
        """Opening prices, oldest first."""
        return self._buf[0, self._lo:self._hi]

    @property
    def high(self) -> FloatArray:
        """High prices, oldest first."""
        return self._buf[1, self._lo:self._hi]

    @property
    def low(self) -> FloatArray:
        """Low prices, oldest first."""
        return self._buf[2, self._lo:self._hi]

    @property
    def close(self) -> FloatArray:
        """Closing prices, oldest first."""
        return self._buf[3, self._lo:self._hi]

    @property
    def volume(self) -> FloatArray:
        """Volumes, oldest first."""
        return self._buf[4, self._lo:self._hi]


# --- loading ----------------------------------------------------------------------------------------
def load_bars(path: str | Path) -> Bars:
    """Load bars from a ``.csv`` or ``.parquet`` file with columns ``timestamp, open, high, low,
    close, volume``; any problem raises :class:`DataFileError` naming the row and column."""
    p = Path(path)
    if not p.is_file():
        raise DataFileError(f"{p}: no such bars file", hint="pass a CSV or Parquet file")
    suffix = p.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return _load_parquet(p)
    if suffix in (".csv", ".txt"):
        return _load_csv(p)
    raise DataFileError(f"{p}: unsupported bars file type {suffix or '(none)'!r}",
                        hint="use .csv or .parquet")


def _where(source: str, row: int, line: int | None, column: str) -> str:
    at = f"row {row}" if line is None else f"row {row} (line {line})"
    return f"{source}: {at}, column {column!r}"


def _bad(source: str, row: int, line: int | None, column: str, problem: str,
         hint: str | None = None) -> DataFileError:
    return DataFileError(f"{_where(source, row, line, column)}: {problem}", hint=hint,
                         details={"file": source, "row": row, "line": line, "column": column,
                                  "problem": problem})


#: What ``datetime64[ns]`` can hold: 1677-09-21 to 2262-04-11.
_NS_LIMIT: Final[int] = 2**63 - 1


def _parse_instant_ns(text: str) -> int:
    """Nanoseconds since the epoch of a timestamp of the shared grammar (``GrammarError`` if not)."""
    value = parse_timestamp(text)
    delta = value - _EPOCH
    ns = (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000
    if not -_NS_LIMIT <= ns <= _NS_LIMIT:
        raise GrammarError(f"{text!r} is outside the range bars can hold",
                           "bar times must fall between 1677-09-22 and 2262-04-11")
    return ns


def _load_csv(path: Path) -> Bars:
    try:
        return _read_csv(path)
    except UnicodeDecodeError as exc:
        raise DataFileError(f"{path}: not UTF-8 text (byte {exc.start})", hint="save the file as UTF-8") from None
    except csv.Error as exc:
        raise DataFileError(f"{path}: not valid CSV ({exc})") from None


def _read_csv(path: Path) -> Bars:
    source = str(path)
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise DataFileError(f"{source}: the file is empty",
                                hint=f"the first line must be the header {','.join(COLUMNS)}") from None
        names = [h.strip().lower() for h in header]
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            raise DataFileError(f"{source}: line 1: missing column(s) {', '.join(missing)}",
                                hint=f"the header must name {','.join(COLUMNS)}",
                                details={"file": source, "line": 1, "missing": missing})
        idx = [names.index(c) for c in COLUMNS]
        width = len(names)
        ts: list[int] = []
        cols: list[list[float]] = [[] for _ in BAR_FIELDS]
        lines: list[int] = []
        for row_no, row in enumerate(reader, start=1):
            line = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank lines (often a trailing one) carry no bar
            if len(row) != width:
                # name the first column that is missing, or the last one when there are extras
                column = names[len(row)] if len(row) < width else names[-1]
                raise _bad(source, row_no, line, column, f"expected {width} fields, found {len(row)}")
            text = row[idx[0]]
            try:
                ts.append(_parse_instant_ns(text))
            except GrammarError as exc:
                raise _bad(source, row_no, line, "timestamp", exc.message, hint=exc.hint) from None
            for k, f in enumerate(BAR_FIELDS):
                cell = row[idx[k + 1]]
                try:
                    cols[k].append(parse_number(cell, missing_ok=False))
                except GrammarError as exc:
                    raise _bad(source, row_no, line, f, exc.message, hint=exc.hint) from None
            lines.append(line)
    if not ts:
        raise DataFileError(f"{source}: no bars after the header", hint="add at least one row")
    ts_arr = np.array(ts, dtype=np.int64).astype("datetime64[ns]")
    fields = {f: np.array(cols[k], dtype=np.float64) for k, f in enumerate(BAR_FIELDS)}
    _validate(ts_arr, fields, source, lines)
    return Bars(timestamp=_readonly(ts_arr), **{f: _readonly(a) for f, a in fields.items()})


def _load_parquet(path: Path) -> Bars:
    from qmtl_core.datafiles import read_parquet_table

    source = str(path)
    table = read_parquet_table(path)
    names = {n.strip().lower(): n for n in table.column_names}
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise DataFileError(f"{source}: missing column(s) {', '.join(missing)}",
                            hint=f"bars need the columns {', '.join(COLUMNS)}")
    columns: dict[str, Any] = {}
    for c in COLUMNS:
        col = table.column(names[c])
        if col.null_count:
            row = int(np.flatnonzero(np.asarray(col.is_null().to_numpy(zero_copy_only=False)))[0]) + 1
            raise _bad(source, row, None, c, "is empty (null)")
        columns[c] = col
    ts = _parquet_timestamps(columns["timestamp"], source)
    fields: dict[str, FloatArray] = {}
    for f in BAR_FIELDS:
        try:
            fields[f] = np.asarray(columns[f].to_numpy(zero_copy_only=False), dtype=np.float64)
        except (ValueError, TypeError):
            raise DataFileError(f"{source}: column {f!r} is not numeric") from None
    _validate(ts, fields, source, lines=None)
    return Bars(timestamp=_readonly(ts), **{f: _readonly(a) for f, a in fields.items()})


def _parquet_timestamps(col: Any, source: str) -> npt.NDArray[np.datetime64]:
    import pyarrow as pa

    typ = col.type
    if pa.types.is_timestamp(typ) or pa.types.is_date(typ):
        # Parquet timestamps without a zone are taken as UTC (how pandas writes UTC indexes).
        casted = col.cast(pa.timestamp("ns", tz=getattr(typ, "tz", None)))
        return np.asarray(casted.cast(pa.int64()).to_numpy(zero_copy_only=False)).astype("datetime64[ns]")
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        out = []
        for i, text in enumerate(col.to_pylist(), start=1):
            try:
                out.append(_parse_instant_ns(text))
            except GrammarError as exc:
                raise _bad(source, i, None, "timestamp", exc.message, hint=exc.hint) from None
        return np.array(out, dtype=np.int64).astype("datetime64[ns]")
    raise DataFileError(f"{source}: column 'timestamp' has type {typ}, expected a timestamp or ISO text")


def _as_datetime64(values: Any, source: str) -> npt.NDArray[np.datetime64]:
    arr = np.asarray(values)
    if np.issubdtype(arr.dtype, np.datetime64):
        return arr.astype("datetime64[ns]")
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64).astype("datetime64[ns]")
    out = []
    for i, v in enumerate(arr.tolist(), start=1):
        if isinstance(v, datetime):
            if v.tzinfo is None:
                raise _bad(source, i, None, "timestamp", f"{v!r} has no time zone")
            v = v.isoformat()
        if isinstance(v, str):
            try:
                out.append(_parse_instant_ns(v))
            except GrammarError as exc:
                raise _bad(source, i, None, "timestamp", exc.message, hint=exc.hint) from None
        else:
            raise _bad(source, i, None, "timestamp", f"{v!r} is not a time")
    return np.array(out, dtype=np.int64).astype("datetime64[ns]")


def _validate(ts: npt.NDArray[np.datetime64], fields: Mapping[str, FloatArray], source: str,
              lines: list[int] | None) -> None:
    """Check every bar at once; report the first offending row of the first failing check."""
    if ts.shape[0] == 0:
        raise DataFileError(f"{source}: no bars", hint="add at least one row")

    def fail(mask: npt.NDArray[np.bool_], column: str, problem: str) -> None:
        bad = np.flatnonzero(mask)
        if bad.size:
            i = int(bad[0])
            value = fields[column][i] if column in fields else ts[i]
            raise _bad(source, i + 1, lines[i] if lines else None, column,
                       f"{value!s} {problem}")

    for f in BAR_FIELDS:
        fail(~np.isfinite(fields[f]), f, "is not a finite number")
    for f in ("open", "high", "low", "close"):
        fail(fields[f] <= 0, f, "is not a positive price")
    fail(fields["volume"] < 0, "volume", "is negative")
    o, h, lo, c = fields["open"], fields["high"], fields["low"], fields["close"]
    fail(h < np.maximum(np.maximum(o, c), lo), "high", "is below the bar's open, low or close")
    fail(lo > np.minimum(o, c), "low", "is above the bar's open or close")
    if ts.shape[0] > 1:
        fail(np.concatenate([[False], ts[1:] <= ts[:-1]]), "timestamp",
             "is not after the previous bar's timestamp")
