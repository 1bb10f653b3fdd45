"""Upstream ``qmtl.foundation.common.compute_key``: :class:`qmtl_core.domains.ComputeContext`."""

from qmtl_core.domains import ComputeContext

__all__ = ["ComputeContext"]
