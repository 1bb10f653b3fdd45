"""Upstream ``qmtl.runtime.sdk``: the whole of :mod:`qmtl_core.sdk`."""

from qmtl_core.sdk import *  # noqa: F401,F403 - a re-export by design
from qmtl_core.sdk import __all__ as __all__  # noqa: PLC0414
