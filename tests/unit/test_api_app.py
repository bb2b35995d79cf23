"""The HTTP API in-process (FastAPI TestClient) against a real Redis (db 10), with a fake answerer
standing in for the pipeline: it reads submitted ids from the pending stream and writes results."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from fastapi.testclient import TestClient

from ops.api import api_settings, create_app, hash_key
from producers.errors import BudgetExceeded, CohortError, ContextTooLong, DeadlineExceeded, FallbackExhausted
from producers.keys import Keys
from producers.schema import PromptItem
from workers.results import ResultWriter

KEY_ACME = "ck-acme-0123456789abcdef"
KEY_BETA = "ck-beta-0123456789abcdef"
KEY_ENV = "ck-env-key-0123456789abcdef"
AUTH_ACME = {"Authorization": f"Bearer {KEY_ACME}"}
AUTH_BETA = {"Authorization": f"Bearer {KEY_BETA}"}
KEYS = Keys("cohort")


def redis_url(db: int = 10) -> str:
    """``REDIS_URL`` (default local Redis) with the tests' own db."""
    parts = urlsplit(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


def connect_or_skip(url: str) -> redis.Redis:
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.RedisError:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"Redis is not reachable at {url}")
    return client


@pytest.fixture
def redis_db() -> Iterator[redis.Redis]:
    client = connect_or_skip(redis_url())
    client.flushdb()
    yield client
    client.close()


def config(**api: Any) -> dict[str, Any]:
    """A config with tenants acme, beta and default, a key for acme and beta, three tiers."""
    table = {"keys": {hash_key(KEY_ACME): "acme", hash_key(KEY_BETA): "beta"}, "min_workers": 1, **api}
    return {
        "redis": {"url": redis_url()},
        "tenants": {"acme": {}, "beta": {"rate_limit_rpm": 3}, "default": {}},
        "tiers": [{"name": "primary"}, {"name": "secondary"}, {"name": "long-context"}],
        "api": table,
    }


@contextlib.contextmanager
def api_client(redis_client: redis.Redis, env: dict[str, str] | None = None, *, require_auth: bool | None = None,
               **api: Any) -> Iterator[TestClient]:
    settings = api_settings(config(**api), env or {}, require_auth=require_auth)
    with TestClient(create_app(settings)) as client:
        yield client


Behaviour = Callable[[PromptItem], dict[str, Any] | CohortError | None]


def echo(item: PromptItem) -> dict[str, Any] | CohortError | None:
    """Answers ``echo: <prompt>``; prompts naming an error fail with it; ``SILENT`` is never answered."""
    failures: dict[str, CohortError] = {
        "BUDGET": BudgetExceeded("the daily budget of tenant acme is used up", scope="tenant:acme"),
        "UPSTREAM": FallbackExhausted("every tier failed", attempts=["primary: 503", "secondary: 503"]),
        "TOOLONG": ContextTooLong("the prompt does not fit any tier's context window"),
        "LATE": DeadlineExceeded("the deadline passed"),
    }
    if "SILENT" in item.prompt:
        return None
    for word, error in failures.items():
        if word in item.prompt:
            return error
    return {"id": item.id, "text": f"echo: {item.prompt}", "tier": item.params.model or "primary",
            "model": "sim-large", "tokens_in": 11, "tokens_out": 7, "cost": 0.0004}


