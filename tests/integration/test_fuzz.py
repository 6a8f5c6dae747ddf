"""schemathesis over the served OpenAPI document, through real Ray Serve and HTTP: every
route, generated inputs, and no answer may be a 5xx, an undocumented status, or a body
outside the documented schema (the error envelope included)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import CONTRACT_HEADERS

pytestmark = pytest.mark.ray


@pytest.fixture(scope="session")
def served_schema(ray_serve_url):
    # The contract app has auth on: the schema and every case carry its key.
    return schemathesis.openapi.from_url(f"{ray_serve_url}/openapi.json", headers=CONTRACT_HEADERS)


schema = schemathesis.pytest.from_fixture("served_schema")


@schema.parametrize()
@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same cases on every run: a failure reproduces
)
def test_no_generated_request_gets_a_server_error(case):
    case.call_and_validate(
        headers=CONTRACT_HEADERS,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ],
        timeout=120,
    )
