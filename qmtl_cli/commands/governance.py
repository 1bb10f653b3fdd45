"""Governance commands: ``qmtl promote|approve|reject`` and ``qmtl world decision|rollback|halt|resume|demote|history``."""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from qmtl_cli._output import emit, table, user_text as t
from qmtl_cli._runtime import AllowLiveOption, JsonOption, command
from qmtl_cli._state import state
from qmtl_cli.commands.world import app as world_app

if TYPE_CHECKING:
    from rich.console import Console

ReasonOption = Annotated[Optional[str], typer.Option("--reason", "-r", help="Why (recorded in the ledger).")]
#: Every decision and kill-switch move is recorded with its reason: the option is required (and marked so).
RequiredReason = Annotated[str, typer.Option("--reason", "-r", help="Why (recorded in the ledger).",
                                             show_default=False)]


def render_outcome(c: "Console", outcome: dict[str, Any]) -> None:
    """A promotion/approval outcome with every gate reason."""
    colour = {"applied": "green", "pending": "yellow", "planned": "cyan", "rejected": "magenta"}.get(
        outcome["status"], "red")
    c.print(f"[{colour}]{t(outcome['status'])}[/{colour}]  {t(outcome['strategy_id'])} in {t(outcome['world'])}: "
            f"{t(outcome['message'])}")
    gate = outcome.get("gate")
    if gate is not None:
        for r in gate["reasons"]:
            c.print(f"  - {t(r['code'])}: {t(r['detail'])}")
        approvals = gate.get("valid_approvals") or []
        c.print(f"  evidence {t(gate['evidence_hash'][:16])}"
                + (f"; approvals counted: {t(', '.join(approvals))}" if approvals else ""))
    for n in outcome.get("notifications", []):
        if not n["ok"]:
            c.print(f"  notification {t(n['event'])} not delivered: {t(n['error'])} (recorded in the ledger)")


def _number(value: Any, percent: bool) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value * 100:.2f}%" if percent else f"{value:.4g}"
        # never "-0.0": a value that rounds to zero prints without its sign
        return text[1:] if text.startswith("-") and float(text.rstrip("%")) == 0 else text
    return str(value)


def _render_comparison(c: "Console", comparison: dict[str, Any]) -> None:
    """Later stages zoomed against the backtest's same-length tail, and return quantiles per stage."""
    from qmtl_cli._sparkline import sparkline

    zoomed = comparison.get("zoomed") or []
    if zoomed:
        c.print("\n[bold]later stages zoomed[/bold] (growth of 1; the backtest's last n returns beside each)")
    for z in zoomed:
        tail = (f"backtest last {z['backtest_tail_n']} {sparkline(z['backtest_tail_equity'], 24)} "
                f"{_number(z['backtest_tail_total_return'], True)}" if z["backtest_tail_n"] else "no backtest returns")
        c.print(f"  {t(z['stage']):<7} {z['n']:>4} obs {sparkline(z['equity'], 24)} {_number(z['total_return'], True)}"
                f"   vs {tail}", highlight=False)
    dist = comparison.get("distributions") or {}
    if len(dist) > 1:
        names = list(next(iter(dist.values()))["quantiles"])
        c.print(table("\nreturn distributions (quantiles per period, same units)", ["stage", "n", *names],
                      [[t(stage), str(d["n"]), *[_number(d["quantiles"][q], True) for q in names]]
                       for stage, d in dist.items()]))


