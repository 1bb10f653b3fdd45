"""Governance: decision envelopes, the live promotion gate, requests and approvals, apply/rollback/halt."""

from qmtl_core.governance._decision import derive_decision, envelope_to_dict
from qmtl_core.governance._gate import (
    Approval,
    GateInput,
    GateResult,
    Reason,
    RequestView,
    evidence_of,
    promotion_gate,
)

__all__ = ["derive_decision", "envelope_to_dict", "promotion_gate", "GateInput", "GateResult", "Reason",
           "Approval", "RequestView", "evidence_of"]
