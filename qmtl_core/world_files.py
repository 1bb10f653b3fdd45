"""Finding world policy files: ``<worlds_dir>/<world>.yaml`` (or ``.yml``)."""

from __future__ import annotations

import difflib
from pathlib import Path

from qmtl_core.errors import BadInputError, WorldNotFound

SUFFIXES = (".yaml", ".yml")


def world_files(worlds_dir: Path) -> list[Path]:
    """Every policy file in ``worlds_dir``, sorted by name; a missing directory is an error."""
    if not worlds_dir.is_dir():
        raise BadInputError(f"worlds directory {str(worlds_dir)!r} does not exist",
                            hint="pass --worlds-dir or set QMTL_WORLDS_DIR")
    return sorted(p for p in worlds_dir.iterdir() if p.suffix in SUFFIXES and p.is_file())


def world_path(worlds_dir: Path, world: str) -> Path:
    """The policy file of ``world``; ``WorldNotFound`` (with a suggestion) when there is none."""
    for suffix in SUFFIXES:
        candidate = worlds_dir / f"{world}{suffix}"
        try:
            if candidate.is_file():
                return candidate
        except (OSError, ValueError):  # a name no file can have (too long, NUL): no such world
            break
    known = [p.stem for p in world_files(worlds_dir)] if worlds_dir.is_dir() else []
    close = difflib.get_close_matches(world, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else (
        f"known worlds: {', '.join(known)}" if known else f"no policy files in {worlds_dir}")
    raise WorldNotFound(f"world {world!r} not found in {worlds_dir}", hint=hint)
