"""One exception hierarchy for qmtl; every class carries the CLI exit code of its family.

Families (DESIGN §10): 1 internal, 2 bad input, 3 not found, 4 conflict, 10 blocked by policy,
11 waiting, 12 fail-closed, 75 busy. Lower-layer errors (YAML, SQLAlchemy, httpx, pydantic) are
mapped to these at the boundary where they occur, so callers only ever see ``QmtlError``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "QmtlError",
    "InternalError",
    "BadInputError",
    "UsageError",
    "PolicyError",
    "DataFileError",
    "ConfigError",
    "StoreVersionError",
    "AmbiguousId",
    "NotFoundError",
    "WorldNotFound",
    "StrategyNotFound",
    "RunNotFound",
    "RequestNotFound",
    "ConflictError",
    "IdempotencyConflict",
    "EvidenceChanged",
    "PolicyVersionConflict",
    "LedgerBroken",
    "CheckpointMismatch",
    "CheckpointUnsigned",
    "LedgerStateMismatch",
    "CheckpointError",
    "BlockedError",
    "GateFailed",
    "PromotionRefused",
    "WaitingError",
    "ApprovalPending",
    "WindowIncomplete",
    "FailClosedError",
    "EvidenceMissing",
    "EvidenceStale",
    "StoreUnavailable",
    "BusyError",
    "LeaseHeld",
    "Unauthorized",
    "Forbidden",
    "NotOwner",
    "LiveNotConfirmed",
]


class QmtlError(Exception):
    """Base of every error qmtl raises on purpose."""

    exit_code: int = 1
    #: A stable, machine-readable reason code (e.g. ``risk_snapshot_missing``).
    code: str = "error"

    def __init__(self, message: str, *, hint: str | None = None, code: str | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if code is not None:
            self.code = code
        self.details: dict[str, Any] = details or {}

    def one_line(self) -> str:
        """The single line a user sees: what is wrong, then how to fix it."""
        text = self.message
        if self.hint:
            text = f"{text} ({self.hint})"
        return " ".join(text.split("\n"))

    def to_dict(self) -> dict[str, Any]:
        """JSON form used by ``--json`` output and the HTTP API."""
        out: dict[str, Any] = {"error": self.code, "message": self.message, "exit_code": self.exit_code}
        if self.hint:
            out["hint"] = self.hint
        if self.details:
            out["details"] = self.details
        return out


class InternalError(QmtlError):
    """An unexpected condition inside qmtl: a bug."""

    exit_code = 1
    code = "internal_error"


# --- 2: bad input -------------------------------------------------------------------------------
class BadInputError(QmtlError):
    """The input (arguments, files, documents) is malformed or invalid."""

    exit_code = 2
    code = "bad_input"


class UsageError(BadInputError):
    """A command was called with arguments that do not fit together."""

    code = "usage"


class RequestTooLarge(BadInputError):
    """Remote mode: the request body is larger than the server accepts (HTTP 413)."""

    code = "request_too_large"


class AmbiguousId(UsageError):
    """An id prefix matches more than one strategy or request (``details['candidates']``)."""

    code = "ambiguous_id"


class PolicyError(BadInputError):
    """A world policy file is not valid; carries the file, line and column of the problem."""

    code = "invalid_policy"

    def __init__(self, message: str, *, file: str, line: int | None = None, column: int | None = None,
                 hint: str | None = None) -> None:
        self.file = file
        self.line = line
        self.column = column
        where = file if line is None else f"{file}:{line}:{column if column is not None else 1}"
        super().__init__(f"{where}: {message}", hint=hint,
                         details={"file": file, "line": line, "column": column, "problem": message})


class DataFileError(BadInputError):
    """A data file (returns, metrics, bars, snapshot) is malformed; names the row/column."""

    code = "invalid_data"


class ConfigError(BadInputError):
    """The qmtl configuration (config.toml, environment) is invalid."""

    code = "invalid_config"


class Unauthorized(ConfigError):
    """Remote mode: no token, or a token the server does not accept."""

    code = "unauthorized"


class CheckpointError(BadInputError):
    """A checkpoint file that is not a well-formed signed note."""

    code = "bad_checkpoint"


class StoreVersionError(BadInputError):
    """The store was written by a newer qmtl than this one."""

    code = "store_too_new"


# --- 3: not found -------------------------------------------------------------------------------
class NotFoundError(QmtlError):
    """Something named by the caller does not exist."""

    exit_code = 3
    code = "not_found"


class WorldNotFound(NotFoundError):
    """No policy file exists for the named world."""

    code = "world_not_found"


class StrategyNotFound(NotFoundError):
    """The strategy is not known in that world."""

    code = "strategy_not_found"


class RunNotFound(NotFoundError):
    """No evaluation run has that key."""

    code = "run_not_found"


class RequestNotFound(NotFoundError):
    """No promotion request has that id."""

    code = "request_not_found"


# --- 4: conflict --------------------------------------------------------------------------------
class ConflictError(QmtlError):
    """The change conflicts with what is stored (etag, idempotency key, evidence)."""

    exit_code = 4
    code = "conflict"


class IdempotencyConflict(ConflictError):
    """The same key was used before with different content."""

    code = "idempotency_conflict"


class EvidenceChanged(ConflictError):
    """The evidence an approval was bound to has changed since."""

    code = "evidence_changed"


class PolicyVersionConflict(ConflictError):
    """A policy file changed without its ``policy_version`` moving forward."""

    code = "policy_version_conflict"


class LedgerBroken(ConflictError):
    """The audit ledger's hash chain does not verify."""

    code = "ledger_broken"


