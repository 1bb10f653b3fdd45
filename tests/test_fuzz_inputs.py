"""Fuzzers for the readers: mutated returns, bars, metrics and snapshot files, and policies.

Whatever the mutation, a reader either returns a value that obeys the grammar (finite numbers,
aware UTC times) or raises the documented bad-input error (exit 2) with one line; it never raises
anything else (exit 1, a traceback). Through the CLI, a refused input writes nothing.
Examples are kept small so each fuzzer runs in a few seconds.
"""

from __future__ import annotations

import json
import math
from datetime import timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmtl_core.datafiles import read_metrics, read_returns
from qmtl_core.errors import BadInputError, QmtlError
from qmtl_core.policy import check_policy_text
from qmtl_core.risk import load_snapshot_text
from qmtl_core.sdk import load_bars
from qmtl_core.store import open_store, schema
from tests.cli_helpers import qmtl
from tests.test_policy_loader import BASE

#: Tokens that broke a reader once, or that a reader could misread.
TOKENS = ["1_0", "1_00", "1,0", "1.2%", "0x10", "nan", "NaN", "inf", "-inf", "1e999", "-1e999", "",
          "\ufeff", "\x00", "\r", "\n", ",", '"', "'", "{", "}", "[", "]", ":", "-", "+", ".", "e",
          "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:00-01:00", "2026-02-30", "2300-01-01",
          "20260101T000000Z", "2026-01-01T00:00", "true", "null", "-2", "99999999999999999999999",
          "\u00e9", "\ufffd", "  ", "\t"]

RETURNS = "timestamp,a,b\n2026-01-01,0.01,\n2026-01-02,-0.02,0.005\n2026-01-05,0.03,0.001\n"
BARS = ("timestamp,open,high,low,close,volume\n2026-01-01,100,101,99,100.5,10\n"
        "2026-01-02,100.5,102,100,101,12\n2026-01-05,101,103,100.5,102,9\n")
METRICS_JSON = '{"strategies": {"a": {"sharpe": 1.2, "max_drawdown": 0.1}, "b": {"sharpe": 0.4}}}'
METRICS_CSV = "strategy,sharpe,max_drawdown\na,1.2,0.1\nb,0.4,\n"
SNAPSHOT = json.dumps({
    "world_id": "demo-momentum", "version": "v1", "as_of": "2026-03-02T11:59:00Z", "ttl_sec": 900,
    "weights": {"s1": 0.6, "s2": 0.4},
    "covariance": {"s1,s1": 0.04, "s1,s2": 0.01, "s2,s1": 0.01, "s2,s2": 0.09},
    "realized_returns": {"s1": [{"ts": "2026-03-01T00:00:00Z", "r": 0.01}]},
    "stress": {"crash": -0.3}, "provenance": {"actor": "risk", "stage": "paper"}})

_EDIT = st.tuples(st.sampled_from(["insert", "replace", "delete", "swap_cell"]),
                  st.integers(0, 10_000), st.sampled_from(TOKENS))
_FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def mutate(text: str, edits: list[tuple[str, int, str]]) -> str:
    """Apply character-level edits, plus whole-cell swaps that keep the file's shape."""
    for kind, at, token in edits:
        i = at % (len(text) + 1)
        if kind == "insert":
            text = text[:i] + token + text[i:]
        elif kind == "delete":
            text = text[:i] + text[i + 1 + at % 3:]
        elif kind == "replace":
            text = text[:i] + token + text[i + len(token):]
        else:  # replace one CSV cell / JSON scalar between separators with the token
            seps = [j for j, c in enumerate(text) if c in ",\n:{}[]"] or [0]
            j = seps[at % len(seps)]
            k = next((m for m in seps if m > j), len(text))
            text = text[:j + 1] + token + text[k:]
    return text


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8", errors="surrogatepass"))
    return path


def _refused_cleanly(exc: QmtlError) -> None:
    assert isinstance(exc, BadInputError) and exc.exit_code == 2, exc
    assert "\n" not in exc.one_line()


@_FUZZ
@given(edits=st.lists(_EDIT, min_size=1, max_size=4))
def test_fuzzed_returns_files(tmp_path: Path, edits: list[tuple[str, int, str]]) -> None:
    try:
        table = read_returns(_write(tmp_path, "r.csv", mutate(RETURNS, edits)))
    except QmtlError as exc:
        _refused_cleanly(exc)
        return
    values = table.matrix[~np.isnan(table.matrix)]
    assert np.isfinite(values).all()
    assert all(t.tzinfo is timezone.utc for t in table.timestamps)
    assert list(table.timestamps) == sorted(set(table.timestamps))


