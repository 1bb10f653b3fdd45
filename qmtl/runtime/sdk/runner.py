"""Upstream ``qmtl.runtime.sdk.runner``: :class:`qmtl_core.sdk.Runner`."""

from qmtl_core.sdk import Runner, SubmitResult

__all__ = ["Runner", "SubmitResult"]
