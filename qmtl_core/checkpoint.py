"""Signed ledger checkpoints: the chain's head, signed with a key the store does not hold.

The text format is the C2SP ``tlog-checkpoint`` body inside a C2SP ``signed-note``::

    qmtl/0f3c...e1          origin: this store's identity (``store_meta.store_id``)
    42                      tree size: the seq of the head entry
    3q2+7w...=              root hash: the head entry's hash (32 bytes, standard base64)

    — qmtl-ops Ab3dEf...    one signature line: key name, base64(4-byte key id || Ed25519 signature)

The signature covers the body (the three lines and their newlines). The key id is the first four
bytes of ``SHA-256(name || "\\n" || 0x01 || public key)``, and the keys are written in the note
formats too: the signer as ``PRIVATE+KEY+name+id+base64(0x01 || seed)``, the verifier as
``name+id+base64(0x01 || public key)``. Unlike a transparency log's Merkle root, the "root" here is
the head of a hash chain, so a checkpoint proves "entry N had this hash", which is all that
``audit verify --checkpoint`` needs to catch a rewritten or truncated chain.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from qmtl_core.errors import CheckpointError, CheckpointUnsigned, ConfigError

_ALG_ED25519 = b"\x01"
_DASH = "\u2014"  # the em dash that starts a signature line
_NAME = re.compile(r"^[^\s+]+$")


@dataclass(frozen=True)
class Checkpoint:
    """A claim that the ledger of ``origin`` had ``head_hash`` at entry ``size``."""

    origin: str
    size: int
    head_hash: str  # hex, as the ledger stores it

    def body(self) -> str:
        """The signed text: origin, tree size, root hash (base64), each ending in a newline."""
        root = base64.b64encode(bytes.fromhex(self.head_hash)).decode("ascii")
        return f"{self.origin}\n{self.size}\n{root}\n"


@dataclass(frozen=True)
class SignerKey:
    """An Ed25519 signing key with its note name."""

    name: str
    private: Ed25519PrivateKey

    def public_bytes(self) -> bytes:
        """The raw 32-byte public key."""
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        return self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def verifier(self) -> "VerifierKey":
        """The matching verifier."""
        return VerifierKey(self.name, Ed25519PublicKey.from_public_bytes(self.public_bytes()),
                           self.public_bytes())


@dataclass(frozen=True)
class VerifierKey:
    """An Ed25519 public key with its note name."""

    name: str
    public: Ed25519PublicKey
    raw: bytes

    @property
    def key_id(self) -> bytes:
        """The 4-byte id that names this key in signature lines."""
        return key_id(self.name, self.raw)

    def encode(self) -> str:
        """``name+hexid+base64(0x01 || key)``, the note verifier-key string."""
        return f"{self.name}+{self.key_id.hex()}+{base64.b64encode(_ALG_ED25519 + self.raw).decode('ascii')}"


def key_id(name: str, raw_public: bytes) -> bytes:
    """The signed-note key id: the first 4 bytes of SHA-256(name, newline, algorithm, key)."""
    return hashlib.sha256(name.encode("utf-8") + b"\n" + _ALG_ED25519 + raw_public).digest()[:4]


def generate(name: str) -> SignerKey:
    """A new random Ed25519 signer."""
    if not _NAME.match(name):
        raise ConfigError(f"key name {name!r} must be non-empty with no spaces or '+'")
    return SignerKey(name, Ed25519PrivateKey.generate())


def encode_signer(key: SignerKey) -> str:
    """``PRIVATE+KEY+name+hexid+base64(0x01 || seed)``."""
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    seed = key.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    kid = key_id(key.name, key.public_bytes()).hex()
    return f"PRIVATE+KEY+{key.name}+{kid}+{base64.b64encode(_ALG_ED25519 + seed).decode('ascii')}"


def _split_key(text: str, parts: int, what: str) -> list[str]:
    fields = text.strip().split("+", parts - 1)  # the base64 key material may itself hold '+'
    if len(fields) != parts:
        raise ConfigError(f"{what} is not a signed-note key ({parts} '+'-separated fields expected)",
                          hint="make one with: qmtl audit keygen")
    return fields


def _decode_key_material(b64: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{what}: key material is not base64", hint="make one with: qmtl audit keygen") from None
    if len(raw) != 33 or raw[:1] != _ALG_ED25519:
        raise ConfigError(f"{what}: not an Ed25519 key", hint="make one with: qmtl audit keygen")
    return raw[1:]


def decode_signer(text: str, *, what: str = "the checkpoint key") -> SignerKey:
    """Parse a ``PRIVATE+KEY+...`` string; a wrong or inconsistent one is a ``ConfigError``."""
    fields = _split_key(text, 5, what)
    if fields[:2] != ["PRIVATE", "KEY"]:
        raise ConfigError(f"{what} is not a private signing key", hint="point checkpoint_key at the file "
                          "qmtl audit keygen wrote (not the .pub one)")
    key = SignerKey(fields[2], Ed25519PrivateKey.from_private_bytes(_decode_key_material(fields[4], what)))
    if key_id(key.name, key.public_bytes()).hex() != fields[3]:
        raise ConfigError(f"{what}: the key id does not match the key (damaged file?)")
    return key


def decode_verifier(text: str, *, what: str = "the checkpoint verifier key") -> VerifierKey:
    """Parse a ``name+id+base64`` verifier string."""
    fields = _split_key(text, 3, what)
    raw = _decode_key_material(fields[2], what)
    key = VerifierKey(fields[0], Ed25519PublicKey.from_public_bytes(raw), raw)
    if key.key_id.hex() != fields[1]:
        raise ConfigError(f"{what}: the key id does not match the key (damaged or edited?)")
    return key


def load_signer(path: Path) -> SignerKey:
    """Read the signer from its file."""
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the checkpoint key {path}: {getattr(exc, 'strerror', None) or exc}",
                          hint="make one with: qmtl audit keygen, and set checkpoint_key") from None
    return decode_signer(text, what=str(path))


def load_verifier(value: str) -> VerifierKey:
    """A verifier given inline (``name+id+key``) or as the path of a file holding one."""
    path = Path(value).expanduser()
    if not path.exists() and "+" in value:
        return decode_verifier(value)
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the checkpoint verifier {path}: "
                          f"{getattr(exc, 'strerror', None) or exc}",
                          hint="set checkpoint_verifier to the .pub file qmtl audit keygen wrote") from None
    return decode_verifier(text, what=str(path))


def write_keypair(path: Path, name: str) -> tuple[Path, VerifierKey]:
    """Create ``path`` (the signer, mode 0600) and ``path.pub`` (the verifier); never overwrite."""
    key = generate(name)
    pub = path.with_name(path.name + ".pub")
    for target in (path, pub):
        if target.exists():
            raise ConfigError(f"{target} already exists", hint="choose another --out; a checkpoint key is "
                              "never overwritten (old checkpoints would no longer verify)")
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_new(path, encode_signer(key) + "\n", 0o600)
    verifier = key.verifier()
    _write_new(pub, verifier.encode() + "\n", 0o644)
    return pub, verifier


def _write_new(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def sign(checkpoint: Checkpoint, key: SignerKey) -> str:
    """The checkpoint as a signed note."""
    body = checkpoint.body()
    signature = key.private.sign(body.encode("utf-8"))
    kid = key_id(key.name, key.public_bytes())
    return f"{body}\n{_DASH} {key.name} {base64.b64encode(kid + signature).decode('ascii')}\n"


def parse(text: str, *, where: str) -> tuple[Checkpoint, str, list[tuple[str, bytes, bytes]]]:
    """Split a signed note into its checkpoint, its signed body and its ``(name, key id, signature)``
    lines. A malformed note is a ``CheckpointError`` naming ``where`` (exit 2)."""
    def bad(line: int, what: str) -> CheckpointError:
        return CheckpointError(f"{where}:{line}: {what}", hint="a checkpoint is the file "
                               "qmtl audit checkpoint wrote, unchanged")

    body, sep, sigs = text.partition("\n\n")
    if not sep:
        raise bad(1, "no blank line between the checkpoint and its signatures")
    lines = body.split("\n")
    if len(lines) < 3:
        raise bad(len(lines), "a checkpoint needs an origin, a tree size and a root hash")
    origin, size_text, root = lines[0], lines[1], lines[2]
    if not origin or origin != origin.strip():
        raise bad(1, "empty origin")
    if not re.fullmatch(r"0|[1-9][0-9]{0,18}", size_text):
        raise bad(2, f"tree size {size_text!r} is not a non-negative decimal")
    try:
        digest = base64.b64decode(root, validate=True)
    except (binascii.Error, ValueError):
        raise bad(3, "root hash is not base64") from None
    if len(digest) != 32:
        raise bad(3, f"root hash has {len(digest)} bytes, not 32")
    signatures = []
    first_sig_line = len(lines) + 2
    sig_lines = sigs.split("\n")
    if sig_lines[-1] == "":  # the note ends in a newline
        sig_lines.pop()
    for i, line in enumerate(sig_lines):
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != _DASH:
            raise bad(first_sig_line + i, "not a signature line ('\u2014 NAME SIGNATURE')")
        try:
            blob = base64.b64decode(parts[2], validate=True)
        except (binascii.Error, ValueError):
            raise bad(first_sig_line + i, "signature is not base64") from None
        if len(blob) < 5:
            raise bad(first_sig_line + i, "signature too short")
        signatures.append((parts[1], blob[:4], blob[4:]))
    if not signatures:
        raise bad(first_sig_line, "no signature")
    return Checkpoint(origin, int(size_text), digest.hex()), body + "\n", signatures


def verify_note(text: str, verifier: VerifierKey, *, where: str) -> Checkpoint:
    """The checkpoint in ``text`` if it carries a valid signature by ``verifier``.

    A bad or missing signature is a ``CheckpointUnsigned`` (exit 4): the file may have been forged.
    """
    checkpoint, body, signatures = parse(text, where=where)
    for name, kid, signature in signatures:
        if name != verifier.name or kid != verifier.key_id:
            continue
        try:
            verifier.public.verify(signature, body.encode("utf-8"))
        except InvalidSignature:
            raise CheckpointUnsigned(f"checkpoint {where}: the signature by {name} does not verify "
                                     "(the file was altered or forged)",
                                     hint="use a checkpoint copy kept outside the store's reach") from None
        return checkpoint
    names = ", ".join(n for n, _, _ in signatures)
    raise CheckpointUnsigned(f"checkpoint {where} is not signed by the configured key {verifier.name} "
                             f"(signed by: {names})", hint="check checkpoint_verifier")


def from_head(head: Mapping[str, Any]) -> Checkpoint:
    """The checkpoint of a ``{origin, seq, hash}`` head document (``audit_head``)."""
    return Checkpoint(str(head["origin"]), int(head["seq"]), str(head["hash"]))


def require_signer(path: Path | None) -> SignerKey:
    """The configured checkpoint signer; a ``ConfigError`` saying how to set one when there is none."""
    if path is None:
        raise ConfigError("no checkpoint key is configured",
                          hint="make one with qmtl audit keygen --out FILE, then qmtl config set checkpoint_key FILE "
                               "(or QMTL_CHECKPOINT_KEY)")
    return load_signer(path)


def require_verifier(value: str | None) -> VerifierKey:
    """The configured checkpoint verifier."""
    if not value:
        raise ConfigError("no checkpoint verifier key is configured",
                          hint="pass --verifier, or qmtl config set checkpoint_verifier FILE.pub "
                               "(or QMTL_CHECKPOINT_VERIFIER)")
    return load_verifier(value)


def read_claims(paths: Sequence[Path], verifier: VerifierKey) -> list[dict[str, Any]]:
    """Each checkpoint file's claim ``{label, origin, seq, hash}``, its signature checked against
    ``verifier``. An unreadable or malformed file exits 2, a bad signature 4, naming the file."""
    claims = []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"cannot read checkpoint {path}: {getattr(exc, 'strerror', None) or exc}") from None
        cp = verify_note(text, verifier, where=str(path))
        claims.append({"label": str(path), "origin": cp.origin, "seq": cp.size, "hash": cp.head_hash})
    return claims


def write_new(path: Path, text: str) -> Path:
    """Write a checkpoint to a new file (never over an existing one: a witness is not rewritten)."""
    try:
        _write_new(path, text, 0o644)
    except FileExistsError:
        raise CheckpointError(f"{path} already exists", hint="checkpoints are never overwritten; "
                              "choose another --out") from None
    except OSError as exc:
        raise CheckpointError(f"cannot write {path}: {exc.strerror}") from None
    return path


def publish(head: Mapping[str, Any], signer: SignerKey, directory: Path) -> Path:
    """Make sure ``directory/<store id>-<seq>.checkpoint`` holds a signed checkpoint of ``head``: write it
    unless one for that seq is already there (append-only: nothing is ever rewritten). Returns the file."""
    cp = from_head(head)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{cp.origin.rsplit('/', 1)[-1]}-{cp.size:012d}.checkpoint"
    try:
        _write_new(path, sign(cp, signer), 0o644)
    except FileExistsError:  # published already (by this or another process) for this head
        pass
    return path
