"""The everyday reads (`world list`, `world campaign W`, `promote --list`, `world decision W`,
`audit log`): they write nothing, on either backend, and a SQLite read loads no PostgreSQL or
signature code (`benchmarks/cli_startup.py` measures what they cost)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from qmtl_core.store import schema
from tests.cli_helpers import qmtl

ROOT = Path(__file__).resolve().parent.parent
RETURNS = ROOT / "worlds" / "data" / "demo-returns.csv"
WORLD = "demo-momentum"
READS = [("world", "list"), ("world", "campaign", WORLD), ("promote", "--list"), ("world", "decision", WORLD),
         ("audit", "log", "--limit", "20"), ("world", "show", WORLD), ("world", "history", WORLD)]


def _dump(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table: a write of any kind (insert, update, delete) changes it."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return {t.name: sorted((tuple(map(repr, row)) for row in conn.execute(sa.select(t))))
                    for t in schema.metadata.sorted_tables}
    finally:
        engine.dispose()


def test_everyday_reads_write_nothing(qmtl_env: dict[str, str], store_url: str, worlds_dir: Path) -> None:
    assert qmtl("world", "validate", "--all", "--record").exit_code == 0
    assert qmtl("world", "evaluate", WORLD, "--record", "--returns", str(RETURNS)).exit_code in (0, 10)
    assert qmtl("world", "campaign-loop", "--world", WORLD, "--once", "--execute").exit_code in (0, 10, 11, 12)
    # What a reader must not record: a changed policy file and a new one (only acting commands,
    # the loop and `world validate --record` record policy versions).
    policy = worlds_dir / f"{WORLD}.yaml"
    policy.write_text(policy.read_text().replace("policy_version: 1", "policy_version: 2"))
    (worlds_dir / "fresh.yaml").write_text((worlds_dir / f"{WORLD}.yaml").read_text()
                                           .replace(f"world: {WORLD}", "world: fresh"))
    before = _dump(store_url)
    assert sum(map(len, before.values())) > 20 and before["evaluation_runs"] and before["campaign_actions"]
    for read in READS:
        ran = qmtl(*read)
        assert ran.exit_code in (0, 11, 12), (read, ran.stderr)
        assert _dump(store_url) == before, read


def test_a_sqlite_read_loads_no_postgresql_dialect_and_no_signature_code(qmtl_env: dict[str, str]) -> None:
    assert qmtl("world", "validate", "--all", "--record").exit_code == 0
    code = ("import sys; from qmtl_cli.app import main\n"
            f"sys.argv=['qmtl', 'world', 'campaign', {WORLD!r}]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "sys.stderr.write(repr([m for m in ('sqlalchemy.dialects.postgresql', 'psycopg', 'cryptography',"
            " 'sshsig', 'fastapi', 'httpx') if m in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=qmtl_env, check=True)
    assert "sma_" in proc.stdout or "no strategies" in proc.stdout, proc.stdout
    if qmtl_env["QMTL_DATABASE_URL"].startswith("sqlite"):
        assert proc.stderr.strip() == "[]"
    else:  # the dialect in use is loaded, and still nothing for signatures or serving
        assert "sqlalchemy.dialects.postgresql" in proc.stderr and "cryptography" not in proc.stderr
