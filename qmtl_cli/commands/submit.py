"""``qmtl submit`` and ``qmtl run``: hand a strategy file to a world, then feed it new bars.

Thin on purpose: load the file, call ``qmtl_core.submit`` with the invocation's client, render.
The strategy is always imported, backtested and fed in this process; with ``--server`` only its
documents (the strategy's row, evaluation runs) go to the server, so output and exit codes are the
same in both modes. The same core functions back ``Runner.submit(strategy, world=...)``.
"""

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from qmtl_cli._output import emit, styled, user_text as t
from qmtl_cli._runtime import JsonOption, command
from qmtl_cli._state import state
from qmtl_cli.commands.world_evaluate import explain_rules

if TYPE_CHECKING:
    from rich.console import Console

    from qmtl_core.sdk import Strategy

StrategyFile = Annotated[Path, typer.Argument(help="Python file defining a qmtl Strategy subclass.",
                                              show_default=False)]
WorldOpt = Annotated[str, typer.Option("--world", "-w", help="World to submit to.", show_default=False)]
ClassOpt = Annotated[Optional[str], typer.Option(
    "--strategy", "-s", help="Strategy class to use when the file defines several.")]
ParamOpt = Annotated[Optional[list[str]], typer.Option(
    "--param", "-p", help="Strategy parameter KEY=VALUE (repeatable), typed by the parameter's "
                          "default (true/false, an integer, a number, text or JSON); part of the "
                          "strategy id.")]

STATUS_STYLE = {"active": "green", "pending": "yellow", "rejected": "red"}


def _load(file: Path, strategy: str | None, params: list[str] | None) -> "Strategy":
    from qmtl_core.submit import instantiate, load_strategy_file, parse_params, pick_strategy

    module = load_strategy_file(file)
    cls = pick_strategy(module, file, strategy)
    values = parse_params(params or [], cls.defaults)  # typed by the strategy's own defaults
    return instantiate(cls, values, shown=str(file))


def _same_args(file: Path, strategy: str | None, params: list[str] | None) -> str:
    parts = [str(file)]
    if strategy:
        parts += ["--strategy", strategy]
    for p in params or []:
        parts += ["--param", p]
    return " ".join(shlex.quote(p) for p in parts)


def next_step(action: dict[str, Any] | None, *, world: str, args: str, strategy_id: str) -> dict[str, Any] | None:
    """The campaign's next action with the command that moves it along (when there is one)."""
    if action is None:
        return None
    cmd = None
    name, reason = action["action"], action["reason"]
    if name in ("evaluate", "promote_to_paper", "demote"):
        cmd = f"qmtl world campaign-loop --world {world} --once --execute"
    elif name == "observe" and action["stage"] == "paper":
        cmd = f"qmtl run {args} --world {world} --data NEW_BARS.csv"
    elif name == "request_live_approval":
        cmd = f"qmtl promote {strategy_id} --world {world}"
    elif name == "blocked" and reason == "backtest_window_incomplete":
        cmd = f"qmtl submit {args} --world {world} --data LONGER_HISTORY.csv"
    return {**action, "command": cmd}


def _domain_line(doc: dict[str, Any]) -> str:
    line = t(doc["execution_domain"])
    if doc.get("downgrade_reason"):
        line += f"  [yellow](downgraded: {t(doc['downgrade_reason'])})[/yellow]"
    elif (doc.get("context") or {}).get("requested_domain"):
        line += f"  (requested {t(doc['context']['requested_domain'])})"
    decision = doc.get("decision")
    if decision:
        line += f"  [dim]decision {t(decision['effective_mode'])}: {t(decision['reason'])}[/dim]"
    return line


def _print_next(c: "Console", step: dict[str, Any] | None) -> None:
    if step is None:
        c.print("  next      nothing (the campaign does not tick this strategy)")
        return
    c.print(t(f"  next      {step['action']} ({step['reason']}): {step['detail']}"))
    if step.get("command"):
        c.print(t(f"            {step['command']}"))