def render_approval_view(c: "Console", view: dict[str, Any]) -> None:
    """``qmtl promote --show``: the approver's page, in the order they need it."""
    from qmtl_core.timeutil import human_duration

    req = view["request"]
    approvals = [a for a in req.get("approvals") or [] if a["decision"] == "approve"]
    c.print(f"[bold]{t(req['request_id'])}[/bold]  {t(req['strategy_id'])} in {t(req['world'])}: {t(req['status'])}, "
            f"requested by {t(req['requester'])} "
            f"{t(human_duration(req['age_seconds']))} ago ({t(req.get('reason') or 'no reason')}); "
            f"approvals {len(approvals)}/{t(req.get('required_approvals') or '?')}")
    for a in approvals:
        c.print(f"  approved by {t(a['approver'])}: {t(a['reason'])}")
    c.print("\n[bold]live gate[/bold]" + ("  (every condition holds now)" if view["allowed_now"] else ""))
    for row in view["checklist"]:
        mark = "[green]✓[/green]" if row["ok"] else "[red]✗[/red]"
        c.print(f"  {mark} {t(row['condition'])}" + (f": {t(row['detail'])}" if row["detail"] else ""))
    stages = view["stages"]
    if stages:
        c.print(table("\nstages side by side (same metrics, same units)", ["metric", *stages],
                      [[r["label"], *[_number(r["values"].get(s), r["percent"]) for s in stages]]
                       for r in view["side_by_side"]]))
    for caveat in view["caveats"]:
        c.print(f"  [yellow]caveat[/yellow] {t(caveat)}")
    _render_comparison(c, view.get("comparison") or {})
    sample = view.get("small_sample")
    if sample:
        need = sample["min_track_record_length"]
        verdict = ("no track record is long enough: the observed Sharpe is not above 0" if need is None else
                   f"needs {need} observations, has {sample['n_observations']}"
                   + ("" if sample["enough"] else " [yellow](too few to tell skill from luck)[/yellow]"))
        c.print(f"\n[bold]small sample[/bold]  paper Sharpe {sample['sharpe_per_period']:.3f} per period: {verdict}")
        c.print(f"  minimum track record length, {t(sample['source'])}")
    risk = view["risk"]
    c.print("\n[bold]risk evidence[/bold]")
    snap = risk.get("snapshot")
    if snap is None:
        c.print("  [red]no risk snapshot[/red] (the gate fails closed)")
    else:
        fresh = snap.get("freshness") or {}
        c.print(f"  snapshot {t(snap['version'])} as_of {t(snap['as_of'])}: {t(fresh.get('status'))}"
                + (f" ({t(fresh.get('reason'))}: {t(fresh.get('detail'))})" if fresh.get("reason") else ""))
        c.print(f"  weight {t(_number(risk.get('weight'), False))}")
        for other, cor in (risk.get("correlation_with_live") or {}).items():
            c.print(f"  correlation with live {t(other)}: {t(_number(cor['correlation'], False))} "
                    f"over {cor['common_points']} common returns")
        if not risk.get("correlation_with_live"):
            c.print("  nothing else is live: no correlation to check")
        for key in ("stress", "constraints"):
            if risk.get(key):
                c.print(f"  {key}: " + t(", ".join(f"{k}={v}" for k, v in risk[key].items())))
    costs = risk.get("costs") or {}
    c.print("  costs: " + (t(", ".join(f"{k}={v}" for k, v in costs.items())) or "none in the policy"))
    pol = view["policy"]
    if pol["changed"]:
        c.print(f"\n[yellow]policy changed[/yellow] since the request opened: version {t(pol['version_at_request'])} "
                f"-> {t(pol['version_now'])}" + ("" if pol.get("diff") else " (the earlier version is not recorded)"))
        for line in (pol.get("diff") or "").splitlines():
            style = "green" if line.startswith("+") and not line.startswith("+++") else (
                "red" if line.startswith("-") and not line.startswith("---") else "dim" if line.startswith("@@") else "")
            c.print(f"[{style}]{t(line)}[/{style}]" if style else t(line),
                    soft_wrap=True, highlight=False)
    ev = view["evidence"]
    c.print(f"\nevidence {t(ev['request'])}" + ("" if ev["unchanged"] else
                                                  f"\n[red]changed[/red] now {t(ev['now'])}: approvals on the old "
                                                  "evidence no longer count"))


def _finish(ctx: typer.Context, outcome: dict[str, Any]) -> None:
    emit(outcome, json_mode=state(ctx).json, human=lambda c: render_outcome(c, outcome))
    if outcome["exit_code"]:
        raise typer.Exit(outcome["exit_code"])