@contextlib.contextmanager
def answerer(client: redis.Redis, behaviour: Behaviour = echo, *, delay_s: float = 0.0) -> Iterator[list[PromptItem]]:
    """Answer every submitted item (after ``delay_s``) until the block ends; yields the items seen."""
    seen: list[PromptItem] = []
    stop = threading.Event()
    writer = ResultWriter(client, KEYS, ttl_s=600)

    def run() -> None:
        last = "0"
        while not stop.is_set():
            for _, entries in client.xread({KEYS.pending_stream(): last}, block=20, count=100) or []:
                for entry_id, fields in entries:
                    last = entry_id
                    item = PromptItem.from_json(client.get(KEYS.item(fields[b"id"].decode())))
                    seen.append(item)
                    if delay_s:
                        stop.wait(delay_s)
                    outcome = behaviour(item)
                    if isinstance(outcome, CohortError):
                        writer.fail(item.id, outcome)
                    elif outcome is not None:
                        writer.answer(item.id, outcome)

    thread = threading.Thread(target=run, name="fake-answerer", daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(timeout=5)


def error_of(response: Any) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


# --- auth ---------------------------------------------------------------------------------------
def test_missing_and_wrong_keys_get_401_in_openai_shape(redis_db: redis.Redis) -> None:
    with api_client(redis_db) as client:
        body = {"model": "cohort", "messages": [{"role": "user", "content": "hi"}]}
        missing = client.post("/v1/chat/completions", json=body)
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        assert error_of(missing)["code"] == "invalid_api_key"
        wrong = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer sk-nope-nope-nope"})
        assert wrong.status_code == 401 and error_of(wrong)["code"] == "invalid_api_key"
        basic = client.get("/v1/prompts/abc", headers={"Authorization": "Basic dXNlcjpwYXNz"})
        assert basic.status_code == 401
        for path in ("/v1/prompts/abc", "/v1/models"):
            assert client.get(path).status_code == 401
        assert client.post("/v1/prompts", json={"prompt": "x"}).status_code == 401
        assert client.post("/v1/prompts/status", json={"ids": ["a"]}).status_code == 401


def test_x_api_key_header_and_env_keys_authenticate(redis_db: redis.Redis) -> None:
    env = {"ACME_KEYS": f" {KEY_ENV} , "}
    cfg_tenants = {"acme": {"api_keys_env": "ACME_KEYS"}, "beta": {}, "default": {}}
    cfg = config()
    cfg["tenants"] = cfg_tenants
    with TestClient(create_app(api_settings(cfg, env))) as client:
        assert client.get("/v1/models", headers={"X-API-Key": KEY_ACME}).status_code == 200
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {KEY_ENV}"}).status_code == 200


def test_demo_mode_serves_keyless_requests_as_the_anonymous_tenant(redis_db: redis.Redis) -> None:
    with api_client(redis_db, require_auth=False) as client:
        submitted = client.post("/v1/prompts", json={"prompt": "hello"})
        assert submitted.status_code == 202
        item_id = submitted.json()["id"]
        assert redis_db.hget(KEYS.item_status(item_id), "tenant") == b"default"
        # A key, when sent, is still checked.
        assert client.get("/v1/models", headers={"Authorization": "Bearer wrong-key-wrong-key"}).status_code == 401
        # Another tenant cannot see the anonymous tenant's prompt.
        assert client.get(f"/v1/prompts/{item_id}", headers=AUTH_ACME).status_code == 404


def test_probes_are_public_unless_configured(redis_db: redis.Redis) -> None:
    with api_client(redis_db) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/openapi.json").status_code == 200
    with api_client(redis_db, public_health=False, public_docs=False) as client:
        assert client.get("/healthz").status_code == 401
        assert client.get("/healthz", headers=AUTH_ACME).status_code == 200
        assert client.get("/openapi.json").status_code == 401
        assert client.get("/openapi.json", headers=AUTH_ACME).json()["info"]["title"] == "Cohort"


def test_keys_never_reach_logs_or_redis(redis_db: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with api_client(redis_db) as client, answerer(redis_db):
        client.post("/v1/chat/completions", headers={"Authorization": "Bearer sk-wrong-but-secret-123"},
                    json={"model": "cohort", "messages": [{"role": "user", "content": "hi"}]})
        done = client.post("/v1/chat/completions", headers=AUTH_ACME,
                           json={"model": "cohort", "messages": [{"role": "user", "content": "hi"}]})
        assert done.status_code == 200
    for secret in (KEY_ACME, "sk-wrong-but-secret-123"):
        assert secret not in caplog.text
        for key in redis_db.scan_iter():
            assert secret.encode() not in key
            if redis_db.type(key) == b"string":
                assert secret.encode() not in (redis_db.get(key) or b"")


# --- native endpoints ---------------------------------------------------------------------------
def test_submit_one_and_many_return_ids_at_once(redis_db: redis.Redis) -> None:
    with api_client(redis_db) as client:
        one = client.post("/v1/prompts", headers=AUTH_ACME, json={"prompt": "What is a PIN?", "max_tokens": 50})
        assert one.status_code == 202
        assert one.json()["ids"] == [one.json()["id"]]
        many = client.post("/v1/prompts", headers=AUTH_ACME, json={
            "prompts": ["first", {"prompt": "second", "complexity": "complex", "params": {"model": "secondary"}}],
            "complexity": "simple", "temperature": 0.5, "metadata": {"ticket": 7}})
        assert many.status_code == 202
        body = many.json()
        assert body["id"] is None and len(body["ids"]) == 2
        first, second = (PromptItem.from_json(redis_db.get(KEYS.item(i))) for i in body["ids"])
        assert (first.prompt, first.complexity, first.params.temperature, first.metadata) == \
            ("first", "simple", 0.5, {"ticket": 7})
        assert (second.complexity, second.params.model, second.tenant) == ("complex", "secondary", "acme")
        assert PromptItem.from_json(redis_db.get(KEYS.item(one.json()["id"]))).params.max_tokens == 50


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"prompt": "x", "prompts": ["y"]}, "prompt", "exactly one"),
    ({}, "prompt", "exactly one"),
    ({"prompts": []}, "prompts", "empty"),
    ({"prompt": "x", "tenant": "beta"}, "tenant", "unknown field"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens", "integer"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "between"),
    ({"prompt": "   "}, "prompt", "empty"),
    ({"prompt": "x", "complexity": "hard"}, "complexity", "simple"),
    ({"prompt": "x", "temperature": 9}, "temperature", "between 0 and 2"),
    ({"prompts": ["ok", {"prompt": "x", "bogus": 1}]}, "prompts[1].bogus", "unknown field"),
    ({"prompt": "x", "params": {"top_k": 3}}, "params.top_k", "unknown field"),
    ({"prompt": "x", "deadline": -1}, "deadline", "deadline"),
    ({"prompt": "a\u0000b"}, "prompt", "NUL"),
])
def test_bad_submissions_get_422_naming_the_field(redis_db: redis.Redis, body: dict[str, Any], param: str,
                                                  words: str) -> None:
    with api_client(redis_db) as client:
        response = client.post("/v1/prompts", headers=AUTH_ACME, json=body)
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert words in error["message"]
    assert redis_db.xlen(KEYS.pending_stream()) == 0


