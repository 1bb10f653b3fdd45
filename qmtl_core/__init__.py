"""qmtl core library: policies, metrics, evaluation, campaign, governance, store and ledger.

Importing this package is cheap; heavy modules (numpy, SQLAlchemy) load only when used.
"""

from qmtl_core._version import __version__

__all__ = ["__version__"]
