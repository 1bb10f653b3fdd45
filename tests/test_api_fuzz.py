"""Schemathesis against ``qmtl serve``'s own OpenAPI schema: every route, with no token, a reader's,
an approver's and an operator's, on both store backends. No answer may be a 5xx, and every answer
(success or error) must match the schema the route declares: its status, content type and body.

Each case is also sent with its ``world`` set to a real world holding strategies, runs, a snapshot
and an open request, so the generated bodies reach the gates and the store, not only the 404s of
made-up names. The number of examples per route is bounded to keep the suite within its budget.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from qmtl_core.config import Settings
from qmtl_core.service._auth import create_token
from qmtl_core.service._http import create_app
from tests._service import Clock
from tests.test_governance import Setup, policy_text

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
#: Examples per route (each sent 6 times: 3 identities x generated/real world).
EXAMPLES = 3
#: Routes that render charts get fewer (a report is seconds of matplotlib, not a parser edge).
SLOW = {"/worlds/{world}/report": 1}


@pytest.fixture
def fuzzed(qmtl_env: dict[str, str], worlds_dir: Path) -> Iterator[tuple[Any, dict[str, str], str]]:
    """The real app over a store with a world in mid-flight: runs, a snapshot, a pending request."""
    (worlds_dir / "gov.yaml").write_text(policy_text())
    settings = Settings.resolve()
    settings.server = None
    app = create_app(settings)
    service = app.state.service
    tokens = {}
    with service.store.write() as conn:
        for role in ("reader", "approver", "operator"):
            tokens[role] = create_token(conn, actor=f"fuzz-{role}", role=role, created_by="admin",
                                        now=service.clock())[1]
    setup = service.as_actor("cron")
    setup.clock = Clock(datetime.now(timezone.utc))
    Setup(setup).ready("a", "b")
    request_id = service.as_actor("carol").promote("gov", "a").request_id
    yield app, tokens, str(request_id)
    service.close()


def test_every_route_answers_within_its_schema(fuzzed: tuple[Any, dict[str, str], str]) -> None:
    app, tokens, request_id = fuzzed
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    bearer = {role: {"Authorization": f"Bearer {t}"} for role, t in tokens.items()}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 25  # every route of the API, not a subset that happened to load
    seen_ok: set[str] = set()
    with asgi.get_client(app) as session:
        for operation in operations:
            @settings(max_examples=SLOW.get(operation.path, EXAMPLES), deadline=None, database=None,
                      suppress_health_check=list(HealthCheck), derandomize=True)
            @given(case=operation.as_strategy())
            def run(case: Any) -> None:
                variants = [case]
                params = case.path_parameters or {}
                if "world" in params or "request_id" in params:
                    real = dict(params)
                    real.update({k: v for k, v in (("world", "gov"), ("request_id", request_id)) if k in params})
                    variants.append(case.operation.Case(
                        path_parameters=real, query=case.query, body=case.body, headers=case.headers,
                        media_type=case.media_type))
                # The approver's token is the one that reaches approve/reject; the operator's every other.
                acting = bearer["approver" if case.operation.path.startswith("/promotions/") else "operator"]
                for variant in variants:
                    for identity in ({}, bearer["reader"], acting):
                        response = variant.call(session=session, headers=identity, timeout=300)  # a loaded CI box
                        variant.validate_response(response, checks=CHECKS, headers=identity)
                        if response.status_code < 300:
                            seen_ok.add(operation.label)
            run()
    # The fuzzing went past authentication and validation: most routes answered 2xx at least once.
    assert len(seen_ok) >= len(operations) // 2, sorted(seen_ok)
