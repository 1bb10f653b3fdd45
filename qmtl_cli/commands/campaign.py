"""``qmtl world campaign`` and ``qmtl world campaign-loop``: campaign state and the cron-safe loop."""

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from qmtl_cli._output import console, emit, styled, user_text as t
from qmtl_cli._runtime import AllowLiveOption, JsonOption, command
from qmtl_cli._state import state
from qmtl_cli.commands.world import app

if TYPE_CHECKING:
    from collections.abc import Callable

    from rich.console import Console

ACTION_STYLE = {"evaluate": "cyan", "promote_to_paper": "green", "apply_live": "green",
                "request_live_approval": "yellow", "demote": "magenta", "observe": "dim", "blocked": "red"}


def _bar(done: float, total: float, width: int = 12) -> str:
    if total <= 0:
        return "█" * width
    filled = max(0, min(width, int(round(width * done / total))))
    return "█" * filled + "░" * (width - filled)


def render_campaign(c: "Console", world: str, views: list[dict[str, Any]],
                    curves: dict[str, list[float]] | None = None,
                    label: "Callable[[str], str]" = str) -> None:
    """Human rendering of ``qmtl world campaign`` (``curves``: each strategy's chained returns, drawn
    as a sparkline coloured by its gates' pass/warn/fail; ``label``: how a strategy id is shown)."""
    from qmtl_cli._sparkline import gate_status, styled_sparkline

    if not views:
        c.print(f"world {t(world)} has no strategies yet (submit one, or record a run with "
                "qmtl world evaluate --strategy)")
        return
    for v in views:
        status = gate_status(v["rules"])
        spark = styled_sparkline((curves or {}).get(v["strategy_id"], []), status, width=24)
        c.print(f"[bold]{t(label(v['strategy_id']))}[/bold]  {t(v['phase'])}" + (f"  {spark}" if spark else "")
                + (f"  {styled(status)}" if status else ""))
        for p in v["progress"]:
            span = p["span_seconds"]
            window = p["window_seconds"] or 0
            obs, need = p["n_observations"], p["min_observations"]
            frac_span = span / window if window else 1.0
            frac = min(frac_span, obs / need if need else 1.0)
            mark = "[green]✓[/green]" if p["satisfied"] else " "
            c.print(f"  {mark} {_bar(frac, 1.0)} {t(p['label'])}")
        nxt = v["next_action"]
        if nxt is not None:
            style = ACTION_STYLE.get(nxt["action"], "")
            c.print(f"  next: [{style}]{t(nxt['action'])}[/{style}] ({t(nxt['reason'])}): {t(nxt['detail'])}")
        failing = [r for r in v["rules"] if r.get("status") != "pass"]
        for r in failing:
            c.print(f"  {styled(r['status'])} {t(r['id'])}: {t(r['reason'])}")


@app.command("campaign")
@command
def campaign(
    ctx: typer.Context,
    world: Annotated[str, typer.Argument(help="World name.")],
    strategy: Annotated[Optional[str], typer.Option("--strategy", "-s", help="Only this strategy (its id or any unique prefix).")] = None,
    json_output: JsonOption = False,
) -> None:
    """Show each strategy's campaign: phase, window progress measured on data, gates, next action.

    STRATEGY (--strategy) may be any unique prefix of the id, as git accepts for commits.
    """
    from qmtl_cli._ids import labeller, strategy_id

    strategy = strategy_id(state(ctx), world, strategy)
    views = state(ctx).client().campaign(world, strategy_id=strategy)["strategies"]

    def human(c: "Console") -> None:
        from qmtl_cli._sparkline import strategy_curves

        render_campaign(c, world, views, strategy_curves(state(ctx), world, strategy) if views else None,
                        labeller(state(ctx), world))

    emit({"world": world, "strategies": views}, json_mode=state(ctx).json, human=human)


def _parse_interval(text: str, option: str) -> float:
    """Seconds of a duration option; errors name ``option``, the flag the user gave."""
    from qmtl_core.errors import UsageError
    from qmtl_core.policy import parse_duration

    try:
        seconds = parse_duration(text).total_seconds()
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None
    if seconds <= 0:
        raise UsageError(f"{option} must be longer than zero", hint=f"e.g. {option} 10m")
    return seconds


