"""A throwaway PostgreSQL cluster for the tests: a temp dir, a free localhost port, stopped after.

``initdb`` refuses to run as root, so as root every server command runs as ``nobody``
(DESIGN §9). Binaries come from PATH or the Debian location.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

DEBIAN_BIN = Path("/usr/lib/postgresql/15/bin")


def find_binary(name: str) -> str | None:
    """Path of a PostgreSQL server binary, or ``None``."""
    found = shutil.which(name)
    if found:
        return found
    candidate = DEBIAN_BIN / name
    return str(candidate) if candidate.exists() else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    """One running cluster; ``new_database()`` gives each test its own empty database."""

    def __init__(self) -> None:
        self.initdb = find_binary("initdb")
        self.pg_ctl = find_binary("pg_ctl")
        if not self.initdb or not self.pg_ctl:
            raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found; "
                               "run `make test`, which installs them (apt-get install -y postgresql)")
        self.as_root = os.geteuid() == 0
        self.dir = Path(tempfile.mkdtemp(prefix="qmtl-pg-"))
        self.dir.chmod(0o755)
        if self.as_root:
            shutil.chown(self.dir, user="nobody")
        self.port = 0
        self._counter = itertools.count()

    def _run(self, *args: str) -> None:
        cmd = (["runuser", "-u", "nobody", "--"] if self.as_root else []) + list(args)
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=self.dir)
        if proc.returncode != 0:
            log = self.dir / "log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed: {proc.stderr.strip()} {tail}")

    def start(self) -> "PgCluster":
        self._run(self.initdb, "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres",
                  "--no-sync", "-E", "UTF8", "--locale=C")
        for attempt in range(5):
            self.port = _free_port()
            try:
                self._run(self.pg_ctl, "-D", str(self.dir / "data"), "-l", str(self.dir / "log"),
                          "-w", "-t", "60", "start", "-o",
                          f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                          "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                          "-c max_connections=200")
                return self
            except RuntimeError:
                if attempt == 4:
                    raise
        return self

    def admin_url(self, db: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{db}"

    def new_database(self) -> str:
        """Create an empty database and return its SQLAlchemy URL."""
        import psycopg

        name = f"t_{os.getpid()}_{next(self._counter)}_{uuid.uuid4().hex[:6]}"
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.admin_url(name)

    def stop(self) -> None:
        try:
            self._run(self.pg_ctl, "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
