"""Where a piece of evidence came from, and so whether it may count toward live money (DESIGN §11).

Every run and every metric carries one of these. Paper, shadow and live windows and gates count
only the trusted classes, and only observations dated after the strategy entered the stage.
"""

from __future__ import annotations

from enum import StrEnum


class EvidenceClass(StrEnum):
    """The provenance class of a run or a metric."""

    #: qmtl's own backtest, or its replay of bars fed through ``qmtl run`` (any domain).
    REPLAY = "qmtl replay"
    #: Realized returns posted to the risk hub by a trusted producer (a ``producer`` token, or a
    #: local identity listed in the world's ``risk.producers``).
    HUB = "hub"
    #: Anything supplied in a request: recorded and shown, never counted toward a window or a gate
    #: past backtest.
    UNVERIFIED = "unverified"


#: The classes that may satisfy a paper/shadow/live window or gate.
TRUSTED: frozenset[EvidenceClass] = frozenset({EvidenceClass.REPLAY, EvidenceClass.HUB})


def is_trusted(value: str | None) -> bool:
    """``True`` for a trusted class; unknown or missing values are untrusted (fail closed)."""
    return value in TRUSTED


#: The stage whose stay bounds a segment's observations. Shadow has no stage of its own: it runs
#: beside paper (live inputs mirrored, orders off) and is read by the paper → live gate, so shadow
#: evidence counts only while the strategy is in paper, and only what was observed since it entered.
_HOME_STAGE = {"shadow": "paper"}


def home_stage(stage: str) -> str:
    """The stage a strategy must be in for evidence of ``stage`` to count, and whose entry bounds it."""
    return _HOME_STAGE.get(stage, stage)
