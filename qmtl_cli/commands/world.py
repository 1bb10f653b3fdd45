"""``qmtl world``: world policies — validate, inspect, and (in later commands) run them."""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from qmtl_cli._output import emit, styled, table, user_text as t
from qmtl_cli._runtime import JsonOption, command
from qmtl_cli._state import state

if TYPE_CHECKING:
    from rich.console import Console

app = typer.Typer(help="Validate, inspect and run worlds (one YAML policy each).", no_args_is_help=True)


@app.command("validate")
@command
def validate(
    ctx: typer.Context,
    paths: Annotated[Optional[list[Path]], typer.Argument(
        help="Policy files to check [default: every world in --worlds-dir].", show_default=False)] = None,
    all_worlds: Annotated[bool, typer.Option("--all", help="Check every world in --worlds-dir.")] = False,
    record: Annotated[bool, typer.Option(
        "--record", help="Also record each valid world's policy in the store, as you: adopted directly, or "
                         "proposed when the world has paper or live strategies.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Check policy files; exit 2 if any is invalid. Without --record the store is not touched.

    With --record, run after editing a policy: the change is attributed to you, and for a world with
    paper or live strategies it becomes a proposal that approvers of the version in force approve
    with `qmtl world policy approve` (see `qmtl world policy status`).
    """
    from qmtl_core.errors import UsageError

    if paths and all_worlds:
        raise UsageError("give policy files or --all, not both")
    service = state(ctx).service()
    results = service.validate(paths or None)
    ok = all(r.ok for r in results)
    recorded: dict[str, dict[str, object]] = {}
    if record and ok:
        from qmtl_core.world_files import world_path

        for r in results:
            if world_path(service.settings.worlds_dir, str(r.world)).resolve() != Path(r.path).resolve():
                raise UsageError(f"--record records the worlds in --worlds-dir; {r.path} is not one",
                                 hint="copy the file into the worlds directory first")
            loaded = service.load_world(str(r.world))
            rec = loaded.proposal or loaded.record
            recorded[str(r.world)] = {"policy_version": rec.policy_version if rec else None,
                                      "status": rec.status if rec else None,
                                      "newly_recorded": loaded.newly_recorded}

    def human(c: "Console") -> None:
        for r in results:
            if r.ok:
                c.print(f"[green]ok[/green]      {t(r.path)}  (world {t(r.world)}, policy_version "
                        f"{t(r.policy_version)})")
            else:
                c.print(f"[red]invalid[/red] {t(r.message)}")
        c.print(f"{sum(r.ok for r in results)} of {len(results)} valid")
        for world, rec in recorded.items():
            if rec["newly_recorded"]:
                c.print(f"recorded {world} policy_version {rec['policy_version']}: {rec['status']}"
                        + (f" (qmtl world policy status {world})" if rec["status"] == "proposed" else ""),
                        markup=False)

    emit({"valid": ok, "results": [r.to_dict() for r in results], "recorded": recorded}, json_mode=state(ctx).json,
         human=human)
    if not ok:
        raise typer.Exit(2)


@app.command("schema")
@command
def schema(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """Print the JSON Schema of a world policy file (always JSON)."""
    import json

    from qmtl_core.policy import policy_json_schema

    typer.echo(json.dumps(policy_json_schema(), indent=2))


@app.command("list")
@command
def list_(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """List the worlds in --worlds-dir with their policy version and live settings; exit 2 when any is
    invalid (each listed with its error)."""
    doc = state(ctx).client().worlds()
    rows = doc["worlds"]

    def human(c: "Console") -> None:
        if not rows:
            c.print(f"no worlds in {t(doc['worlds_dir'])}")
            return
        c.print(table(None, ["world", "version", "allow_live", "live promotion", "rules", "status"],
                      [[r["world"], r["policy_version"], r["allow_live"], r["live_promotion"],
                        r["rules"], "ok" if r["valid"] else "invalid"] for r in rows]))
        for r in rows:
            if not r["valid"]:
                c.print(f"[red]invalid[/red] {t(r['error'])}")

    emit(doc, json_mode=state(ctx).json, human=human)
    if any(not r["valid"] for r in rows):
        raise typer.Exit(2)


@app.command("show")
@command
def show(
    ctx: typer.Context,
    world: Annotated[str, typer.Argument(help="World name (the policy file's stem).")],
    json_output: JsonOption = False,
) -> None:
    """Show a world's policy, gates and recorded policy versions."""
    data = state(ctx).client().world(world)
    doc = data["policy"]
    history = data["policy_versions"]

    def human(c: "Console") -> None:
        c.print(f"[bold]{t(data['world'])}[/bold]  policy_version {t(doc['policy_version'])}  ({t(data['path'])})")
        if doc.get("description"):
            c.print(t(doc["description"]))
        from qmtl_core.service._client import promotion_mode

        mode = promotion_mode(doc)
        c.print(t(f"allow_live: {doc['allow_live']}   live promotion: {mode}   "
                  f"periods_per_year: {doc.get('periods_per_year')}"))
        c.print(table("gates", ["id", "metric", "min", "max", "severity", "stages"],
                      [[r["id"], r["metric"], r.get("min"), r.get("max"), r.get("severity"),
                        ",".join(r.get("stages") or []) or "all"] for r in doc.get("rules", [])]))
        campaign = doc.get("campaign") or {}
        if campaign:
            c.print(table("campaign", ["stage", "settings"],
                          [[k, ", ".join(f"{a}={b}" for a, b in (v or {}).items())]
                           for k, v in campaign.items() if v]))
        c.print(table("recorded policy versions", ["version", "hash", "recorded", "by"],
                      [[h["policy_version"], h["content_hash"][:12], h["recorded_at"][:19] + "Z",
                        h["recorded_by"]] for h in history]))
        if data.get("newly_recorded"):
            c.print(f"recorded new policy version {t(doc['policy_version'])} in the store")

    emit(data, json_mode=state(ctx).json, human=human)


__all__ = ["app", "styled"]