def test_malformed_json_oversized_and_non_object_bodies(redis_db: redis.Redis) -> None:
    with api_client(redis_db, max_body_bytes=2048) as client:
        bad = client.post("/v1/prompts", headers={**AUTH_ACME, "Content-Type": "application/json"}, content=b"{nope")
        assert bad.status_code == 400 and error_of(bad)["code"] == "invalid_json"
        big = client.post("/v1/prompts", headers=AUTH_ACME, json={"prompt": "x" * 5000})
        assert big.status_code == 413 and error_of(big)["code"] == "request_too_large"
        chunked = client.post("/v1/prompts", headers={**AUTH_ACME, "Content-Type": "application/json"},
                              content=iter([b'{"prompt": "', b"x" * 3000, b'"}']))
        assert chunked.status_code == 413
        listed = client.post("/v1/prompts", headers=AUTH_ACME, json=["x"])
        assert listed.status_code == 422 and error_of(listed)["message"]
        many = client.post("/v1/prompts/status", headers=AUTH_ACME, json={"ids": ["a"] * 3})
        assert many.status_code == 200
    with api_client(redis_db, max_items_per_request=2) as client:
        response = client.post("/v1/prompts", headers=AUTH_ACME, json={"prompts": ["a", "b", "c"]})
        assert response.status_code == 422 and error_of(response)["param"] == "prompts"
        response = client.post("/v1/prompts/status", headers=AUTH_ACME, json={"ids": ["a", "b", "c"]})
        assert response.status_code == 422 and error_of(response)["param"] == "ids"


