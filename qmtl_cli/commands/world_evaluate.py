"""``qmtl world evaluate``: gates and selection over a returns or metrics file."""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from qmtl_cli._output import emit, styled, table, user_text as t
from qmtl_cli._runtime import JsonOption, command
from qmtl_cli._state import state
from qmtl_cli.commands.world import app

if TYPE_CHECKING:
    from rich.console import Console



def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def explain_rules(c: "Console", rules: list[dict[str, Any]]) -> None:
    """One line per rule: status, id, observed vs threshold in words, severity and metric source."""
    width = max((len(r["id"]) for r in rules), default=0)
    for r in rules:
        pad = " " * (4 - len(r["status"]))
        source = f", {r['source']}" if r.get("source") else ""
        c.print(f"  {styled(r['status'])}{pad}  {t(r['id']):<{width}}  {t(r['reason'])}  "
                f"[dim]({t(r['severity'])}{t(source)})[/dim]")


def explain_portfolio(c: "Console", metrics: dict[str, Any], sources: dict[str, str]) -> None:
    """The run's portfolio metrics (the book with the strategy), each with the snapshot it came from."""
    from qmtl_core.metric_names import PORTFOLIO_METRICS, is_portfolio_metric

    # In the documented order, not the store's: PostgreSQL's JSONB returns keys sorted its own way.
    order = {name: i for i, name in enumerate(PORTFOLIO_METRICS)}
    shown = {k: metrics[k] for k in sorted((k for k in metrics if is_portfolio_metric(k)),
                                           key=lambda k: (order.get(k, len(order)), k))}
    if shown:
        c.print("  portfolio with the book: " + ", ".join(
            f"{k} {_fmt(v)} ({sources.get(k, '-')})" for k, v in shown.items()), markup=False, soft_wrap=True)


def render_evaluation(c: "Console", doc: dict[str, Any], *, explain: bool) -> None:
    """Human rendering: a summary table, or per strategy and rule with ``explain``."""
    c.print(f"world [bold]{t(doc['world'])}[/bold]  stage {t(doc['stage'])}  policy_version "
            f"{t(doc['policy_version'])}  strategies {len(doc['strategies'])}  "
            f"pass {doc['counts']['pass']} / warn {doc['counts']['warn']} / fail {doc['counts']['fail']}")
    if not explain:
        rows = []
        for s in doc["strategies"]:
            failing = [r["id"] for r in s["rules"] if r["status"] != "pass"]
            rows.append([s["strategy_id"], styled(s["status"]), "yes" if s["selected"] else "no",
                         _fmt(s["metrics"].get("sharpe")), _fmt(s["metrics"].get("max_drawdown")),
                         ", ".join(failing) or "-"])
        c.print(table(None, ["strategy", "status", "selected", "sharpe", "max_drawdown",
                             "not passing"], rows))
    else:
        for s in doc["strategies"]:
            verdict = "selected" if s["selected"] else "not selected"
            c.print(f"\n[bold]{t(s['strategy_id'])}[/bold]  {styled(s['status'])}  {verdict}: "
                    f"{t(s['selection_reason'])}")
            explain_portfolio(c, s["metrics"], s.get("metric_sources") or {})
            for name, why in (s.get("unmeasured") or {}).items():
                c.print(f"  {t(name)} not measured: {t(why)}", soft_wrap=True)
            explain_rules(c, s["rules"])
    c.print(f"\nselected ({len(doc['selected'])}): {t(', '.join(doc['selected']) or 'none')}")
    for note in doc["notes"]:
        c.print(f"note: {t(note)}")


