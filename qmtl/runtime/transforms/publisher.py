"""Upstream ``qmtl.runtime.transforms.publisher``: :class:`qmtl_core.sdk.TradeOrderPublisherNode`."""

from qmtl_core.sdk import TradeOrderPublisherNode

__all__ = ["TradeOrderPublisherNode"]