class _LoopTextfile:
    """``--metrics-file``: the loop's families (carried over from the file it replaces, so counters only
    grow across cron runs) plus the store families when the store is local."""

    def __init__(self, st: Any, path: Path) -> None:
        from prometheus_client import CollectorRegistry

        from qmtl_core.errors import ConfigError
        from qmtl_core.telemetry import LoopMetrics, new_registry, read_counters

        import os

        # Checked before the loop acts, not after: a cron line must not act and then fail to report.
        problem = ("is a directory" if path.is_dir() else "no such directory" if not path.parent.is_dir()
                   else "directory not writable" if not os.access(path.parent, os.W_OK) else None)
        if problem:
            raise ConfigError(f"--metrics-file {path}: {problem}",
                              hint="give a file in an existing directory, e.g. /var/lib/node_exporter/qmtl.prom")
        self.path = path
        if st.remote:  # the server's /metrics has the store families; the store is not here
            self.registry = CollectorRegistry(auto_describe=False)
        else:
            service = st.service()
            self.registry = new_registry(service.store, service.clock)
        self.loop = LoopMetrics(self.registry)
        self.loop.carry_over(read_counters(path, ("qmtl_loop_runs", "qmtl_loop_actions")))

    def write(self, outcomes: list[dict[str, Any]], at: Any) -> None:
        from qmtl_core.errors import ConfigError
        from qmtl_core.telemetry import write_textfile

        for outcome in outcomes:
            self.loop.observe(outcome, at)
        try:
            write_textfile(self.path, self.registry)
        except OSError as exc:
            raise ConfigError(f"--metrics-file {self.path}: cannot write ({exc.strerror or exc})",
                              hint="point it at a writable directory, e.g. node_exporter's textfile directory") from None


def _print_action(c: "Console", doc: dict[str, Any], label: "Callable[[str], str]" = str) -> None:
    style = ACTION_STYLE.get(doc["action"], "")
    outcome = doc.get("outcome", "")
    result = doc.get("result") or {}
    extra = ""
    if result.get("run_id"):
        extra = f" -> run {result['run_id']}#{result['revision']} {result.get('run_status', '')}"
    elif result.get("why"):
        extra = f" ({result['why']})"
    c.print(f"  {t(outcome):<9} [{style}]{t(doc['action']):<16}[/{style}] {t(label(doc['strategy_id'])):<20} "
            f"{t(doc['reason'])}: {t(doc['detail'])}{t(extra)}", highlight=False)


def _checkpoint_publisher(settings: Any) -> Any:
    """With ``checkpoint_dir`` set, a function that publishes a signed checkpoint of a head into it
    (a misconfigured key fails the loop before it acts, not after)."""
    if settings.checkpoint_dir is None:
        return None
    from qmtl_core.checkpoint import publish, require_signer

    signer = require_signer(settings.checkpoint_key)
    return lambda head: publish(head, signer, settings.checkpoint_dir)


