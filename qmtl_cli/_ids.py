"""Strategy and request ids as people type and read them: unique prefixes in, names with short ids out."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qmtl_cli._state import CliState


def strategy_id(st: "CliState", world: str, text: str | None) -> str | None:
    """The full strategy id ``text`` names in ``world`` (an exact id or a unique prefix; exit 2 listing
    the candidates when ambiguous, 3 when nothing matches); ``None`` stays ``None``."""
    if text is None:
        return None
    from qmtl_core.errors import StrategyNotFound
    from qmtl_core.id_prefix import resolve_prefix

    rows = st.client().strategies(world)["strategies"]
    return resolve_prefix(text, [r["strategy_id"] for r in rows], what=f"strategy in world {world}",
                          not_found=StrategyNotFound, hint=f"qmtl world campaign {world} lists its strategies")


def request_id(st: "CliState", text: str) -> str:
    """The full promotion request id ``text`` names (exact, or a unique prefix with or without ``pr-``)."""
    from qmtl_core.errors import RequestNotFound
    from qmtl_core.id_prefix import resolve_prefix

    ids = [r["request_id"] for r in st.client().promotions(include_closed=True)["requests"]]
    if text in ids:
        return text
    # The prefix counts from the hex part, so "pr-" alone never matches every request.
    bare = {i.removeprefix("pr-"): i for i in ids}
    found = resolve_prefix(text.removeprefix("pr-"), bare, what="promotion request", not_found=RequestNotFound,
                           hint="qmtl promote --list --all lists them")
    return bare[found]


def labeller(st: "CliState", world: str) -> Callable[[str], str]:
    """A function from strategy id to what a table shows: ``name short-id`` (or the id when it is a name)."""
    from qmtl_core.id_prefix import short_id

    names = {r["strategy_id"]: r["name"] for r in st.client().strategies(world)["strategies"]}

    def label(sid: str) -> str:
        short, name = short_id(sid), names.get(sid)
        return f"{name} {short}" if name and name != sid else short

    return label