@app.command("evaluate")
@command
def evaluate(
    ctx: typer.Context,
    world: Annotated[str, typer.Argument(help="World name.")],
    returns: Annotated[Optional[Path], typer.Option(
        "--returns", help="Returns file (CSV/Parquet): wide (timestamp + one column per strategy) "
                          "or long (strategy,timestamp,return).")] = None,
    metrics: Annotated[Optional[Path], typer.Option(
        "--metrics", help="Metrics file (JSON or CSV); its values win over ones computed from "
                          "--returns.")] = None,
    stage: Annotated[str, typer.Option("--stage", help="backtest, paper or live.")] = "backtest",
    previous_active: Annotated[Optional[list[str]], typer.Option(
        "--previous-active", help="Strategies active before (comma-separated or repeated), for "
                                  "hysteresis.")] = None,
    trials: Annotated[Optional[int], typer.Option(
        "--trials", min=1, help="Number of trials for the deflated Sharpe (dsr) [default: the "
                                "cohort size].")] = None,
    strategy: Annotated[Optional[str], typer.Option(
        "--strategy", "-s", help="Record an evaluation run of this strategy (metrics sourced from the "
                                 "files, else the risk snapshot, else the previous run).")] = None,
    run_id: Annotated[Optional[str], typer.Option(
        "--run-id", help="Run id; the same id again makes a new revision [default: <stage>-<end of "
                         "the data window>].")] = None,
    record: Annotated[bool, typer.Option(
        "--record", help="Record one run per strategy in the file (vectorised cohort path).")] = False,
    explain: Annotated[bool, typer.Option(
        "--explain", help="Per strategy and rule: observed vs threshold, status, and why "
                          "selection kept or dropped it.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Gate and select strategies from a file; with --strategy or --record, record runs.

    Without --strategy this is an offline evaluation that records nothing; portfolio metrics
    (incremental_var_99, stress_loss_max ...) are then read from the world's newest trusted risk
    snapshot of --stage against its current book, never from the files. Exit 0 when no strategy
    fails a blocking rule (soft rules only warn), 10 when any does, 12 when a recorded run had
    nothing to measure (insufficient_data) or a blocking rule's portfolio metric could not be
    measured, 2 on a bad file (naming the row and column).
    """
    from qmtl_core.errors import UsageError

    from qmtl_core.service._service import check_stage

    check_stage(stage)
    if strategy is not None or record:
        if strategy is not None and record:
            raise UsageError("give --strategy or --record, not both")
        _record_runs(ctx, world, strategy=strategy, stage=stage, run_id=run_id, returns=returns,
                     metrics=metrics, explain=explain)
        return
    if run_id is not None:
        raise UsageError("--run-id needs --strategy or --record")
    active = [p.strip() for item in previous_active or [] for p in item.split(",") if p.strip()]
    from qmtl_core.datafiles import read_metrics, read_returns

    if returns is None and metrics is None:
        raise UsageError("give --returns FILE or --metrics FILE to evaluate",
                         hint="e.g. qmtl world evaluate W --returns returns.csv --explain")
    table_in = read_returns(returns) if returns is not None else None
    metrics_in = read_metrics(metrics) if metrics is not None else None
    result = state(ctx).client().evaluate_offline(world, stage=stage, returns=table_in, metrics=metrics_in,
                                                  previous_active=active, n_trials=trials)
    emit(result, json_mode=state(ctx).json, human=lambda c: render_evaluation(c, result, explain=explain))
    if result["exit_code"]:
        raise typer.Exit(result["exit_code"])


def _strategy_returns(path: Path, strategy: str) -> list:  # type: ignore[type-arg]
    from qmtl_core.datafiles import read_returns
    from qmtl_core.errors import DataFileError

    table = read_returns(path)
    if strategy in table.strategies:
        return table.series(strategy)
    if len(table.strategies) == 1:
        return table.series(table.strategies[0])
    raise DataFileError(f"{path}: no returns for strategy {strategy!r}",
                        hint="columns: " + ", ".join(table.strategies))


def _strategy_metrics(path: Path, strategy: str) -> dict[str, float]:
    from qmtl_core.datafiles import read_metrics
    from qmtl_core.errors import DataFileError

    found = read_metrics(path)
    if strategy in found:
        return found[strategy]
    if len(found) == 1:
        return next(iter(found.values()))
    raise DataFileError(f"{path}: no metrics for strategy {strategy!r}",
                        hint="strategies: " + ", ".join(sorted(found)))


def render_runs(c: "Console", revisions: list[dict[str, Any]], *, explain: bool) -> None:
    """Human rendering of recorded run revisions."""
    for run in revisions:
        c.print(f"[bold]{t(run['strategy_id'])}[/bold]  {t(run['stage'])}  run {t(run['run_id'])}"
                f"#{run['revision']}  {styled(run['status'])}"
                + ("" if run.get("created", True) else "  (unchanged: same content as the latest revision)"))
        if run["stage"] != "backtest" and run.get("evidence_class", "unverified") == "unverified":
            c.print("  evidence: unverified (supplied in a request): recorded and shown, never counted toward a "
                    "paper window or gate; paper evidence comes from qmtl run or a trusted producer's snapshot",
                    markup=False)
        window = run.get("window") or {}
        if window.get("n_observations"):
            c.print(t(f"  window {window['start'][:10]} .. {window['end'][:10]}, "
                      f"{window['n_observations']} observations ({window['source']})"))
        c.print(f"  {t(run['reason'])}")
        if explain:
            explain_portfolio(c, run.get("metrics") or {}, run.get("metric_sources") or {})
        if explain and run.get("rules"):
            explain_rules(c, run["rules"])


def _record_runs(ctx: typer.Context, world: str, *, strategy: str | None, stage: str, run_id: str | None,
                 returns: Path | None, metrics: Path | None, explain: bool) -> None:
    from qmtl_core.errors import UsageError

    client = state(ctx).client()
    if strategy is not None:
        docs = [client.record_evaluation(
            world, strategy_id=strategy, stage=stage, run_id=run_id,
            metrics=_strategy_metrics(metrics, strategy) if metrics is not None else None,
            returns=_strategy_returns(returns, strategy) if returns is not None else None)]
    else:
        if returns is None and metrics is None:
            raise UsageError("--record needs --returns FILE or --metrics FILE")
        from qmtl_core.datafiles import read_metrics, read_returns

        docs = client.evaluate_cohort(
            world, stage=stage, run_id=run_id,
            returns=read_returns(returns) if returns is not None else None,
            metrics=read_metrics(metrics) if metrics is not None else None)["runs"]
    emit(docs[0] if strategy is not None else {"runs": docs}, json_mode=state(ctx).json,
         human=lambda c: render_runs(c, docs, explain=explain or strategy is not None))
    statuses = {d["status"] for d in docs}
    if "fail" in statuses:
        raise typer.Exit(10)
    if "insufficient_data" in statuses:
        raise typer.Exit(12)


@app.command("runs")
@command
def runs(
    ctx: typer.Context,
    world: Annotated[str, typer.Argument(help="World name.")],
    strategy: Annotated[Optional[str], typer.Option("--strategy", "-s", help="Only this strategy (its id or any unique prefix).")] = None,
    stage: Annotated[Optional[str], typer.Option("--stage", help="Only this stage.")] = None,
    history: Annotated[bool, typer.Option("--history", help="Every revision, not just the latest.")] = False,
    json_output: JsonOption = False,
) -> None:
    """List evaluation runs (latest revision each; --history for all), newest first.

    --strategy may be any unique prefix of the id.
    """
    from qmtl_cli._ids import labeller, strategy_id

    strategy = strategy_id(state(ctx), world, strategy)
    docs = state(ctx).client().runs(world, strategy_id=strategy, stage=stage, history=history)["runs"]

    def human(c: "Console") -> None:
        if not docs:
            c.print("no evaluation runs match")
            return
        from qmtl_cli._sparkline import run_curves, styled_sparkline

        curves = run_curves(state(ctx), world, strategy_id=strategy, stage=stage, history=history)
        label = labeller(state(ctx), world)
        c.print(table(None, ["strategy", "stage", "run", "status", "equity", "sharpe", "max_dd", "obs", "recorded"],
                      [[label(d["strategy_id"]), d["stage"], f"{d['run_id']}#{d['revision']}", styled(d["status"]),
                        styled_sparkline(curves.get((d["strategy_id"], d["stage"], d["run_id"], d["revision"]), []),
                                         d["status"]),
                        _fmt(d["metrics"].get("sharpe")), _fmt(d["metrics"].get("max_drawdown")),
                        (d["window"] or {}).get("n_observations"), d["recorded_at"][:16] + "Z"]
                       for d in docs]))

    emit({"runs": docs}, json_mode=state(ctx).json, human=human)
