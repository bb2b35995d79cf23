"""The HTTP API end to end: the API server, a grouper, an inference worker, beat and the provider
simulator as real processes on loopback, Redis db 10. Clients are the official ``openai`` package,
plain HTTP, and a Celery client that knows only the task name."""

from __future__ import annotations

import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import openai
import pytest
from celery import Celery

from ops.api.settings import hash_key
from ops.simulator import answer_for
from tests.support.cluster import REPO_ROOT, Cohort, run_cohort, wait_until

pytestmark = pytest.mark.timeout(240)

DB = 10
KEY_ACME = "ck-e2e-acme-0123456789abcdef"
KEY_BETA = "ck-e2e-beta-0123456789abcdef"
KEY_BROKE = "ck-e2e-broke-0123456789abcdef"
TIERS = ("primary", "secondary", "long-context")


@dataclass
class Stack:
    cohort: Cohort
    url: str

    def openai(self, key: str = KEY_ACME) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=90)

    def http(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=90)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    config = {
        "api": {"keys": {hash_key(KEY_ACME): "acme", hash_key(KEY_BETA): "beta", hash_key(KEY_BROKE): "broke"},
                "rate_limit_rpm": 0, "chat_timeout_s": 90.0},
        "budgets": {"tenants": {"broke": {"daily": 0.0}}},
    }
    with run_cohort(db=DB, config=config, inference_workers=0) as cohort:
        # Until workers.app includes workers.submit_task, the worker is told to import it.
        node = f"inference-api-{uuid.uuid4().hex[:6]}@test"
        cohort.start("inference", ["worker", "-Q", "inference", "-P", "threads", "-c", "8", "-n", node,
                                   "--without-gossip", "--without-mingle", "-l", "warning",
                                   "--include", "workers.submit_task"], node=node)
        port = _free_port()
        log = open(cohort.workdir / "api.log", "ab")  # noqa: SIM115 - closed by stop_all's process end
        cohort.processes["api"] = subprocess.Popen(
            [sys.executable, "-m", "ops.api", "--config", str(cohort.config_path), "--port", str(port),
             "--log-level", "warning"], cwd=REPO_ROOT, env=cohort.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            if cohort.processes["api"].poll() is not None:
                raise RuntimeError(f"the API exited:\n{cohort.log('api')}")
            return _healthy(url)

        wait_until(up, timeout=30, message="the API's /healthz")
        yield Stack(cohort, url)


def test_openai_client_gets_answers_with_usage_and_the_tier(stack: Stack) -> None:
    client = stack.openai()
    question = "How long does a card transfer take between two banks?"
    response = client.chat.completions.create(model="cohort", messages=[{"role": "user", "content": question}])
    assert response.choices[0].message.content == answer_for(question)
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.model in TIERS
    assert response.id.startswith("chatcmpl-")
    assert response.usage is not None and response.usage.prompt_tokens > 0 and response.usage.completion_tokens > 0
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens

    pinned = client.chat.completions.create(
        model="secondary", max_completion_tokens=64,
        messages=[{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "Why was my card declined at the shop?"}])
    assert pinned.model == "secondary"

    stream = client.chat.completions.create(
        model="cohort", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Can I change my PIN at an ATM?"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer_for("Can I change my PIN at an ATM?")
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


def test_identical_concurrent_questions_take_fewer_upstream_calls(stack: Stack) -> None:
    client = stack.openai()
    question = f"What is the fee for a foreign currency payment? ({uuid.uuid4().hex[:6]})"
    before = stack.cohort.upstream_calls()

    def ask(_: int) -> str | None:
        response = client.chat.completions.create(model="cohort", messages=[{"role": "user", "content": question}])
        return response.choices[0].message.content

    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(ask, range(20)))
    calls = stack.cohort.upstream_calls() - before
    assert answers == [answer_for(question)] * 20
    assert 1 <= calls < 20, f"{calls} upstream calls for 20 identical questions"


def test_auth_failures(stack: Stack) -> None:
    with pytest.raises(openai.AuthenticationError):
        stack.openai("ck-wrong-key-0123456789abcdef").chat.completions.create(
            model="cohort", messages=[{"role": "user", "content": "hello"}])
    assert httpx.post(f"{stack.url}/v1/prompts", json={"prompt": "hello"}).status_code == 401


def test_budget_exhausted_is_429_insufficient_quota(stack: Stack) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        stack.openai(KEY_BROKE).chat.completions.create(
            model="cohort", messages=[{"role": "user", "content": "Where is my refund?"}])
    assert caught.value.code == "budget_exceeded" and caught.value.type == "insufficient_quota"


def test_native_submit_long_poll_batch_status_and_tenant_isolation(stack: Stack) -> None:
    questions = ["How do I order a new card?", "Is there a limit on cash withdrawals?"]
    with stack.http(KEY_ACME) as acme, stack.http(KEY_BETA) as beta:
        submitted = acme.post("/v1/prompts", json={"prompts": questions, "complexity": "simple"})
        assert submitted.status_code == 202
        ids = submitted.json()["ids"]
        assert beta.get(f"/v1/prompts/{ids[0]}").status_code == 404
        first = acme.get(f"/v1/prompts/{ids[0]}", params={"wait": 60})
        assert first.json()["status"] == "answered"
        assert first.json()["result"]["text"] == answer_for(questions[0])
        both = acme.post("/v1/prompts/status", json={"ids": ids, "wait": 60}).json()["data"]
        assert [d["result"]["text"] for d in both] == [answer_for(q) for q in questions]
        hidden = beta.post("/v1/prompts/status", json={"ids": ids}).json()["data"]
        assert [d["status"] for d in hidden] == ["not_found", "not_found"]
        assert beta.get(f"/v1/prompts/{ids[0]}", params={"wait": 1}).status_code == 404


def test_readiness_sees_the_workers(stack: Stack) -> None:
    ready = httpx.get(f"{stack.url}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["workers"]["alive"] >= 2
    assert {"grouper", "inference"} <= set(body["workers"]["queues_served"])
    assert httpx.get(f"{stack.url}/openapi.json", timeout=10).json()["paths"]["/v1/chat/completions"]


def test_celery_native_submission_by_task_name(stack: Stack) -> None:
    url = stack.cohort.client.settings.redis.url
    app = Celery("any-service", broker=url, backend=url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
    question = "How can I close my account?"
    result = app.send_task("cohort.submit", kwargs={"prompt": question, "tenant": "acme"}, queue="inference",
                           kwargsrepr="{'prompt': '<redacted>'}")
    answer = result.get(timeout=60)
    assert answer["text"] == answer_for(question) and answer["id"] == result.id
    assert app.AsyncResult(result.id).state == "SUCCESS"
    # The same id works over HTTP, for the submitting tenant only.
    with stack.http(KEY_ACME) as acme, stack.http(KEY_BETA) as beta:
        assert acme.get(f"/v1/prompts/{result.id}").json()["result"]["text"] == answer_for(question)
        assert beta.get(f"/v1/prompts/{result.id}").status_code == 404
    refused = app.send_task("cohort.submit", kwargs={"prompt": "", "tenant": "acme"}, queue="inference")
    with pytest.raises(Exception, match="prompt"):
        refused.get(timeout=30)
    assert question not in stack.cohort.log("inference")
    app.close()
