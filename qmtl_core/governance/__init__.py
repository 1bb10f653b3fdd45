"""Governance: decision envelopes, the live promotion gate, requests and approvals, apply/rollback/halt."""

from qmtl_core.governance._decision import derive_decision, envelope_to_dict

__all__ = ["derive_decision", "envelope_to_dict"]
