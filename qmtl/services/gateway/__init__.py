"""Upstream ``qmtl.services.gateway``: re-exports :mod:`qmtl_core.gateway`."""

from qmtl_core.gateway import ComputeContext, ComputeContextService, StrategySubmit, WorldClient

__all__ = ["ComputeContext", "ComputeContextService", "StrategySubmit", "WorldClient"]
