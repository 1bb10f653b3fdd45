"""World policies: pydantic models of the YAML schema, the located loader, and the JSON Schema."""

from qmtl_core.policy._durations import Duration, format_duration, parse_duration
from qmtl_core.policy._loader import Problem, check_policy_text, load_policy_file, load_policy_text
from qmtl_core.policy._models import (
    STAGES,
    Campaign,
    Consistency,
    Correlation,
    Costs,
    Governance,
    Hysteresis,
    LivePromotion,
    LiveWindow,
    MetricDeclaration,
    Notifications,
    PolicyProblem,
    Risk,
    Rule,
    Selection,
    Severity,
    Stage,
    StageWindow,
    TopK,
    Validation,
    WorldPolicy,
    policy_hash,
    policy_json_schema,
)

__all__ = [
    "WorldPolicy", "Rule", "Costs", "Validation", "Selection", "TopK", "Correlation", "Hysteresis",
    "MetricDeclaration", "Campaign", "Consistency", "StageWindow", "LiveWindow", "Governance", "LivePromotion",
    "Risk", "Notifications",
    "Stage", "STAGES", "Severity", "PolicyProblem", "Problem", "Duration", "parse_duration",
    "format_duration", "load_policy_file", "load_policy_text", "check_policy_text",
    "policy_json_schema", "policy_hash",
]
