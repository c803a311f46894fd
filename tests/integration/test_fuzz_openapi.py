"""schemathesis against braid serve's own OpenAPI description: bodies generated from the request
schemas (valid and invalid) never get a 5xx, and the server stays up. Bounded: a short context
keeps every generation small, and each route gets a fixed number of examples."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.integration.conftest import API_KEY, start_server, stop_server

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def fuzz_server(chat_model_dir):
    srv = start_server(chat_model_dir, "--context-len", "64")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json", headers=HEADERS)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case, fuzz_server):
    response = case.call(headers=HEADERS, timeout=60)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])
    assert httpx.get(f"{fuzz_server.url}/health").status_code == 200