@app.command("campaign-loop")
@command
def campaign_loop(
    ctx: typer.Context,
    worlds: Annotated[Optional[list[str]], typer.Option(
        "--world", "-w", help="World to run (repeatable).")] = None,
    all_worlds: Annotated[bool, typer.Option("--all", help="Every world in --worlds-dir.")] = False,
    once: Annotated[bool, typer.Option("--once", help="One iteration, then exit (for cron).")] = False,
    interval: Annotated[Optional[str], typer.Option(
        "--interval", help="Run every INTERVAL (e.g. 1h, 15m) until --max-iterations.")] = None,
    max_iterations: Annotated[Optional[int], typer.Option(
        "--max-iterations", min=1, help="Stop after N iterations [default: run until interrupted].")] = None,
    execute: Annotated[bool, typer.Option(
        "--execute", help="Act on the plan; without it nothing is executed or written.")] = False,
    lease_ttl: Annotated[str, typer.Option(
        "--lease-ttl", help="How long a world's lease lasts without renewal (a crashed loop "
                            "blocks others this long).")] = "10m",
    allow_live: AllowLiveOption = False,
    metrics_file: Annotated[Optional[Path], typer.Option(
        "--metrics-file", help="After each iteration, write Prometheus metrics to PATH atomically, for "
                               "node_exporter's textfile collector (e.g. /var/lib/node_exporter/qmtl.prom): "
                               "the loop's runs and actions, and (locally) the store's gauges, the same "
                               "families qmtl serve exposes at /metrics.", show_default=False)] = None,
    json_output: JsonOption = False,
) -> None:
    """Tick worlds and (with --execute) act: evaluate, promote to paper; live goes to governance.

    Plans by default. Each idempotency key executes at most once, ever; a per-world lease keeps two
    loops off the same world. Exit: the most severe of 0 (done), 11 (waiting), 10 (blocked by
    policy), 12 (evidence missing or stale) over the actions; 75 when every world was leased by
    another loop. With --json, one JSON document per iteration (one per line). With
    checkpoint_dir set, each executing iteration also publishes a signed ledger checkpoint there.
    A world whose execution would put a strategy live (apply_live) is left untouched, reported as
    refused (exit 10), unless --allow-live is given or the config sets allow_live=true (for cron).

    One world's failure (bad data, a broken policy, a bug) is reported in that world's outcome with
    its exit code, and the loop carries on with the other worlds and later iterations; a world with
    paper or live strategies whose policy file is missing or broken is reported with exit 12
    (policy_unavailable), never skipped (--all includes it). Over worlds the exit is the most severe
    of 12, 1, 2, 4, 3, 10, 11, 0.

    Give --world W (repeatable) or --all: a loop never sweeps every world unless asked to.
    """
    from datetime import datetime, timezone

    from qmtl_cli._ids import labeller
    from qmtl_core.errors import LiveNotConfirmed, UsageError
    from qmtl_core.service._campaign import new_holder, worst_outcome

    if worlds and all_worlds:
        raise UsageError("give --world or --all, not both")
    if not worlds and not all_worlds:
        # Acting on every world must be asked for by name: a cron line missing --world never sweeps the fleet.
        raise UsageError("give --world W (repeatable) or --all", hint="e.g. --world demo-momentum --once")
    if once and interval:
        raise UsageError("give --once or --interval, not both")
    if not once and not interval:
        raise UsageError("give --once (cron) or --interval DURATION", hint="e.g. --once --execute")
    if once and max_iterations not in (None, 1):
        raise UsageError("--max-iterations does not go with --once")
    pause = _parse_interval(interval, "--interval") if interval else 0.0
    ttl = _parse_interval(lease_ttl, "--lease-ttl")
    st = state(ctx)
    client = st.client(allow_live=allow_live)
    targets = client.world_names() if all_worlds else list(dict.fromkeys(worlds or []))
    if not targets:
        raise UsageError("no worlds to run", hint="add policy files to --worlds-dir")
    holder = new_holder()
    metrics = _LoopTextfile(st, metrics_file) if metrics_file is not None else None
    publisher = _checkpoint_publisher(st.settings()) if execute else None
    limit = 1 if once else max_iterations
    iteration = 0
    code = 0
    out = console()
    while True:
        iteration += 1
        started = datetime.now(timezone.utc)
        live = None
        if not st.json and out.is_terminal:
            from rich.status import Status

            live = Status("starting", console=out)
            live.start()
        outcomes = []
        for world in targets:
            if live is not None:
                live.update(f"iteration {iteration}: {t(world)}")
            try:
                outcomes.append(client.campaign_run(world, execute=execute, holder=holder, lease_ttl_seconds=ttl))
            except LiveNotConfirmed as exc:  # this world did nothing; the others still run
                outcomes.append({"world": world, "status": "refused", "exit_code": exc.exit_code,
                                 "holder": None, "message": exc.one_line(), "actions": []})
        if live is not None:
            live.stop()
        code = worst_outcome(outcomes)
        if metrics is not None:
            metrics.write(outcomes, started)
        doc = {"iteration": iteration, "started_at": started.isoformat(), "mode": "execute" if execute else "plan",
               "holder": holder, "exit_code": code, "worlds": outcomes}
        if publisher is not None:
            published = publisher(client.audit_head())
            doc["checkpoint"] = str(published)
        if st.json:
            sys.stdout.write(json.dumps(doc, default=str) + "\n")
            sys.stdout.flush()
        else:
            for o in outcomes:
                out.print(f"[bold]{t(o['world'])}[/bold]")
                if o["status"] in ("busy", "refused"):
                    out.print(f"  {o['status']}: {t(o['message'])}")
                    continue
                if o["status"] == "error":
                    out.print(f"  error ({o.get('error')}, exit {o['exit_code']}): {o['message']}", markup=False,
                              highlight=False)
                    continue
                label = labeller(st, o["world"])
                for a in o["actions"]:
                    _print_action(out, a, label)
            word = "executed" if execute else "planned (nothing executed; add --execute to act)"
            out.print(f"iteration {iteration}: {word}; exit {code}")
        if limit is not None and iteration >= limit:
            break
        time.sleep(pause)
    raise typer.Exit(code)
