"""Upstream ``qmtl.services.gateway.models``: the submission model from :mod:`qmtl_core.gateway`."""

from qmtl_core.gateway import StrategySubmit

__all__ = ["StrategySubmit"]
