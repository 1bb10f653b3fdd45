"""Upstream ``qmtl.services.gateway.submission.context_service``: :mod:`qmtl_core.gateway`'s service."""

from qmtl_core.gateway import ComputeContextService

__all__ = ["ComputeContextService"]