def render_submission(c: "Console", doc: dict[str, Any]) -> None:
    """Human rendering of ``qmtl submit``."""
    run, bt = doc["run"], doc["backtest"]
    style = STATUS_STYLE.get(doc["status"], "")
    c.print(f"[bold]{t(doc['strategy'])}[/bold]  {t(doc['file'] or '')}")
    c.print(f"  id        {t(doc['strategy_id'])}")
    c.print(t(f"  world     {doc['world']}  (stage {doc['stage']})"))
    c.print(f"  status    [{style}]{t(doc['status'])}[/{style}]")
    c.print(f"  domain    {_domain_line(doc)}")
    c.print(t(f"  backtest  {Path(bt['data']).name}: {bt['bars']} bars {(bt['start'] or '-')[:10]}..{(bt['end'] or '-')[:10]}, "
              f"{bt['n_trades']} trades, total return {bt['total_return']:+.1%} "
              f"(fee {bt['fee_bps']:g} bps, slippage {bt['slippage_bps']:g} bps)"))
    same = "" if run["created"] else "  (unchanged: same code and data as the latest revision)"
    c.print(f"  run       {t(run['run_id'])}#{run['revision']} {styled(run['status'])}{same}")
    _print_warnings(c, run)
    if run.get("rules"):
        c.print("  gates")
        explain_rules(c, run["rules"])
    _print_next(c, doc.get("next_step"))


def _print_warnings(c: "Console", run: dict[str, Any]) -> None:
    for warning in run.get("warnings") or ():
        c.print("  [yellow]" + t(warning) + "[/yellow]")


def render_feed(c: "Console", doc: dict[str, Any]) -> None:
    """Human rendering of ``qmtl run``."""
    bars, orders = doc["bars"], doc["orders"]
    c.print(f"[bold]{t(doc['strategy'])}[/bold]  {t(doc['strategy_id'])}")
    c.print(t(f"  world     {doc['world']}  (stage {doc['stage']})"))
    c.print(f"  domain    {_domain_line(doc)}")
    if bars["new"]:
        dup = f", {bars['duplicates']} already fed" if bars["duplicates"] else ""
        c.print(t(f"  bars      {bars['new']} new {bars['first_new'][:10]}..{bars['last_new'][:10]}{dup}; "
                  f"{bars['total_fed']} fed in all"))
        for gap in bars.get("gaps") or ():
            c.print(t(f"  gap       {gap['before'][:10]}..{gap['after'][:10]} allowed (--allow-gap): one return "
                      "across it; the bars inside can never be fed"))
    blocked = ", ".join(f"{k} {v}" for k, v in sorted(orders["blocked"].items()))
    c.print(t(f"  orders    {len(orders['emitted'])} on the last bar: {orders['published']} sent"
              + (f", blocked by the gate: {blocked}" if blocked else "")))
    run = doc.get("run")
    if run is not None:
        same = "" if run["created"] else "  (unchanged)"
        window = run.get("window") or {}
        c.print(f"  run       {t(run['run_id'])}#{run['revision']} {styled(run['status'])}{same}; "
                + t(f"{window.get('n_observations', 0)} returns {(window.get('start') or '-')[:10]}.."
                    f"{(window.get('end') or '-')[:10]}, {doc['n_trades'] if doc['n_trades'] is not None else '-'} trades"))
        _print_warnings(c, run)
        if run.get("rules"):
            explain_rules(c, run["rules"])
    if doc.get("note"):
        c.print(t(f"  note      {doc['note']}"))
    _print_next(c, doc.get("next_step"))


@command
def submit_command(
    ctx: typer.Context,
    file: StrategyFile,
    world: WorldOpt,
    strategy: ClassOpt = None,
    param: ParamOpt = None,
    data: Annotated[Optional[Path], typer.Option(
        "--data", help="Bars to backtest on (CSV/Parquet: timestamp,open,high,low,close,volume), read on "
                       "this machine, also with --server [default: <worlds dir>/data/GOOG.csv of the local "
                       "--worlds-dir, else the copy bundled with qmtl].")] = None,
    domain: Annotated[Optional[str], typer.Option(
        "--domain", help="Ask for an execution domain: shadow (live inputs, orders off) is kept; "
                         "any other request can only lower what the world decides.")] = None,
    json_output: JsonOption = False,
) -> None:
    """Submit a strategy: backtest it with the world's costs, record the run, say what happens next.

    The strategy id is a content hash of the code, parameters and DAG, so submitting unchanged code
    and data again changes nothing. Exit 0 accepted (pending or active), 10 rejected by a blocking
    gate, 2 bad input (a broken file names file:line; none or several strategies are listed).

    With --server the strategy still runs here (the server never executes strategy code); the
    world's costs and decision come from the server and the run is recorded there.
    """
    from qmtl_core.submit import submit_strategy

    instance = _load(file, strategy, param)
    st = state(ctx)
    sub = submit_strategy(st.client(), instance, world, data=data, execution_domain=domain,
                          source_file=str(file), worlds_dir=st.settings().worlds_dir)
    doc = sub.to_dict()
    doc["next_step"] = next_step(doc["next_action"], world=world, args=_same_args(file, strategy, param),
                                 strategy_id=sub.strategy_id)
    emit(doc, json_mode=state(ctx).json, human=lambda c: render_submission(c, doc))
    if sub.exit_code:
        raise typer.Exit(sub.exit_code)


