"""Upstream ``qmtl.runtime.transforms`` (see :mod:`qmtl`)."""

from qmtl_core.sdk import TradeOrderPublisherNode

__all__ = ["TradeOrderPublisherNode"]