def test_status_long_poll_and_tenant_isolation(redis_db: redis.Redis) -> None:
    with api_client(redis_db) as client:
        item_id = client.post("/v1/prompts", headers=AUTH_ACME, json={"prompt": "hello"}).json()["id"]
        queued = client.get(f"/v1/prompts/{item_id}", headers=AUTH_ACME)
        assert queued.status_code == 200 and queued.json() == {"id": item_id, "status": "queued", "result": None,
                                                                "error": None}
        with answerer(redis_db, delay_s=0.3):
            started = time.monotonic()
            answered = client.get(f"/v1/prompts/{item_id}", params={"wait": 10}, headers=AUTH_ACME)
            assert time.monotonic() - started < 5
        assert answered.json()["status"] == "answered"
        assert answered.json()["result"]["text"] == "echo: hello"
        # Another tenant gets exactly what an unknown id gets.
        other = client.get(f"/v1/prompts/{item_id}", headers=AUTH_BETA)
        unknown = client.get("/v1/prompts/0000-not-an-item", headers=AUTH_BETA)
        assert other.status_code == unknown.status_code == 404
        assert other.json() == unknown.json()
        assert client.get("/v1/prompts/bad:id", headers=AUTH_ACME).status_code == 422
        assert client.get(f"/v1/prompts/{item_id}?wait=-1", headers=AUTH_ACME).status_code == 422
        assert client.get(f"/v1/prompts/{item_id}?wait=nan", headers=AUTH_ACME).status_code == 422


def test_long_poll_is_cut_to_max_wait(redis_db: redis.Redis) -> None:
    with api_client(redis_db, max_wait_s=0.2) as client:
        item_id = client.post("/v1/prompts", headers=AUTH_ACME, json={"prompt": "SILENT"}).json()["id"]
        started = time.monotonic()
        response = client.get(f"/v1/prompts/{item_id}", params={"wait": 3600}, headers=AUTH_ACME)
        assert response.json()["status"] == "queued"
        assert time.monotonic() - started < 2


def test_batch_status_reports_each_id(redis_db: redis.Redis) -> None:
    with api_client(redis_db) as client, answerer(redis_db):
        submitted = client.post("/v1/prompts", headers=AUTH_ACME, json={"prompts": ["one", "UPSTREAM", "SILENT"]})
        ids = submitted.json()["ids"]
        beta_id = client.post("/v1/prompts", headers=AUTH_BETA, json={"prompt": "beta's"}).json()["id"]
        response = client.post("/v1/prompts/status", headers=AUTH_ACME,
                               json={"ids": [*ids, beta_id, "unknown-id"], "wait": 0.5})
        assert response.status_code == 200
        data = {d["id"]: d for d in response.json()["data"]}
        assert [d["id"] for d in response.json()["data"]] == [*ids, beta_id, "unknown-id"]
        assert data[ids[0]]["status"] == "answered" and data[ids[0]]["result"]["text"] == "echo: one"
        assert data[ids[1]]["status"] == "failed" and data[ids[1]]["error"]["code"] == "fallback_exhausted"
        assert data[ids[2]]["status"] == "queued"
        assert data[beta_id]["status"] == data["unknown-id"]["status"] == "not_found"
        assert data[beta_id]["result"] is None
        bad = client.post("/v1/prompts/status", headers=AUTH_ACME, json={"ids": ["ok", "no/slash"]})
        assert bad.status_code == 422 and error_of(bad)["param"] == "ids[1]"


