"""Per-invocation state: global options, resolved settings, and the service facade."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from qmtl_core.config import Settings
    from qmtl_core.service import WorldService


@dataclass
class CliState:
    """Global options of one ``qmtl`` invocation."""

    home: Path | None = None
    worlds_dir: Path | None = None
    server: str | None = None
    json: bool = False
    debug: bool = False
    _settings: "Settings | None" = field(default=None, repr=False)
    _service: "WorldService | None" = field(default=None, repr=False)

    def settings(self) -> "Settings":
        """Settings resolved from options, environment and config file."""
        if self._settings is None:
            from qmtl_core.config import Settings

            self._settings = Settings.resolve(home=self.home, worlds_dir=self.worlds_dir,
                                              server=self.server)
        return self._settings

    def service(self) -> "WorldService":
        """The ``WorldService`` for this invocation (local mode)."""
        if self._service is None:
            settings = self.settings()
            if settings.server:
                from qmtl_core.errors import UsageError

                raise UsageError(f"remote mode (--server {settings.server}) is not available in "
                                 "this version of qmtl",
                                 hint="unset --server/QMTL_SERVER/config 'server' to use the local store")
            from qmtl_core.service import WorldService

            self._service = WorldService(settings)
        return self._service

    def close(self) -> None:
        """Release resources held by the service."""
        if self._service is not None:
            self._service.close()


_current = CliState()


def state(ctx: typer.Context | None = None) -> CliState:
    """The state of the running invocation (set by the root callback)."""
    if ctx is not None:
        root = ctx.find_root()
        if isinstance(root.obj, CliState):
            return root.obj
    return _current


def set_current(value: CliState) -> None:
    """Install ``value`` as the running invocation's state."""
    global _current
    _current = value
