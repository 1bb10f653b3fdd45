"""The seed's shadow-domain guide runs as written: every code block, unchanged, under its own imports.

The guide (``tests/fixtures/seed_000_shadow_e2e.md``, a byte copy of ``shared/seeds/000_…``) is
the contract: its Python blocks import upstream paths (``qmtl.services.gateway…``,
``qmtl.runtime.sdk…``) that the thin :mod:`qmtl` package re-exports from qmtl_core. Each block is
executed exactly as extracted (only the list-item indentation removed); the one with a top-level
``await`` runs inside an event loop. Its ``assert`` statements are the seed's own assertions; the
test then checks what they imply (the order was counted as blocked by the one gate).
"""

from __future__ import annotations

import ast
import asyncio
import json
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import qmtl_core.gateway
import qmtl_core.sdk
from qmtl_core.controlbus import ControlBus
from qmtl_core.sdk import Runner, Strategy

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "tests/fixtures/seed_000_shadow_e2e.md"
#: Where the original lives beside a checkout of the repository (``../shared/seeds``).
ORIGINALS = [ROOT.parent / "shared/seeds/000_df34d95631aeae04.txt",
             Path("/work/shared/seeds/000_df34d95631aeae04.txt")]

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>\w*)[ \t]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                    re.MULTILINE | re.DOTALL)


def blocks(lang: str) -> list[str]:
    """The fenced blocks of ``lang`` in the seed, with their common indentation removed."""
    text = SEED.read_text(encoding="utf-8")
    return [textwrap.dedent(m["body"]) for m in _FENCE.finditer(text) if m["lang"] == lang]


def run_block(source: str) -> dict[str, Any]:
    """Execute a block as written; a block with a top-level ``await`` runs in an event loop."""
    namespace: dict[str, Any] = {"__name__": "seed_block"}
    code = compile(source, "<seed>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(code, namespace)  # noqa: S307 - the seed's own code is what is under test
    if asyncio.iscoroutine(result):
        asyncio.run(result)
    return namespace


@pytest.fixture(autouse=True)
def _fresh_runner() -> Iterator[None]:
    Runner.reset()
    yield
    Runner.reset()


def test_the_fixture_is_the_seed_unchanged() -> None:
    originals = [p for p in ORIGINALS if p.is_file()]
    if not originals:
        pytest.skip("shared/seeds is not beside this checkout; the fixture copy is the contract")
    assert SEED.read_bytes() == originals[0].read_bytes()


def test_the_seed_has_the_blocks_this_test_expects() -> None:
    # If the seed grows a block, this test must grow with it rather than silently skip it.
    assert len(blocks("python")) == 2
    assert len(blocks("json")) == 1


def test_gateway_block_keeps_shadow() -> None:
    source = blocks("python")[0]
    assert "await svc.build(submit)" in source  # the async block, run unchanged in a loop
    ns = run_block(source)
    assert ns["ctx"].execution_domain == "shadow"
    assert ns["ctx"].world_id == "shadow-world"
    # The upstream names are the qmtl_core objects, not copies.
    assert ns["ComputeContextService"] is qmtl_core.gateway.ComputeContextService
    assert ns["StrategySubmit"] is qmtl_core.gateway.StrategySubmit


def test_runner_block_blocks_the_order_in_shadow() -> None:
    ns = run_block(blocks("python")[1])
    assert ns["service"].orders == []
    assert ns["Runner"] is qmtl_core.sdk.Runner
    assert ns["TradeOrderPublisherNode"] is qmtl_core.sdk.TradeOrderPublisherNode
    # The order was built and stopped by the one gate, for the shadow reason, not lost earlier.
    assert Runner.order_stats.blocked == {"domain_shadow": 1}
    assert Runner.order_stats.published == 0


def test_runner_block_would_send_in_live() -> None:
    """The same block with only the domain changed (and allow_live) does reach the service, so the
    empty order list above is the gate's doing and the block is not vacuous."""
    source = blocks("python")[1].replace('execution_domain="shadow")',
                                         'execution_domain="live", allow_live=True)')
    ns = run_block(source.replace("assert service.orders == []", "pass"))
    assert [o["action"] for o in ns["service"].orders] == ["BUY"]


def test_queue_update_payload_is_exactly_the_seeds() -> None:
    expected = json.loads(blocks("json")[0])
    bus = ControlBus()
    seen: list[dict[str, Any]] = []
    bus.subscribe(lambda e: seen.append(e.to_json()), world_id="shadow-world", execution_domain="shadow")
    bus.publish_queue_update(tags=expected["tags"], interval=expected["interval"],
                             queues=expected["queues"], match_mode=expected["match_mode"],
                             world_id=expected["world_id"], execution_domain=expected["execution_domain"])
    by_type = {m["type"]: m["data"] for m in seen}
    assert by_type["queue_update"] == expected
    # "the same (tags, interval, domain) also publishes tagquery.upsert"
    upsert = by_type["tagquery.upsert"]
    assert (upsert["tags"], upsert["interval"], upsert["execution_domain"]) == (["shadow-tag"], 60, "shadow")


class _Seedling(Strategy):
    def setup(self) -> None:
        self.add_nodes(qmtl_core.sdk.StreamInput(name="price", interval="1d", period=2))


def test_runner_submit_takes_a_class_or_an_instance() -> None:
    by_class = Runner.submit(_Seedling, world="shadow-world", execution_domain="shadow")
    by_instance = Runner.submit(_Seedling(), world="shadow-world", execution_domain="shadow")
    assert by_class.strategy_id == by_instance.strategy_id
    assert by_class.context.execution_domain == "shadow"


@pytest.mark.parametrize("bad", [object(), int, "Momentum", None])
def test_runner_submit_refuses_what_is_no_strategy(bad: Any) -> None:
    from qmtl_core.errors import BadInputError

    with pytest.raises(BadInputError, match="needs a Strategy subclass or instance"):
        Runner.submit(bad, world="w")


def test_runner_submit_class_needing_arguments_is_a_clear_error() -> None:
    from qmtl_core.errors import BadInputError

    class Needs(_Seedling):
        def __init__(self, lookback: int) -> None:
            super().__init__()

    with pytest.raises(BadInputError, match="cannot build .*Needs without arguments"):
        Runner.submit(Needs, world="w")