class CheckpointMismatch(LedgerBroken):
    """The chain does not hold a signed checkpoint's head at its position (rewritten or truncated)."""

    code = "checkpoint_mismatch"


class CheckpointUnsigned(ConflictError):
    """A checkpoint file carries no valid signature by the configured key."""

    code = "checkpoint_unsigned"


class LedgerStateMismatch(LedgerBroken):
    """The decision tables hold something the ledger does not vouch for (``audit verify --deep``)."""

    code = "ledger_state_mismatch"


# --- 10: blocked by policy ----------------------------------------------------------------------
class BlockedError(QmtlError):
    """The world's policy refuses the action."""

    exit_code = 10
    code = "blocked"


class GateFailed(BlockedError):
    """A blocking gate rule failed."""

    code = "gate_failed"


class PromotionRefused(BlockedError):
    """A promotion was refused by governance."""

    code = "promotion_refused"


class Forbidden(BlockedError):
    """Remote mode: the token's role may not do this."""

    code = "forbidden"


class LiveNotConfirmed(BlockedError):
    """A call would make or keep something live without the caller's explicit live intent
    (``X-Allow-Live: true`` over HTTP, ``--allow-live`` in the CLI); nothing was changed.
    HTTP answers 428 Precondition Required."""

    code = "allow_live_required"


# --- 11: waiting --------------------------------------------------------------------------------
class NotOwner(Forbidden):
    """The identity may act only on strategies it submitted (HTTP 403)."""

    code = "not_owner"


class WaitingError(QmtlError):
    """Nothing is wrong, but the action must wait (approvals, observation windows)."""

    exit_code = 11
    code = "waiting"


class ApprovalPending(WaitingError):
    """The promotion request does not have enough approvals yet."""

    code = "approval_pending"


class WindowIncomplete(WaitingError):
    """The campaign window has not been satisfied by data yet."""

    code = "window_incomplete"


# --- 12: fail-closed ----------------------------------------------------------------------------
class FailClosedError(QmtlError):
    """Required evidence is missing or stale, so the decision fails closed."""

    exit_code = 12
    code = "fail_closed"


class EvidenceMissing(FailClosedError):
    """Evidence the decision needs does not exist."""

    code = "evidence_missing"


class EvidenceStale(FailClosedError):
    """Evidence exists but is too old to decide on."""

    code = "evidence_stale"


class StoreUnavailable(FailClosedError):
    """The store (database) cannot be reached, so nothing can be confirmed."""

    code = "store_unavailable"


# --- 75: busy -----------------------------------------------------------------------------------
class BusyError(QmtlError):
    """Another process holds what this one needs; try again later."""

    exit_code = 75
    code = "busy"


class LeaseHeld(BusyError):
    """Another loop holds the world's lease."""

    code = "lease_held"
