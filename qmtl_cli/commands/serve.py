"""``qmtl serve``, ``qmtl token`` and ``qmtl events``: remote mode."""

import json
import sys
from typing import Annotated, Optional

import typer

from qmtl_cli._output import console, emit, table, user_text as t
from qmtl_cli._runtime import JsonOption, command
from qmtl_cli._state import state

token_app = typer.Typer(help="Create, list and revoke bearer tokens for qmtl serve (on the server's store).",
                        no_args_is_help=True)
events_app = typer.Typer(help="Follow control events from a qmtl serve.", no_args_is_help=True)


def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option("--host", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port.")] = 8765,
    workers: Annotated[int, typer.Option("--workers", min=1, max=64,
                                         help="Worker processes (each opens the store; all share it).")] = 1,
    max_body: Annotated[int, typer.Option("--max-body", min=1024, metavar="BYTES",
                                          help="Largest request body accepted (413 above it).")] = 32 * 1024 * 1024,
    metrics_max_age: Annotated[float, typer.Option(
        "--metrics-max-age", min=0.0, max=300.0, metavar="SECONDS", envvar="QMTL_METRICS_MAX_AGE",
        help="/metrics reads the store at most once per this many seconds; scrapes in between get the "
             "last collection (0: every scrape reads the store).")] = 5.0,
    json_output: JsonOption = False,
) -> None:
    """Run the WorldService HTTP API over this host's store settings (route list at /docs, schema at
    /openapi.json).

    Every route but /healthz, /docs and /openapi.json needs a bearer token (qmtl token create),
    checked before a request body is read; bodies over --max-body are refused (413). State lives
    only in the store, so several servers (or --workers) and cron loops on several hosts can share
    one PostgreSQL (QMTL_DATABASE_URL).
    """
    import os

    import uvicorn

    from qmtl_core.service._http import MAX_BODY_ENV, METRICS_MAX_AGE_ENV

    service = state(ctx).service()
    settings = service.settings  # local settings: the server owns the store
    backend = service.store.backend  # open (and migrate) the store once, before any worker starts
    # Workers are fresh processes that build the app from the environment (uvicorn's factory):
    # hand them exactly the settings this command resolved from its options, env and config.
    os.environ.update({"QMTL_HOME": str(settings.home.resolve()), "QMTL_WORLDS_DIR": str(settings.worlds_dir.resolve()),
                       MAX_BODY_ENV: str(max_body), METRICS_MAX_AGE_ENV: str(metrics_max_age)})
    if settings.database_url:
        os.environ["QMTL_DATABASE_URL"] = settings.database_url
    os.environ.pop("QMTL_SERVER", None)
    service.flush_outbox()  # notifications a crashed process left behind go out first
    service.close()
    sys.stderr.write(f"qmtl serve: http://{host}:{port} (routes at /docs), store {backend}, "
                     f"{workers} worker{'s' if workers > 1 else ''}\n")
    uvicorn.run("qmtl_core.service._http:app_from_environment", factory=True, host=host, port=port,
                workers=workers, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                ws_max_size=64 * 1024)


@token_app.command("create")
@command
def token_create(
    ctx: typer.Context,
    actor: Annotated[str, typer.Option("--actor", help="Who the token acts as (written in the ledger).")],
    role: Annotated[str, typer.Option("--role", help="reader, submitter, producer, approver or operator.")],
    json_output: JsonOption = False,
) -> None:
    """Create a token and print it once (only its hash is stored)."""
    from qmtl_core.service._auth import create_token

    service = state(ctx).service()
    with service.store.write() as conn:
        token_id, token = create_token(conn, actor=actor, role=role, created_by=service.actor, now=service.clock())
    emit({"token_id": token_id, "actor": actor, "role": role, "token": token}, json_mode=state(ctx).json,
         human=lambda c: c.print(t(token) + "\n" + t(f"(token {token_id} for {actor} as {role}; shown once — "
                                                    "store it now, e.g. export QMTL_TOKEN=...)")))


