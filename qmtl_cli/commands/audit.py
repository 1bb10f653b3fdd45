"""``qmtl audit``: read and verify the hash-chained ledger; sign and check its checkpoints."""

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from qmtl_cli._output import emit, table, user_text as t
from qmtl_cli._runtime import JsonOption, command
from qmtl_cli._state import state

app = typer.Typer(help="Read and verify the audit ledger.", no_args_is_help=True)


@app.command("log")
@command
def log(
    ctx: typer.Context,
    world: Annotated[Optional[str], typer.Option("--world", "-w", help="Only this world.")] = None,
    since: Annotated[Optional[str], typer.Option(
        "--since", help="Only entries at or after this time (ISO-8601, e.g. 2026-01-31T00:00Z).")] = None,
    kind: Annotated[Optional[str], typer.Option(
        "--kind", help="Only this kind; '*' is a wildcard (e.g. 'policy.*').")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", "-n", min=1,
                                                 help="Only the newest N entries.")] = None,
    json_output: JsonOption = False,
) -> None:
    """Show ledger entries, oldest first: who did what, to which world, and why."""
    from qmtl_core.timeutil import parse_instant

    since_at = parse_instant(since, what="--since") if since else None
    doc = state(ctx).client().audit_log(world=world, since=since_at, kind=kind, limit=limit)
    entries = doc["entries"]
    emit(doc, json_mode=state(ctx).json,
         human=lambda c: c.print(table(None, ["seq", "time", "actor", "world", "kind", "subject", "reason"],
                                       [[e["seq"], e["ts"][:19] + "Z", e["actor"], e["world"], e["kind"],
                                         e["subject"], e["reason"]] for e in entries]))
         if entries else c.print("no ledger entries match"))


@app.command("verify")
@command
def verify(
    ctx: typer.Context,
    checkpoint: Annotated[Optional[list[Path]], typer.Option(
        "--checkpoint", "-c", help="A signed checkpoint file the chain must contain (repeatable); exit 4 "
        "naming it when the chain was rewritten or truncated since.")] = None,
    verifier: Annotated[Optional[str], typer.Option(
        "--verifier", help="Checkpoint public key (name+id+key) or its .pub file [default: checkpoint_verifier "
        "setting, QMTL_CHECKPOINT_VERIFIER].")] = None,
    deep: Annotated[bool, typer.Option(
        "--deep", help="Also rebuild approvals, activation sets, stages, halts, tokens and recorded policy "
        "versions from the ledger alone, re-verify each approval signature against the key in the policy "
        "version in force when it was made, and exit 4 on any difference with the tables.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Check the ledger's hash chain; exit 4 naming the first broken entry, checkpoint or difference.

    Example: qmtl audit verify --checkpoint /witness/qmtl-000000000042.checkpoint --deep
    """
    from qmtl_core.checkpoint import read_claims, require_verifier

    st = state(ctx)
    claims = read_claims(checkpoint, require_verifier(verifier or st.settings().checkpoint_verifier)) \
        if checkpoint else []
    result = st.client().audit_verify(checkpoints=claims, deep=deep)
    extra = (f", {len(claims)} checkpoint(s) held" if claims else "") + (", tables match the ledger" if deep else "")
    emit(result, json_mode=st.json,
         human=lambda c: c.print(f"[green]ok[/green]: {result['entries']} ledger entries verify{extra}"))


@app.command("checkpoint")
@command
def checkpoint(
    ctx: typer.Context,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Write the checkpoint to this new file (never overwritten) instead of stdout.")] = None,
    json_output: JsonOption = False,
) -> None:
    """Sign the ledger's current head (origin, size, hash) with the checkpoint key.

    The key is read from the checkpoint_key setting (QMTL_CHECKPOINT_KEY); keep copies of the
    checkpoints where the database's users cannot write (see README "Audit ledger").

    Example: qmtl audit checkpoint --out /witness/$(date +%s).checkpoint
    """
    from qmtl_core.checkpoint import from_head, require_signer, sign, write_new

    st = state(ctx)
    signer = require_signer(st.settings().checkpoint_key)
    head = st.client().audit_head()
    note = sign(from_head(head), signer)
    if out is not None:
        write_new(out, note)
    doc = {**head, "key": signer.name, "note": note, "path": str(out) if out else None}
    emit(doc, json_mode=st.json,
         human=lambda c: c.print(t(f"wrote checkpoint of entry {head['seq']} to {out}")) if out
         else sys.stdout.write(note))


@app.command("keygen")
@command
def keygen(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", "-o", help="The new private key file (mode 0600); the public "
                                      "key goes to FILE.pub. Neither is ever overwritten.")],
    name: Annotated[str, typer.Option("--name", help="Key name shown in signature lines.")] = "qmtl-checkpoint",
    json_output: JsonOption = False,
) -> None:
    """Make an Ed25519 key pair for signing ledger checkpoints.

    Keep the private key away from the database's users (another account, or the cron host), then:
    qmtl config set checkpoint_key FILE and hand FILE.pub to whoever verifies.

    Example: qmtl audit keygen --out /etc/qmtl/checkpoint.key --name acme-qmtl
    """
    from qmtl_core.checkpoint import write_keypair

    pub, verifier = write_keypair(out, name)
    doc = {"key": str(out), "public_key": str(pub), "verifier": verifier.encode()}
    emit(doc, json_mode=state(ctx).json,
         human=lambda c: c.print(t(f"wrote {out} (private, 0600) and {pub}") + "\n" + t(f"verifier: {verifier.encode()}")))
