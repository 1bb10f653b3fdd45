"""Running the CLI in tests: in-process through Typer's CliRunner, or as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from typer.testing import CliRunner

from qmtl_cli.app import app


@dataclass
class Ran:
    """What a CLI run produced."""

    exit_code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        """stdout parsed as exactly one JSON document."""
        return json.loads(self.stdout)


#: ``local`` or ``remote``; set per test by the ``both_modes`` marker (see ``tests/conftest.py``).
MODE = "local"

#: Commands that work on local files or the local store only, whatever the mode.
LOCAL_ONLY = {("config",), ("world", "validate"), ("world", "schema"), ("token",), ("serve",),
              ("world", "report")}


def _local_only(args: tuple[str, ...]) -> bool:
    words = [a for a in args if not a.startswith("-")]
    return any(tuple(words[: len(key)]) == key for key in LOCAL_ONLY)


def qmtl(*args: str, env: dict[str, str] | None = None, input: str | None = None) -> Ran:
    """Run ``qmtl ARGS`` in-process (CliRunner); in remote mode through the HTTP API (``tests/_remote.py``)."""
    argv = list(args)
    if MODE == "remote" and "--server" not in argv and not _local_only(args):
        argv = ["--server", "http://qmtl.test", *argv]
    result = CliRunner().invoke(app, argv, env=env, input=input, catch_exceptions=False)
    return Ran(result.exit_code, result.stdout, result.stderr)


def qmtl_process(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> Ran:
    """Run ``qmtl ARGS`` as a real subprocess (what cron and shells see)."""
    proc = subprocess.run([sys.executable, "-m", "qmtl_cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    return Ran(proc.returncode, proc.stdout, proc.stderr)


def enter_stage_at(world: str, strategy_id: str, when: str, *, store_url: str | None = None) -> None:
    """Date the strategy's entry into its current stage at ``when`` (an ISO date), in ``store_url``
    (default: the store the test's environment names). It stands in for time passing: a test feeds real, past bars, which
    count only when observed during the stay and may not be dated in the future. A direct store
    write, as test set-up: qmtl itself has no clock override, on purpose (it would be a way to date
    evidence)."""
    import sqlalchemy as sa

    from qmtl_core.store import schema
    from qmtl_core.timeutil import iso, parse_instant

    engine = sa.create_engine(store_url or os.environ["QMTL_DATABASE_URL"])
    try:
        with engine.begin() as conn:
            t = schema.strategies
            done = conn.execute(sa.update(t).where(t.c.world_id == world, t.c.strategy_id == strategy_id)
                                .values(stage_entered_at=iso(parse_instant(when))))
            assert done.rowcount == 1, f"{strategy_id} is not in {world}"
    finally:
        engine.dispose()