@_FUZZ
@given(edits=st.lists(_EDIT, min_size=1, max_size=4))
def test_fuzzed_bars_files(tmp_path: Path, edits: list[tuple[str, int, str]]) -> None:
    try:
        bars = load_bars(_write(tmp_path, "b.csv", mutate(BARS, edits)))
    except QmtlError as exc:
        _refused_cleanly(exc)
        return
    matrix = bars.matrix()
    assert np.isfinite(matrix).all() and (matrix[:4] > 0).all()
    assert (np.diff(bars.timestamp.astype(np.int64)) > 0).all()


@_FUZZ
@given(edits=st.lists(_EDIT, min_size=1, max_size=4), form=st.sampled_from(["json", "csv"]))
def test_fuzzed_metrics_files(tmp_path: Path, edits: list[tuple[str, int, str]], form: str) -> None:
    text = mutate(METRICS_JSON if form == "json" else METRICS_CSV, edits)
    try:
        doc = read_metrics(_write(tmp_path, f"m.{form}", text))
    except QmtlError as exc:
        _refused_cleanly(exc)
        return
    for values in doc.values():
        assert all(math.isnan(v) or math.isfinite(v) for v in values.values())


@_FUZZ
@given(edits=st.lists(_EDIT, min_size=1, max_size=4))
def test_fuzzed_snapshots(edits: list[tuple[str, int, str]]) -> None:
    try:
        snap = load_snapshot_text(mutate(SNAPSHOT, edits), source="s.json")
    except QmtlError as exc:
        _refused_cleanly(exc)
        return
    assert snap.as_of.tzinfo is not None
    assert all(math.isfinite(w) for w in snap.weights.values())
    for points in (snap.realized_returns or {}).values():
        assert all(math.isfinite(p.r) and p.ts.tzinfo is not None for p in points)


# --- policies: YAML-level mutations with the values that used to slip through ------------------
POLICY_VALUES = [".nan", ".inf", "-.inf", ".NaN", "0500", "010", "1:30", "1:30.5", "1_000", "0x10", "0b11",
                 "yes", "no", "on", "off", "2147483648", "99999999999999999999", "1e999", "-1", "0",
                 "25000d", "'x'", "null", "[]", "{}", "*a", "{<<: *a}", "2026-01-01"]


@_FUZZ
@given(line=st.integers(0, 60), value=st.sampled_from(POLICY_VALUES),
       extra=st.lists(_EDIT, max_size=2))
def test_fuzzed_policies_are_valid_or_located(line: int, value: str, extra: list[tuple[str, int, str]]) -> None:
    lines = BASE.replace("campaign:\n", "x_anchor_holder: &a {window: 7d}\ncampaign:\n").split("\n")
    i = line % len(lines)
    if ":" in lines[i]:
        head = lines[i].rsplit(":", 1)[0]
        lines[i] = f"{head}: {value}" if not head.rstrip().endswith("}") else lines[i]
    text = mutate("\n".join(lines), extra)
    policy, problems = check_policy_text(text)
    if policy is None:
        assert problems and all(p.message and "\n" not in p.message for p in problems)
        return
    # A policy that loads holds only finite numbers and store-sized integers.
    def walk(value: Any) -> None:
        if isinstance(value, float):
            assert math.isfinite(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            assert value <= 2**31 - 1
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(policy.model_dump())


# --- end to end: a refused file exits 2 with one line and writes nothing --------------------------
@pytest.mark.usefixtures("qmtl_env")
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(_EDIT, min_size=1, max_size=3), which=st.sampled_from(["returns", "metrics", "snapshot"]))
def test_fuzzed_files_through_the_cli(tmp_path: Path, store_url: str, edits: list[tuple[str, int, str]],
                                      which: str) -> None:
    if which == "snapshot":
        path = _write(tmp_path, "s.json", mutate(SNAPSHOT, edits))
        argv = ["risk", "put", str(path)]
    else:
        path = _write(tmp_path, "in.csv" if which == "returns" else "m.json",
                      mutate(RETURNS if which == "returns" else METRICS_JSON, edits))
        argv = ["world", "evaluate", "demo-momentum", f"--{which}", str(path), "--record"]
    store = open_store(store_url)
    try:
        with store.read() as conn:
            before = conn.execute(sa.select(sa.func.count()).select_from(schema.ledger)).scalar()
        ran = qmtl(*argv)
        assert ran.exit_code != 1 and "Traceback" not in ran.stderr, ran.stderr
        if ran.exit_code == 2:
            assert ran.stderr.strip().count("\n") == 0
            with store.read() as conn:
                assert conn.execute(sa.select(sa.func.count()).select_from(schema.ledger)).scalar() == before
    finally:
        store.dispose()
