"""``WorldService``: the one facade through which the CLI and the HTTP server read and change state."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qmtl_core.canonical import content_hash
from qmtl_core.config import Settings
from qmtl_core.errors import QmtlError
from qmtl_core.timeutil import utcnow
from qmtl_core.world_files import world_files, world_path

if TYPE_CHECKING:
    from qmtl_core.ledger import LedgerEntry, VerifyResult
    from qmtl_core.policy import WorldPolicy
    from qmtl_core.service._policies import PolicyRecord
    from qmtl_core.store import Store


@dataclass
class LoadedWorld:
    """A world's validated policy, where it came from, and its recorded version."""

    policy: "WorldPolicy"
    path: Path
    content_hash: str
    record: "PolicyRecord | None" = None
    newly_recorded: bool = False

    @property
    def world_id(self) -> str:
        """The world's name."""
        return self.policy.world


@dataclass
class ValidationResult:
    """Outcome of validating one policy file."""

    path: str
    ok: bool
    world: str | None = None
    policy_version: int | None = None
    error: dict[str, Any] | None = None
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"path": self.path, "ok": self.ok, "world": self.world,
                "policy_version": self.policy_version, "error": self.error}


@dataclass
class WorldSummary:
    """One row of ``qmtl world list``."""

    world: str
    path: str
    ok: bool
    policy: "WorldPolicy | None" = None
    record: "PolicyRecord | None" = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def policy_hash(policy: "WorldPolicy") -> str:
    """Content hash of a policy's meaning (comments and formatting do not count)."""
    return content_hash(policy.model_dump(mode="json"))


class WorldService:
    """Facade over policies, store and ledger; the only place state changes happen."""

    def __init__(self, settings: Settings, *, store: "Store | None" = None,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.settings = settings
        self._store = store
        self.clock = clock

    # -- plumbing --------------------------------------------------------------------------------
    @property
    def store(self) -> "Store":
        """The store, opened (and migrated) on first use."""
        if self._store is None:
            from qmtl_core.store import open_store

            self._store = open_store(self.settings.store_url)
        return self._store

    @property
    def actor(self) -> str:
        """Who is acting (the OS user in local mode)."""
        return self.settings.identity()

    def close(self) -> None:
        """Release the store's connections."""
        if self._store is not None:
            self._store.dispose()

    # -- policies --------------------------------------------------------------------------------
    def validate(self, paths: Sequence[Path] | None = None) -> list[ValidationResult]:
        """Validate policy files (all worlds when ``paths`` is empty); never touches the store."""
        from qmtl_core.policy import load_policy_file

        targets = list(paths) if paths else world_files(self.settings.worlds_dir)
        results = []
        for path in targets:
            try:
                policy = load_policy_file(path)
            except QmtlError as exc:
                results.append(ValidationResult(str(path), False, error=exc.to_dict(),
                                                message=exc.one_line()))
            else:
                results.append(ValidationResult(str(path), True, policy.world, policy.policy_version))
        return results

    def load_world(self, world: str, *, record: bool = True) -> LoadedWorld:
        """Load and validate a world's policy; when its content is new, record a policy version."""
        from qmtl_core.policy import load_policy_file

        path = world_path(self.settings.worlds_dir, world)
        policy = load_policy_file(path)
        loaded = LoadedWorld(policy, path, policy_hash(policy))
        if record:
            self._record(loaded)
        return loaded

    def _record(self, loaded: LoadedWorld) -> None:
        from qmtl_core.service._policies import record_policy

        try:
            text = loaded.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):  # validated a moment ago; a race with an editor
            text = ""
        with self.store.write() as conn:
            loaded.record, loaded.newly_recorded = record_policy(
                conn, world_id=loaded.world_id, policy_version=loaded.policy.policy_version,
                content_hash=loaded.content_hash, document=loaded.policy.model_dump(mode="json"),
                source_path=str(loaded.path), source_text=text, actor=self.actor, now=self.clock())

    def list_worlds(self) -> list[WorldSummary]:
        """Every world file with its validity and recorded version (valid ones are recorded)."""
        from qmtl_core.policy import load_policy_file

        out = []
        for path in world_files(self.settings.worlds_dir):
            try:
                policy = load_policy_file(path)
            except QmtlError as exc:
                out.append(WorldSummary(path.stem, str(path), False, error=exc.one_line()))
                continue
            loaded = LoadedWorld(policy, path, policy_hash(policy))
            self._record(loaded)
            out.append(WorldSummary(policy.world, str(path), True, policy, loaded.record))
        return out

    def policy_history(self, world: str) -> list["PolicyRecord"]:
        """Recorded policy versions of a world, oldest first."""
        from qmtl_core.service._policies import policy_history

        with self.store.read() as conn:
            return policy_history(conn, world)

    # -- ledger ----------------------------------------------------------------------------------
    def audit_log(self, *, world: str | None = None, since: datetime | None = None,
                  kind: str | None = None, limit: int | None = None) -> list["LedgerEntry"]:
        """Ledger entries in chain order, filtered."""
        from qmtl_core import ledger

        with self.store.read() as conn:
            return ledger.entries(conn, world=world, since=since, kind=kind, limit=limit)

    def audit_verify(self) -> "VerifyResult":
        """Verify the whole hash chain."""
        from qmtl_core import ledger

        with self.store.read() as conn:
            return ledger.verify(conn)
