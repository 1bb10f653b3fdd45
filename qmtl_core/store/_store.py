"""``Store``: the one object that opens connections and transactions against the database."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from qmtl_core.errors import BusyError, QmtlError, StoreUnavailable
from qmtl_core.store.engine import WRITE_OPTION, backend_of, create_engine, redact_url
from qmtl_core.store.migrations import migrate


class Store:
    """A migrated database with read and write transactions; lower-layer errors mapped to qmtl's."""

    def __init__(self, url: str, *, engine: Engine | None = None) -> None:
        self.url = url
        self.backend = backend_of(url)
        self.engine = engine or create_engine(url)

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A transaction that will write; on SQLite it takes the write lock at BEGIN."""
        with self._mapped_errors(), self.engine.connect() as conn:
            conn = conn.execution_options(**{WRITE_OPTION: True})
            with conn.begin():
                yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction (a consistent snapshot on both backends)."""
        with self._mapped_errors(), self.engine.connect() as conn:
            with conn.begin():
                yield conn

    @contextmanager
    def _mapped_errors(self) -> Iterator[None]:
        try:
            yield
        except QmtlError:
            raise
        except sa_exc.OperationalError as exc:
            text = str(exc.orig) if exc.orig is not None else str(exc)
            if "locked" in text or "busy" in text:
                raise BusyError(f"the store is busy ({text.strip()})", hint="try again") from exc
            raise StoreUnavailable(f"cannot use the store at {redact_url(self.url)}: "
                                   f"{text.strip().splitlines()[0] if text.strip() else exc}",
                                   hint="check QMTL_DATABASE_URL / QMTL_HOME") from exc
        except sa_exc.InterfaceError as exc:
            raise StoreUnavailable(f"cannot use the store at {redact_url(self.url)}: {exc.orig}",
                                   hint="check QMTL_DATABASE_URL") from exc

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


def open_store(url: str) -> Store:
    """Open (creating or migrating as needed) the store at ``url``."""
    store = Store(url)
    try:
        with store.write() as conn:
            migrate(conn)
    except BaseException:
        store.dispose()
        raise
    return store


def is_integrity_error(exc: BaseException) -> bool:
    """True when ``exc`` is a unique/foreign-key violation from either backend."""
    return isinstance(exc, sa_exc.IntegrityError)


__all__ = ["Store", "open_store", "is_integrity_error"]