def promote(
    ctx: typer.Context,
    strategy: Annotated[Optional[str], typer.Argument(help="Strategy id (or any unique prefix) to take live.")] = None,
    world: Annotated[Optional[str], typer.Option("--world", "-w", help="World name.")] = None,
    reason: ReasonOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show every block reason; write nothing.")] = False,
    list_: Annotated[bool, typer.Option("--list", help="List pending requests with age and approvals.")] = False,
    show: Annotated[Optional[str], typer.Option(
        "--show", help="Open request REQ (id or unique prefix) as an approver reads it: the live-gate "
                       "checklist, stages side by side, the small-sample caveat, risk evidence, policy "
                       "change, evidence hash.", show_default=False)] = None,
    all_: Annotated[bool, typer.Option("--all", help="With --list: closed requests too.")] = False,
    allow_live: AllowLiveOption = False,
    at: Annotated[Optional[str], typer.Option("--at", help="With --list: the requests as they stood at a moment "
                                              "(ISO-8601 with zone): only approvals and decisions made by then.")] = None,
    json_output: JsonOption = False,
) -> None:
    """Ask to take a paper strategy live (or --list open requests).

    The world's governance decides: manual_approval opens a request bound to the evidence (exit
    11 until approved), auto_apply applies when every gate passes, and a block names every reason
    (exit 10, or 12 when evidence is missing or stale). Blocks are recorded in the ledger. A
    promotion that would apply at once needs --allow-live.
    """
    from qmtl_core.errors import UsageError
    from qmtl_core.timeutil import parse_instant

    client = state(ctx).client(allow_live=allow_live)
    if at is not None and not list_:
        raise UsageError("--at goes with --list", hint="e.g. qmtl promote --list --at 2026-01-31T00:00Z")
    if show is not None:
        if strategy is not None or list_:
            raise UsageError("--show takes a request id, not a strategy or --list")
        from qmtl_cli._ids import request_id

        view = client.approval_view(request_id(state(ctx), show))
        emit(view, json_mode=state(ctx).json, human=lambda c: render_approval_view(c, view))
        return
    if list_:
        if strategy is not None:
            raise UsageError("--list takes no strategy")
        listing = client.promotions(world=world, include_closed=all_,
                                    at=parse_instant(at, what="--at") if at else None)
        rows = listing["requests"]
        from qmtl_core.report import request_report  # the report an approver reads: path, current or stale

        for r in rows:
            if r["status"] == "pending" and at is None:
                r["report"] = request_report(state(ctx).settings().home, r["world"], r["strategy_id"],
                                             r["evidence_hash"])

        def human(c: "Console") -> None:
            if not rows:
                c.print("no pending promotion requests" if not all_ else "no promotion requests")
                return
            from qmtl_cli._ids import labeller
            from qmtl_core.timeutil import human_duration

            labels = {w: labeller(state(ctx), w) for w in {r["world"] for r in rows}}
            c.print(table(None, ["request", "world", "strategy", "status", "age", "approvals", "requester",
                                 "evidence"],
                          [[r["request_id"], r["world"], labels[r["world"]](r["strategy_id"]), r["status"],
                            human_duration(r["age_seconds"]),
                            f"{sum(1 for a in r['approvals'] if a['decision'] == 'approve')}/"
                            f"{r.get('required_approvals') or '?'}", r["requester"], r["evidence_hash"][:12]]
                           for r in rows]))
            for r in rows:
                if r.get("blocked_reason"):
                    c.print(f"blocked {r['request_id']}: {r['blocked_reason']} (since {r['blocked_at'][:19]}Z)",
                            markup=False)
                if "report" in r:
                    rep = r["report"]
                    how = "" if rep["state"] == "current" else f" (write it: {rep['command']})"
                    c.print(t(f"report {r['request_id']}: {rep['path']} [{rep['state']}]{how}"))

        emit(listing, json_mode=state(ctx).json, human=human)
        return
    if strategy is None or world is None:
        raise UsageError("give STRATEGY and --world W (or --list)", hint="e.g. qmtl promote sma_10_30 --world demo")
    from qmtl_cli._ids import strategy_id

    _finish(ctx, client.promote(world, strategy_id(state(ctx), world, strategy) or strategy, reason=reason,
                                dry_run=dry_run))


