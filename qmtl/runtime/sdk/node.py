"""Upstream ``qmtl.runtime.sdk.node``: the node classes of :mod:`qmtl_core.sdk`."""

from qmtl_core.sdk import Node, StreamInput

__all__ = ["Node", "StreamInput"]
