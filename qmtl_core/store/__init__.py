"""The store: SQLAlchemy Core schema, SQLite (default) and PostgreSQL engines, migrations.

Importing this package imports SQLAlchemy; the CLI does so only inside commands that need it.
"""

from qmtl_core.store import schema
from qmtl_core.store._store import Store, is_integrity_error, open_store
from qmtl_core.store.migrations import current_version, head_version, migrate

__all__ = ["Store", "open_store", "schema", "migrate", "head_version", "current_version",
           "is_integrity_error"]