def approve(
    ctx: typer.Context,
    request: Annotated[str, typer.Argument(help="Request id or any unique prefix (qmtl promote --list).")],
    reason: RequiredReason,
    allow_live: AllowLiveOption = False,
    key: Annotated[Optional[Path], typer.Option(
        "--key", help="Sign the approval with this SSH key (ssh-keygen -Y sign, namespace qmtl-approval): "
        "a private key file, or the .pub of a key held by ssh-agent. Required where the world sets "
        "require_signatures.")] = None,
    json_output: JsonOption = False,
) -> None:
    """Approve a promotion request as yourself (the OS user locally, the token's actor remotely).

    You must be a listed approver, not the requester or the strategy's submitter; your approval
    counts once and only for the evidence the request was opened on (changed evidence voids the
    request: exit 4). The last required approval applies the promotion if every gate passes; that
    approval needs --allow-live (without it nothing is recorded and the command exits 10).
    With --key the approval carries your SSH signature over the request's world, strategy, id and
    evidence hash; it counts only if it verifies against your ssh_key in the policy.

    Example: qmtl approve pr-7a5a0f631882 --reason "drawdown within budget" --key ~/.ssh/id_ed25519
    """
    from qmtl_cli._ids import request_id

    client = state(ctx).client(allow_live=allow_live)
    request = request_id(state(ctx), request)  # the full id: what the signature and the ledger name
    signature = None
    if key is not None:
        from qmtl_core.approval_signing import approval_message, sign
        from qmtl_core.errors import RequestNotFound

        found = [r for r in client.promotions(include_closed=True)["requests"] if r["request_id"] == request]
        if not found:
            raise RequestNotFound(f"no promotion request {request!r}", hint="qmtl promote --list shows open requests")
        r = found[0]
        signature = sign(key.expanduser(), approval_message(world=r["world"], strategy_id=r["strategy_id"],
                                                            request_id=request, evidence_hash=r["evidence_hash"]))
    _finish(ctx, client.decide(request, decision="approve", reason=_required_reason(reason, "approve"),
                               signature=signature))


def reject(
    ctx: typer.Context,
    request: Annotated[str, typer.Argument(help="Request id or any unique prefix (qmtl promote --list).")],
    reason: RequiredReason,
    json_output: JsonOption = False,
) -> None:
    """Reject a promotion request as yourself (same rules as approve); the request closes."""
    from qmtl_cli._ids import request_id

    _finish(ctx, state(ctx).client().decide(request_id(state(ctx), request), decision="reject",
                                            reason=_required_reason(reason, "reject")))


def _required_reason(reason: str | None, what: str) -> str:
    """A non-blank reason (the option is required; a blank one says nothing in the ledger)."""
    from qmtl_core.errors import UsageError

    if not reason or not reason.strip():
        raise UsageError(f"{what} needs --reason", hint='e.g. --reason "broker outage"')
    return reason.strip()


@world_app.command("decision")
@command
def decision(
    ctx: typer.Context,
    world: Annotated[str, typer.Argument(help="World name.")],
    strategy: Annotated[Optional[str], typer.Option("--strategy", "-s", help="Only this strategy (its id or any unique prefix).")] = None,
    json_output: JsonOption = False,
) -> None:
    """Show decision envelopes: in which domain each strategy may execute now, and why."""
    from qmtl_cli._ids import labeller, strategy_id

    data = state(ctx).client().decisions(world, strategy_id=strategy_id(state(ctx), world, strategy))
    docs = data["decisions"]

    def human(c: "Console") -> None:
        if not docs:
            c.print(f"world {t(world)} has no strategies")
            return
        label = labeller(state(ctx), world)
        c.print(table(None, ["strategy", "mode", "domain", "reason", "as_of", "ttl", "etag", "policy"],
                      [[label(d["strategy_id"]), d["effective_mode"], d["execution_domain"], d["reason"],
                        str(d["as_of"])[:19] + "Z", f"{d['ttl_sec']}s", str(d["etag"])[:12], d["policy_version"]]
                       for d in docs]))

    emit(data, json_mode=state(ctx).json, human=human)


def _print_reentries(c: "Console", result: dict[str, Any]) -> None:
    for r in result.get("reentries") or []:
        c.print(f"  {r['message']}", markup=False, highlight=False)


@world_app.command("rollback")
@command
def rollback(ctx: typer.Context, world: Annotated[str, typer.Argument(help="World name.")],
             reason: RequiredReason, allow_live: AllowLiveOption = False,
             json_output: JsonOption = False) -> None:
    """Restore the previous activation set (as a new set; stages follow it).

    Rollback never makes a strategy live on its own: a strategy that was live in the restored set
    but is not live now is restored to paper, and a promotion request is opened for it (approvers
    or, under auto_apply, the campaign loop decide it through the usual gate). When the restored set
    keeps a strategy live this needs --allow-live.
    """
    result = state(ctx).client(allow_live=allow_live).rollback(world, reason=_required_reason(reason, "rollback"))

    def human(c: "Console") -> None:
        c.print(t(f"rolled back {world} to activation set {result['restored_set']} (now set "
                  f"{result['set_version']}); "
                  + (", ".join(f"{k} -> {v or 'backtest'}" for k, v in result["changed"].items())
                     or "no stage changed")))
        _print_reentries(c, result)

    emit(result, json_mode=state(ctx).json, human=human)