# --- chat completions ---------------------------------------------------------------------------
def chat(client: TestClient, content: str = "What is Cohort?", headers: dict[str, str] = AUTH_ACME,
         **body: Any) -> Any:
    payload = {"model": "cohort", "messages": [{"role": "user", "content": content}], **body}
    return client.post("/v1/chat/completions", headers=headers, json=payload)


def test_chat_completion_in_openai_format(redis_db: redis.Redis) -> None:
    with api_client(redis_db) as client, answerer(redis_db) as seen:
        response = client.post("/v1/chat/completions", headers=AUTH_ACME, json={
            "model": "secondary", "max_completion_tokens": 64, "temperature": 0.2, "user": "u-1", "seed": 4,
            "messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "My card is blocked."},
                         {"role": "assistant", "content": "Which card?", "refusal": None},
                         {"role": "user", "content": [{"type": "text", "text": "The debit one."}]}],
            "cohort": {"complexity": "simple"}})
    assert response.status_code == 200, response.text
    body = response.json()
    item_id = seen[0].id
    assert body["id"] == f"chatcmpl-{item_id}" and body["object"] == "chat.completion"
    assert body["model"] == "secondary"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "echo: The debit one.",
                                                        "refusal": None},
                                "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    assert abs(body["created"] - time.time()) < 60
    assert response.headers["x-ratelimit-limit-requests"] == "600"
    item = seen[0]
    assert (item.prompt, item.system, item.complexity, item.tenant) == ("The debit one.", "Be brief.", "simple", "acme")
    assert item.context == "Conversation so far:\n\nUser: My card is blocked.\n\nAssistant: Which card?"
    assert (item.params.model, item.params.max_tokens, item.params.temperature) == ("secondary", 64, 0.2)


def test_chat_stream_sends_the_answer_as_chunks(redis_db: redis.Redis) -> None:
    text = "tell me a long story about batching prompts together"
    with api_client(redis_db, stream_chunk_chars=8) as client, answerer(redis_db):
        response = chat(client, text, stream=True, stream_options={"include_usage": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "primary" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert content == f"echo: {text}"
    assert len(chunks) > 5
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 18


@pytest.mark.parametrize(("prompt", "status", "kind", "code"), [
    ("BUDGET", 429, "insufficient_quota", "budget_exceeded"),
    ("UPSTREAM", 502, "upstream_error", "fallback_exhausted"),
    ("TOOLONG", 400, "invalid_request_error", "context_length_exceeded"),
    ("LATE", 504, "timeout", "deadline_exceeded"),
])
def test_item_failures_map_to_status_codes(redis_db: redis.Redis, prompt: str, status: int, kind: str,
                                           code: str) -> None:
    with api_client(redis_db) as client, answerer(redis_db) as seen:
        response = chat(client, prompt)
    assert response.status_code == status
    error = error_of(response)
    assert (error["type"], error["code"], error["item_id"]) == (kind, code, seen[0].id)
    if status in (429, 504):
        assert response.headers["x-should-retry"] == "false"


def test_chat_without_answer_times_out_with_504_naming_the_item(redis_db: redis.Redis) -> None:
    with api_client(redis_db, chat_timeout_s=0.3) as client:
        response = chat(client, "SILENT")
    assert response.status_code == 504
    error = error_of(response)
    assert error["code"] == "result_timeout" and error["item_id"] in error["message"]


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"n": 2}, "n", "n must be 1"),
    ({"frobnicate": True}, "frobnicate", "Unrecognized request argument"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
    ({"response_format": {"type": "json_object"}}, "response_format", "text"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "stream=true"),
    ({"max_tokens": 0}, "max_tokens", "between"),
    ({"temperature": "hot"}, "temperature", "number"),
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     "messages[1].role", "last message"),
    ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "x"}]}, "messages[0].role", "not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]},
     "messages[0].content[0].type", "text"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "Input should be"),
    ({"messages": [{"role": "user", "content": ""}]}, "prompt", "empty"),
    ({"model": None}, "model", "string"),
])
def test_bad_chat_requests_get_400_naming_the_parameter(redis_db: redis.Redis, body: dict[str, Any], param: str,
                                                        words: str) -> None:
    payload = {"model": "cohort", "messages": [{"role": "user", "content": "hi"}], **body}
    with api_client(redis_db) as client:
        response = client.post("/v1/chat/completions", headers=AUTH_ACME, json=payload)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert words in error["message"]


