"""Property-based run of the OpenAPI document against the app in-process: no input gives a 5xx.

A fake answerer stands in for the pipeline (so chat requests are answered, not timed out) and a
fresh worker heartbeat makes the service ready; Redis is real (db 10).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from ops.api import api_settings, create_app
from tests.unit.test_api_app import AUTH_ACME, KEYS, answerer, config, connect_or_skip, redis_url

pytestmark = pytest.mark.timeout(120)


def _app() -> Any:
    cfg = config(chat_timeout_s=5.0, max_wait_s=0.5, rate_limit_rpm=0, max_items_per_request=50)
    cfg["tenants"]["acme"] = {"rate_limit_rpm": 0}
    return create_app(api_settings(cfg, {}))


# Building the app connects to nothing: Redis is first used by the requests, after the fixture below.
schema = schemathesis.openapi.from_asgi("/openapi.json", _app())


@pytest.fixture(scope="module", autouse=True)
def pipeline_stand_in() -> Iterator[None]:
    client = connect_or_skip(redis_url())
    client.flushdb()
    client.zadd(KEYS.heartbeats(), {"worker@fake": time.time() + 600})
    with answerer(client):
        yield
    client.close()


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_gives_a_server_error(case: Any) -> None:
    headers = {k: v for k, v in (case.headers or {}).items() if k.lower() not in ("authorization", "x-api-key")}
    case.headers = {**headers, **AUTH_ACME}
    response = case.call()
    case.validate_response(response, checks=[not_a_server_error])