@world_app.command("halt")
@command
def halt(ctx: typer.Context, world: Annotated[str, typer.Argument(help="World name.")],
         reason: RequiredReason, json_output: JsonOption = False) -> None:
    """Kill switch: every live strategy goes back to paper and every decision becomes compute-only,
    until resume. Needs only the world id: works when the policy file is missing or broken."""
    result = state(ctx).client().set_halted(world, halted=True, reason=_required_reason(reason, "halt"))

    def human(c: "Console") -> None:
        if not result["changed"]:
            c.print(f"{t(world)} was already halted")
            return
        was = result.get("was_live") or []
        c.print(f"[red]halted[/red] {t(world)}" + (t(f"; back to paper: {', '.join(was)}") if was else ""))

    emit(result, json_mode=state(ctx).json, human=human)


@world_app.command("resume")
@command
def resume(ctx: typer.Context, world: Annotated[str, typer.Argument(help="World name.")],
           reason: RequiredReason, allow_live: AllowLiveOption = False,
           json_output: JsonOption = False) -> None:
    """Lift the kill switch (needs --allow-live). What was live at the halt stays in paper, with a
    promotion request opened for each: resuming never makes a strategy live on its own."""
    result = state(ctx).client(allow_live=allow_live).set_halted(world, halted=False,
                                                                 reason=_required_reason(reason, "resume"))

    def human(c: "Console") -> None:
        c.print(f"resumed {t(world)}" if result["changed"] else f"{t(world)} was not halted")
        _print_reentries(c, result)

    emit(result, json_mode=state(ctx).json, human=human)


@world_app.command("demote")
@command
def demote(ctx: typer.Context, world: Annotated[str, typer.Argument(help="World name.")],
           strategy: Annotated[str, typer.Argument(help="Strategy id (or any unique prefix).")],
           reason: RequiredReason,
           to: Annotated[str, typer.Option("--to", help="paper, backtest or retired.")] = "paper",
           json_output: JsonOption = False) -> None:
    """Take a strategy down a stage (default live → paper); other strategies are untouched."""
    from qmtl_cli._ids import strategy_id

    strategy = strategy_id(state(ctx), world, strategy) or strategy
    result = state(ctx).client().demote(world, strategy, to=to, reason=_required_reason(reason, "demote"))
    emit(result, json_mode=state(ctx).json, human=lambda c: c.print(
        t(f"demoted {strategy} to {to} in {world} (activation set {result['set_version']})")))


@world_app.command("history")
@command
def history(
    ctx: typer.Context,
    world: Annotated[str, typer.Argument(help="World name.")],
    at: Annotated[Optional[str], typer.Option("--at", help="A moment (ISO-8601 with zone, e.g. "
                                                          "2026-01-31T00:00Z) [default: now].")] = None,
    json_output: JsonOption = False,
) -> None:
    """What was live (and paper) then, and why: from the hash-chained ledger."""
    from qmtl_core.timeutil import parse_instant

    from qmtl_cli._ids import labeller

    doc = state(ctx).client().history(world, at=parse_instant(at, what="--at") if at else None)

    def human(c: "Console") -> None:
        label = labeller(state(ctx), world)
        c.print(f"[bold]{t(world)}[/bold] at {t(doc['at'] or 'now')}" + ("  [red]HALTED[/red]" if doc["halted"] else ""))
        if not doc["activations"]:
            c.print("nothing was paper or live")
        for a in doc["activations"]:
            why = a["why"] or {}
            approvals = ", ".join(f"{t(x['actor'])} ({t(x['reason'])})" for x in why.get("approvals", []))
            marker = "[green]●[/green]" if a["stage"] == "live" else "○"
            c.print(f"  {marker} {t(label(a['strategy_id']))}: {t(a['stage'])} "
                    f"(weight {a['weight']:.4g}, run {t(a['run_id'])}) since {t(a['activated_at'][:19])}Z")
            if why:
                c.print(f"      {t(why['kind'])} #{why['seq']} by {t(why['actor'])}: {t(why['reason'])}"
                        + (f"; approved by {approvals}" if approvals else ""))

    emit(doc, json_mode=state(ctx).json, human=human)


def register(app: typer.Typer) -> None:
    """Add the top-level governance commands to the root app."""
    app.command("promote")(command(promote))
    app.command("approve")(command(approve))
    app.command("reject")(command(reject))


__all__ = ["register", "Any"]
