"""Per-invocation state: global options, resolved settings, and the service facade."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from qmtl_core.config import Settings
    from qmtl_core.service import WorldService
    from qmtl_core.service._client import HttpClient, LocalClient

#: Tests only: builds the httpx transport remote mode uses (an in-process ASGI transport).
TRANSPORT_FACTORY: Any = None


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
    _client: "LocalClient | HttpClient | None" = field(default=None, repr=False)
    _client_live: bool = field(default=False, repr=False)

    def settings(self) -> "Settings":
        """Settings resolved from options, environment and config file."""
        if self._settings is None:
            from qmtl_core.config import Settings

            self._settings = Settings.resolve(home=self.home, worlds_dir=self.worlds_dir,
                                              server=self.server)
        return self._settings

    def service(self) -> "WorldService":
        """The in-process ``WorldService`` (commands that only ever work on the local store)."""
        if self._service is None:
            settings = self.settings()
            if settings.server:
                from qmtl_core.errors import UsageError

                raise UsageError(f"this command works on the local store only, not with --server {settings.server}",
                                 hint="run it on the server host, or unset --server/QMTL_SERVER")
            from qmtl_core.service import WorldService

            self._service = WorldService(settings)
        return self._service

    def client(self, *, allow_live: bool = False) -> "LocalClient | HttpClient":
        """The facade as documents: in-process, or over HTTP with --server (remote mode).

        ``allow_live`` (a command's ``--allow-live``, or the ``allow_live`` setting) is the caller's
        live intent: remotely the ``X-Allow-Live: true`` header on the calls that can change what
        is live, locally the same facade flag the server sets from that header."""
        settings = self.settings()
        live = allow_live or settings.allow_live
        if self._client is not None and live and not self._client_live:
            # The intent holds for the rest of the invocation: every later client() call (id
            # lookups, a second request) gets this same client, so nothing holds a closed one.
            if settings.server:
                self._client.close()
            self._client = None
        if self._client is None:
            if settings.server:
                from qmtl_core.service._client import HttpClient

                transport = TRANSPORT_FACTORY(settings.server) if TRANSPORT_FACTORY is not None else None
                self._client = HttpClient(settings.server, settings.token, transport=transport, allow_live=live)
            else:
                from qmtl_core.service._client import LocalClient

                self._client = LocalClient(self.service().confirming_live(live))
            self._client_live = live
        return self._client

    @property
    def remote(self) -> bool:
        """Whether commands go to a server."""
        return bool(self.settings().server)

    def close(self) -> None:
        """Release resources held by the service or the HTTP client."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._service is not None:
            self._service.close()
            self._service = None


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