@token_app.command("list")
@command
def token_list(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """List tokens (never their secrets)."""
    from qmtl_core.service._auth import list_tokens

    with state(ctx).service().store.read() as conn:
        rows = list_tokens(conn)
    emit({"tokens": rows}, json_mode=state(ctx).json, human=lambda c: c.print(
        table(None, ["token", "actor", "role", "created", "by", "revoked"],
              [[r["token_id"], r["actor"], r["role"], r["created_at"][:19] + "Z", r["created_by"],
                (r["revoked_at"] or "")[:19]] for r in rows])) if rows else c.print("no tokens"))


@token_app.command("revoke")
@command
def token_revoke(ctx: typer.Context, token_id: Annotated[str, typer.Argument(help="Token id (qmtl token list).")],
                 json_output: JsonOption = False) -> None:
    """Stop accepting a token."""
    from qmtl_core.service._auth import revoke_token

    service = state(ctx).service()
    with service.store.write() as conn:
        revoke_token(conn, token_id=token_id, revoked_by=service.actor, now=service.clock())
    emit({"token_id": token_id, "revoked": True}, json_mode=state(ctx).json,
         human=lambda c: c.print(f"revoked token {t(token_id)}"))


@events_app.command("tail")
@command
def events_tail(
    ctx: typer.Context,
    world: Annotated[Optional[str], typer.Option("--world", "-w", help="Only this world.")] = None,
    domain: Annotated[Optional[str], typer.Option("--domain", help="Only this execution domain.")] = None,
    since: Annotated[Optional[int], typer.Option(
        "--since", min=0, help="Start after this ledger sequence number; 0 replays every event "
                               "[default: now, only new events].", show_default=False)] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", "-n", min=1,
                                                 help="Stop after N events [default: follow].")] = None,
    json_output: JsonOption = False,
) -> None:
    """Follow control events (/events WebSocket) from --server, one line (or JSON object) each.

    Starts at the ledger's head, as tail -f does: only events from now on (--since 0 replays all).
    """
    from urllib.parse import urlencode

    from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
    from websockets.sync.client import connect

    from qmtl_core.errors import StoreUnavailable, Unauthorized, UsageError

    st = state(ctx)
    settings = st.settings()
    if not settings.server:
        raise UsageError("events tail follows a qmtl serve", hint="pass --server URL (and QMTL_TOKEN)")
    if since is None:  # from now: the newest entry's sequence number (0 on an empty ledger)
        newest = st.client().audit_log(limit=1)["entries"]
        since = int(newest[-1]["seq"]) if newest else 0
    base = settings.server.rstrip("/").replace("https://", "wss://", 1).replace("http://", "ws://", 1)
    query = urlencode({k: v for k, v in {"world": world, "domain": domain, "since": since}.items() if v is not None})
    headers = {"Authorization": f"Bearer {settings.token}"} if settings.token else {}
    seen = 0
    out = None if st.json else console()
    try:
        with connect(f"{base}/events?{query}", additional_headers=headers, open_timeout=10) as ws:
            while limit is None or seen < limit:
                event = json.loads(ws.recv())
                seen += 1
                if st.json:
                    sys.stdout.write(json.dumps(event) + "\n")
                    sys.stdout.flush()
                else:
                    assert out is not None
                    out.print(t(f"{event['seq']:>6} {event['ts'][:19]}Z {event['type']:<22} {event['world_id'] or '-'}"
                                f" {event.get('execution_domain') or '-':<8} {event['actor']}: {event['subject']}"
                                f" ({event['reason']})"))
    except InvalidStatus as exc:
        raise StoreUnavailable(f"{settings.server} refused the event stream: HTTP {exc.response.status_code}") from None
    except ConnectionClosed as exc:
        if exc.rcvd is not None and exc.rcvd.code in (4401, 4403):
            raise Unauthorized(f"the server refused the token: {exc.rcvd.reason}") from None
        raise StoreUnavailable(f"event stream from {settings.server} closed: {exc}") from None
    except (OSError, WebSocketException) as exc:
        raise StoreUnavailable(f"cannot follow events at {settings.server}: {exc}",
                               hint="check --server and that qmtl serve is running") from None


def register(app: typer.Typer) -> None:
    """Add ``serve``, ``token`` and ``events`` to the root app."""
    app.command("serve")(command(serve))
    app.add_typer(token_app, name="token")
    app.add_typer(events_app, name="events")

