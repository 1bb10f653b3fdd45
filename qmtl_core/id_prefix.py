"""Ids as people type them: any unique prefix, as git accepts abbreviated commit ids.

Strategy ids are 64-hex content hashes and request ids ``pr-`` plus 12 hex digits; nobody reads
or types those whole. ``resolve_prefix`` is the one rule: an exact id wins; otherwise a prefix of at
least ``MIN_PREFIX`` characters that matches exactly one id; several matches are a usage error
(exit 2) that lists them, so nothing is ever acted on by a guess. ``short_id`` is the display side.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from qmtl_core.errors import AmbiguousId, NotFoundError

__all__ = ["MIN_PREFIX", "SHORT_HEX", "resolve_prefix", "short_id"]

#: Shortest prefix accepted (git's minimum abbreviation).
MIN_PREFIX = 4
#: Hex digits kept when a content-hash id is shown in a table.
SHORT_HEX = 12
_HEX_ID = re.compile(r"[0-9a-f]{32,}")


def resolve_prefix(text: str, candidates: Iterable[str], *, what: str,
                   not_found: type[NotFoundError] = NotFoundError, hint: str | None = None) -> str:
    """The one id in ``candidates`` that is ``text`` or starts with it.

    :raises not_found: nothing matches (exit 3).
    :raises AmbiguousId: several ids start with ``text`` (exit 2; ``details['candidates']``).
    """
    ids = sorted(set(candidates))
    if text in ids:
        return text
    matches = [c for c in ids if c.startswith(text)] if len(text) >= MIN_PREFIX else []
    if len(matches) == 1:
        return matches[0]
    if not matches:
        short = f" (a prefix needs at least {MIN_PREFIX} characters)" if len(text) < MIN_PREFIX else ""
        raise not_found(f"no {what} {text!r}{short}", hint=hint)
    shown = ", ".join(matches[:10]) + (f" and {len(matches) - 10} more" if len(matches) > 10 else "")
    raise AmbiguousId(f"{what} prefix {text!r} is ambiguous: {len(matches)} match ({shown})",
                      hint="type more characters of the id", details={"candidates": matches})


def short_id(strategy_id: str) -> str:
    """A content-hash id cut to ``SHORT_HEX`` digits; any other id (a name) as it is."""
    return strategy_id[:SHORT_HEX] if _HEX_ID.fullmatch(strategy_id) else strategy_id
