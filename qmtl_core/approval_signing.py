"""SSH-signed approvals: an approver signs the request's evidence with their own SSH key.

The signed message names what is approved, so a signature cannot be moved to another request,
strategy, world or evidence::

    qmtl-approval v1
    world: demo-momentum
    strategy: sma_10_30
    request: pr-7a5a0f631882
    evidence: 3f1c...e9 (the request's evidence hash)

It is signed in the SSHSIG format of ``ssh-keygen -Y sign -n qmtl-approval`` (so a key in
ssh-agent works, and ``ssh-keygen -Y verify`` can check it by hand) and verified with ``sshsig``
against the approver's ``ssh_key`` in the world's policy: by the gate before an approval counts,
and by ``qmtl audit verify --deep`` for every approval in the ledger.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from qmtl_core.errors import ConfigError, UsageError

if TYPE_CHECKING:
    import sshsig

NAMESPACE = "qmtl-approval"


def approval_message(*, world: str, strategy_id: str, request_id: str, evidence_hash: str) -> bytes:
    """The exact bytes an approver signs."""
    return (f"qmtl-approval v1\nworld: {world}\nstrategy: {strategy_id}\nrequest: {request_id}\n"
            f"evidence: {evidence_hash}\n").encode("utf-8")


def parse_public_key(text: str) -> sshsig.PublicKey:
    """An OpenSSH public key line (``ssh-ed25519 AAAA... [comment]``); ``ValueError`` when it is not one."""
    # Loaded here, not at the top: sshsig pulls in cryptography (about a tenth of a CLI read's start-up),
    # and only policies that name keys, and signed approvals, need it.
    import sshsig

    try:
        return sshsig.PublicKey.from_openssh_str(text.strip())
    except (ValueError, NotImplementedError) as exc:
        raise ValueError(f"not an OpenSSH public key ({str(exc) or 'bad encoding or unsupported type'})") from None


def signature_problem(public_key: str, signature: str | None, message: bytes) -> str | None:
    """Why ``signature`` is not a valid ``qmtl-approval`` signature of ``message`` by ``public_key``
    (``None`` when it is)."""
    if not signature:
        return "no signature"
    try:
        key = parse_public_key(public_key)
    except ValueError as exc:
        return f"the policy's key is unusable: {exc}"
    import sshsig  # loaded by parse_public_key above; see there why not at the top

    try:
        sshsig.verify(message, signature, [key], namespace=NAMESPACE)
    except sshsig.InvalidSignature as exc:
        text = str(exc)
        if "allowed signer" in text:
            return "signed by another key than the approver's"
        return "the signature does not verify for this request and evidence"
    except (ValueError, NotImplementedError) as exc:
        return f"not an SSH signature ({exc or 'unsupported format'})"
    return None


def sign(key: Path, message: bytes) -> str:
    """Sign ``message`` with ``ssh-keygen -Y sign`` (a private key file, or the public key of one held
    by ssh-agent); the armored signature."""
    if not key.exists():
        raise UsageError(f"--key {key}: no such file", hint="give your SSH private key, or its .pub with "
                         "the key loaded in ssh-agent")
    try:
        proc = subprocess.run(["ssh-keygen", "-Y", "sign", "-q", "-f", str(key), "-n", NAMESPACE],
                              input=message, capture_output=True, timeout=120, check=False)
    except FileNotFoundError:
        raise ConfigError("ssh-keygen is not installed", hint="install OpenSSH's client tools") from None
    except subprocess.TimeoutExpired:
        raise UsageError("ssh-keygen did not finish signing (waiting for a passphrase?)",
                         hint="load the key into ssh-agent and pass its .pub with --key") from None
    if proc.returncode != 0 or b"BEGIN SSH SIGNATURE" not in proc.stdout:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise UsageError(f"ssh-keygen could not sign with {key}: {err[-1] if err else 'failed'}",
                         hint="check the key file (or that ssh-agent holds it)")
    return proc.stdout.decode("ascii")
