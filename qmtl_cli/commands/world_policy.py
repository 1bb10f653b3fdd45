"""``qmtl world policy``: governed policy changes — the version in force, proposals, approvals."""

from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from qmtl_cli._output import emit
from qmtl_cli._runtime import JsonOption, command
from qmtl_cli._state import state
from qmtl_cli.commands.world import app as world_app

if TYPE_CHECKING:
    from rich.console import Console

app = typer.Typer(help="Policy changes of a world with paper or live strategies are proposals until approved.",
                  no_args_is_help=True)
world_app.add_typer(app, name="policy")


@app.command("status")
@command
def status(ctx: typer.Context, world: Annotated[str, typer.Argument(help="World name.")],
           json_output: JsonOption = False) -> None:
    """Show the policy version in force and every open proposal: who proposed it, its diff against
    the version in force, and its approvals so far. Reads only."""
    doc = state(ctx).client().policy_status(world)

    def human(c: "Console") -> None:
        force = doc["in_force"]
        if force is None:
            c.print(f"{world}: no policy version recorded yet (an acting command or "
                    "`qmtl world validate --record` records it)", markup=False)
            return
        c.print(f"{world}: policy_version {force['policy_version']} in force (adopted "
                f"{str(force['adopted_at'] or force['recorded_at'])[:19]}Z by {force['adopted_by'] or force['recorded_by']})",
                markup=False)
        governors = ", ".join(doc["governors"]) or "none listed"
        c.print(f"approvers of changes: {governors}; required: {doc['required_approvals'] or '-'}", markup=False)
        if not doc["proposals"]:
            c.print("no open proposals")
        for p in doc["proposals"]:
            approvals = ", ".join(f"{a['approver']} ({a['reason']})" for a in p["approvals"]) or "none yet"
            c.print(f"\nproposed policy_version {p['policy_version']} by {p['recorded_by']} at "
                    f"{p['recorded_at'][:19]}Z; approvals: {approvals}", markup=False)
            c.print(p["diff"].rstrip() or "(no textual difference)", markup=False, highlight=False)
            c.print(f"approve with: qmtl world policy approve {world} --version {p['policy_version']} "
                    '--reason "..."', markup=False)

    emit(doc, json_mode=state(ctx).json, human=human)


@app.command("approve")
@command
def approve(
    ctx: typer.Context,
    world: Annotated[str, typer.Argument(help="World name.")],
    version: Annotated[int, typer.Option("--version", min=1, help="The proposed policy_version to approve.")],
    reason: Annotated[Optional[str], typer.Option("--reason", "-r", help="Why (recorded in the ledger).")] = None,
    json_output: JsonOption = False,
) -> None:
    """Approve a proposed policy version as yourself (the OS account locally, the token's actor
    remotely). You must be an approver of the version in force and not its proposer; you count once.
    The last required approval brings the version into force."""
    result: dict[str, Any] = state(ctx).client().approve_policy(world, version=version, reason=reason or "")

    def human(c: "Console") -> None:
        if result["adopted"]:
            c.print(f"policy_version {version} of {world} is in force (approved by "
                    f"{', '.join(result['approvals'])})", markup=False)
        else:
            c.print(f"approved; {len(result['approvals'])} of {result['required_approvals']} approvals for "
                    f"policy_version {version} of {world}", markup=False)

    emit(result, json_mode=state(ctx).json, human=human)
    if not result["adopted"]:
        raise typer.Exit(11)


__all__ = ["app"]
