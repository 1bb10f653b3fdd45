"""Finding world policy files: ``<worlds_dir>/<world>.yaml`` (or ``.yml``), and the one rule for
world ids.

A world id is 1 to 100 characters: lower-case letters, digits, ``-`` and ``_``, starting with a
letter or a digit (``WORLD_ID_PATTERN``). The policy model, the CLI, the library, the HTTP API and
risk snapshots all check ids with ``check_world_id`` before anything is looked up or any path is
built, so an id can never name a file outside the worlds directory.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from qmtl_core.errors import BadInputError, WorldNotFound

SUFFIXES = (".yaml", ".yml")

#: The world id rule (a regular expression matched against the whole id).
WORLD_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,99}$"
_WORLD_ID = re.compile(WORLD_ID_PATTERN)


def check_world_id(world: object) -> str:
    """``world`` when it is a valid world id, else ``BadInputError`` (exit 2) naming it."""
    if not isinstance(world, str) or _WORLD_ID.fullmatch(world) is None:
        raise BadInputError(f"invalid world id {world!r}: use 1-100 lower-case letters, digits, '-' or '_', "
                            "starting with a letter or digit", hint="e.g. demo-momentum", code="invalid_world_id")
    return world


def world_files(worlds_dir: Path) -> list[Path]:
    """Every policy file in ``worlds_dir``, sorted by name; a missing directory is an error."""
    if not worlds_dir.is_dir():
        raise BadInputError(f"worlds directory {str(worlds_dir)!r} does not exist",
                            hint="pass --worlds-dir or set QMTL_WORLDS_DIR")
    return sorted(p for p in worlds_dir.iterdir() if p.suffix in SUFFIXES and p.is_file())


def world_path(worlds_dir: Path, world: str) -> Path:
    """The policy file of ``world``; ``WorldNotFound`` (with a suggestion) when there is none."""
    check_world_id(world)
    for suffix in SUFFIXES:
        candidate = worlds_dir / f"{world}{suffix}"
        if candidate.is_file():
            return candidate
    known = [p.stem for p in world_files(worlds_dir)] if worlds_dir.is_dir() else []
    close = difflib.get_close_matches(world, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else (
        f"known worlds: {', '.join(known)}" if known else f"no policy files in {worlds_dir}")
    raise WorldNotFound(f"world {world!r} not found in {worlds_dir}", hint=hint)