def test_models_lists_the_tiers(redis_db: redis.Redis) -> None:
    with api_client(redis_db) as client:
        names = [m["id"] for m in client.get("/v1/models", headers=AUTH_ACME).json()["data"]]
    assert names == ["cohort", "primary", "secondary", "long-context"]


# --- rate limit ---------------------------------------------------------------------------------
def test_rate_limit_gives_429_with_retry_after(redis_db: redis.Redis) -> None:
    with api_client(redis_db) as client:
        for remaining in (2, 1, 0):
            response = client.get("/v1/models", headers=AUTH_BETA)
            assert response.status_code == 200
            assert response.headers["x-ratelimit-remaining-requests"] == str(remaining)
        refused = client.get("/v1/models", headers=AUTH_BETA)
        assert refused.status_code == 429
        assert error_of(refused)["code"] == "rate_limit_exceeded" and error_of(refused)["type"] == "requests"
        assert 1 <= int(refused.headers["retry-after"]) <= 120
        # Other tenants keep their own allowance.
        assert client.get("/v1/models", headers=AUTH_ACME).status_code == 200


def test_a_request_of_n_prompts_counts_n(redis_db: redis.Redis) -> None:
    with api_client(redis_db) as client:
        too_big = client.post("/v1/prompts", headers=AUTH_BETA, json={"prompts": ["a", "b", "c", "d"]})
        assert too_big.status_code == 429 and too_big.headers["x-should-retry"] == "false"
        assert "split" in error_of(too_big)["message"]
        assert client.post("/v1/prompts", headers=AUTH_BETA, json={"prompts": ["a", "b"]}).status_code == 202
        assert client.post("/v1/prompts", headers=AUTH_BETA, json={"prompts": ["a", "b"]}).status_code == 429
        assert client.post("/v1/prompts", headers=AUTH_BETA, json={"prompt": "a"}).status_code == 202


# --- readiness ----------------------------------------------------------------------------------
def test_readiness_follows_worker_heartbeats_and_queue_depth(redis_db: redis.Redis) -> None:
    with api_client(redis_db, max_queue_depth=2) as client:
        not_ready = client.get("/readyz")
        assert not_ready.status_code == 503
        assert not_ready.json()["workers"]["alive"] == 0 and not_ready.json()["redis"]["ok"] is True
        now = time.time()
        redis_db.zadd(KEYS.heartbeats(), {"worker@a": now, "worker@stale": now - 3600})
        redis_db.set(KEYS.heartbeat("worker@a"), json.dumps({"node": "worker@a", "queues": "grouper,inference",
                                                             "ts": now}))
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        body = ready.json()
        assert body["status"] == "ready"
        assert body["workers"]["alive"] == 1 and body["workers"]["queues_served"] == ["grouper", "inference"]
        assert "worker@a" not in ready.text
        client.post("/v1/prompts", headers=AUTH_ACME, json={"prompts": ["a", "b", "c"]})
        redis_db.rpush("inference", b"{}")
        deep = client.get("/readyz")
        assert deep.status_code == 503
        assert deep.json()["queue"]["unclaimed"] == 3 and deep.json()["queue"]["tasks"]["inference"] == 1
        assert deep.json()["queue"]["total"] == 4


def test_redis_down_gives_503_not_500() -> None:
    cfg = config()
    cfg["redis"]["url"] = "redis://127.0.0.1:1/0"
    with TestClient(create_app(api_settings(cfg, {}))) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["redis"]["ok"] is False
        response = chat(client)
        assert response.status_code == 503 and error_of(response)["type"] == "service_unavailable"
