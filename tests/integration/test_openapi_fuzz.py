"""Schemathesis against the running app's own OpenAPI schema: no 5xx, responses match the schema."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

pytestmark = pytest.mark.integration


def keep_traffic_local(value):
    """Generated image URLs would make the server resolve random host names: send data URLs instead."""
    if isinstance(value, dict):
        if isinstance(value.get("url"), str) and not value["url"].startswith("data:"):
            value["url"] = "data:image/png;base64,iVBORw0KGgo="
        for item in value.values():
            keep_traffic_local(item)
    elif isinstance(value, list):
        for item in value:
            keep_traffic_local(item)


def test_api_conforms_to_its_schema(server) -> None:
    # Driven through Hypothesis directly: schemathesis's pytest plugin does not support pytest 9 yet.
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert any(op.path == "/v1/chat/completions" for op in operations)
    calls = 0
    for operation in operations:

        @given(operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case) -> None:
            nonlocal calls
            calls += 1
            keep_traffic_local(case.body)
            if isinstance(case.body, dict):
                case.body["max_tokens"] = 4  # short answers; max_tokens' own bounds are in the matrix
                case.body.pop("stream", None)  # SSE is not JSON; streaming has its own tests
                case.body.pop("stream_options", None)
            case.call_and_validate(
                base_url=server.base_url,
                checks=[not_a_server_error, status_code_conformance, response_schema_conformance],
                timeout=60,
            )

        check()
    assert calls >= 5 * len(operations)
