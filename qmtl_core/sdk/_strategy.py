"""The Strategy base class, its DAG document and its stable content-hash id."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from qmtl_core.canonical import canonical_json, content_hash, sha256_hex
from qmtl_core.domains import ComputeContext
from qmtl_core.errors import BadInputError
from qmtl_core.sdk._node import Node, code_fingerprint

__all__ = ["Strategy", "strategy_id", "strategy_source"]


class Strategy:
    """Base of a user strategy: ``setup()`` builds the DAG with ``self.add_nodes(...)``.

    Tunable parameters are declared in ``defaults`` and overridden per instance
    (``SmaCrossover(fast=5)``); they are part of the strategy id.
    """

    defaults: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise BadInputError(f"{type(self).__name__} has no parameter(s) {', '.join(unknown)}",
                                hint=f"known: {', '.join(sorted(self.defaults)) or '(none)'}")
        self.params: dict[str, Any] = {**self.defaults, **params}
        self._added: list[Node] = []
        self._nodes: tuple[Node, ...] | None = None

    def setup(self) -> None:
        """Create the nodes and register them with :meth:`add_nodes`; subclasses implement it."""
        raise NotImplementedError(f"{type(self).__name__}.setup() must add the strategy's nodes")

    def add_nodes(self, *nodes: Node | Iterable[Node]) -> None:
        """Register nodes (or lists of nodes) of the DAG; inputs must be registered too."""
        added = self.__dict__.setdefault("_added", [])
        for item in nodes:
            for node in ([item] if isinstance(item, Node) else list(item)):
                if not isinstance(node, Node):
                    raise BadInputError(f"add_nodes() got {node!r}, which is not a Node")
                if all(node is not n for n in added):
                    added.append(node)
        self.__dict__["_nodes"] = None

    def build(self) -> tuple[Node, ...]:
        """Run ``setup()`` once and return the nodes in topological order (inputs first)."""
        built: tuple[Node, ...] | None = self.__dict__.get("_nodes")
        if built is not None:
            return built
        if not self.__dict__.get("_added"):
            self.setup()
        added: list[Node] = self.__dict__.get("_added", [])
        if not added:
            raise BadInputError(f"{type(self).__name__}.setup() added no nodes")
        members = {id(n) for n in added}
        for node in added:
            for up in node.inputs:
                if id(up) not in members:
                    raise BadInputError(f"node {node.name!r} reads from {up.name!r}, which was not added",
                                        hint="pass every node to self.add_nodes(...)")
        seen: dict[str, Node] = {}
        for node in added:
            other = seen.setdefault(node.node_id, node)
            if other is not node:
                raise BadInputError(f"nodes {other.name!r} and {node.name!r} are identical (same id)",
                                    hint="give them different names or remove one")
        order = _topological(added)
        self.__dict__["_nodes"] = order
        return order

    @property
    def nodes(self) -> tuple[Node, ...]:
        """The DAG's nodes in topological order (builds on first use)."""
        return self.build()

    def dag(self) -> dict[str, Any]:
        """The DAG as a JSON document (what a submission carries)."""
        return {"strategy": f"{type(self).__module__}.{type(self).__qualname__}",
                "params": self.__dict__.get("params", dict(self.defaults)),
                "nodes": [n.describe() for n in self.build()]}

    def dag_json(self) -> str:
        """Canonical JSON of :meth:`dag`."""
        return canonical_json(self.dag())

    def apply_compute_context(self, ctx: ComputeContext) -> None:
        """Apply one context to every node of the DAG."""
        for node in self.build():
            node.apply_compute_context(ctx)


def _topological(nodes: list[Node]) -> tuple[Node, ...]:
    # Kahn's algorithm, taking ready nodes in registration order so the result is deterministic.
    pending = {id(n): len(n.inputs) for n in nodes}
    children: dict[int, list[Node]] = {id(n): [] for n in nodes}
    for n in nodes:
        for up in n.inputs:
            children[id(up)].append(n)
    ready = [n for n in nodes if pending[id(n)] == 0]
    out: list[Node] = []
    while ready:
        node = ready.pop(0)
        out.append(node)
        for child in children[id(node)]:
            pending[id(child)] -= 1
            if pending[id(child)] == 0:
                ready.append(child)
    if len(out) != len(nodes):  # pragma: no cover - inputs are fixed at construction, so no cycles
        raise BadInputError("the strategy's DAG has a cycle")
    return tuple(out)


def strategy_source(cls: type) -> str:
    """The code a strategy id covers: its module's source, else its class's, else the file bytes."""
    module = sys.modules.get(cls.__module__)
    for target in (module, cls):
        if target is None:
            continue
        try:
            return inspect.getsource(target)
        except (OSError, TypeError):
            continue
    try:
        path = inspect.getfile(cls)
        return "sha256:" + sha256_hex(Path(path).read_bytes().decode("latin-1"))
    except (OSError, TypeError):
        # defined in exec()'d text with no file: fall back to the bytecode of its methods
        parts = [f"{name}:{code_fingerprint(fn)}" for name, fn in sorted(vars(cls).items())
                 if inspect.isfunction(fn)]
        return "\n".join(parts)


def strategy_id(strategy: Strategy | type[Strategy]) -> str:
    """Stable content hash of a strategy's DAG (node ids), parameters and code.

    The same code and parameters give the same id on every resubmit; any change to the module's
    source, a parameter or the graph gives a new one.
    """
    instance = strategy() if isinstance(strategy, type) else strategy
    if not isinstance(instance, Strategy):
        raise BadInputError(f"{strategy!r} is not a qmtl Strategy")
    cls = type(instance)
    return content_hash({
        # the qualname, not the module path: loading the same file under another module name
        # (by path vs. as a package) must not change the id
        "class": cls.__qualname__,
        "params": instance.__dict__.get("params", dict(cls.defaults)),
        "nodes": sorted(n.node_id for n in instance.build()),
        "source": sha256_hex(strategy_source(cls)),
    })