@command
def run_command(
    ctx: typer.Context,
    file: StrategyFile,
    world: WorldOpt,
    data: Annotated[Path, typer.Option(
        "--data", help="New bars (CSV/Parquet) after the ones already fed.", show_default=False)],
    strategy: ClassOpt = None,
    param: ParamOpt = None,
    broker_webhook: Annotated[Optional[str], typer.Option(
        "--broker-webhook", envvar="QMTL_BROKER_WEBHOOK",
        help="Broker URL that live orders are POSTed to; used only when the world decides live "
             "(with allow_live), through the order gate.")] = None,
    domain: Annotated[Optional[str], typer.Option(
        "--domain", help="shadow: run on these bars as a mirror of the live inputs with every order "
                         "blocked, and record the strategy's shadow run (the world's campaign.shadow "
                         "window). Without it the world decides (paper or live).")] = None,
    allow_gap: Annotated[bool, typer.Option(
        "--allow-gap", help="Accept a gap in the bars (consecutive bars more than 10 stream intervals and "
                            "more than 4 days apart, counting from the last bar fed): the return across it "
                            "is booked as one return, the run shows it, and the bars inside it can never "
                            "be fed afterwards. Without it such bars are refused (exit 2).")] = False,
    json_output: JsonOption = False,
) -> None:
    """Feed new bars to a submitted strategy in the domain its world decides (or in shadow).

    Paper (dryrun): simulated fills at the next bar's open with the policy's costs; the paper run
    gets a new revision covering every paper return, so the paper campaign window advances on data.
    Live: the last bar's orders go through the order gate to --broker-webhook. Exit 0 done, 10 when
    the world has the strategy in backtest (nothing to feed) or the run fails a gate, 3 not
    submitted, 2 bad or old bars, 12 live without a broker.

    --domain shadow: the same replay in the {world}.shadow namespace; the orders are built and
    stopped by the order gate (counted as domain_shadow, never sent, whatever --broker-webhook
    says), and the shadow run gets a new revision over every shadow return, so the shadow window
    advances on data. Shadow keeps its own series of fed bars, apart from paper's.

    A gap (consecutive bars more than 10 stream intervals and more than 4 days apart) is refused
    with exit 2 naming the bar, unless --allow-gap.

    With --server the bars are read and replayed here and live orders go from here to the broker;
    the server stores the paper run and the bars fed so far.
    """
    from qmtl_core.sdk import WebhookExecutionService
    from qmtl_core.submit import feed_strategy

    hook = WebhookExecutionService(broker_webhook) if broker_webhook else None
    instance = _load(file, strategy, param)
    res = feed_strategy(state(ctx).client(), instance, world, data, source_file=str(file),
                        execution_service=hook, execution_domain=domain, allow_gap=allow_gap)
    doc = res.to_dict()
    if hook is not None and res.context.execution_domain != "live":
        doc["note"] = (f"--broker-webhook not used: the world decides {res.context.execution_domain}, "
                       "so the order gate sends nothing")
    doc["next_step"] = next_step(doc["next_action"], world=world, args=_same_args(file, strategy, param),
                                 strategy_id=res.strategy_id)
    emit(doc, json_mode=state(ctx).json, human=lambda c: render_feed(c, doc))
    if res.exit_code:
        raise typer.Exit(res.exit_code)
