"""The provider simulator over real HTTP, driven by the official openai and anthropic clients."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from ops.simulator import answer_for, count_prompt_tokens, estimate_tokens
from tests.support.simulator import SimulatorHandle, run_simulator

pytestmark = pytest.mark.timeout(60)

SYSTEM = "You answer questions. Reply in JSON when asked to."
CONTEXT = "Cohort groups prompts.\n\nIt packs prompts that share a document into one call."


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorHandle]:
    with run_simulator(seed=0) as handle:
        yield handle


@pytest.fixture(autouse=True)
def _fresh(sim: SimulatorHandle) -> None:
    sim.reset()


@pytest.fixture
def client(sim: SimulatorHandle) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim.base_url, api_key="test-key", max_retries=0, timeout=10)


@pytest.fixture
def claude(sim: SimulatorHandle) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=sim.root_url, api_key="test-key", max_retries=0, timeout=10)


def _chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "sim-large", "messages": [{"role": "user", "content": content}], **extra}


def _single(client: openai.OpenAI, question: str, context: str | None = None) -> str:
    content = question if context is None else f"Context:\n{context}\n\nQuestion:\n{question}"
    reply = client.chat.completions.create(model="sim-large", messages=[{"role": "user", "content": content}])
    return reply.choices[0].message.content or ""


def _packed_prompt(questions: list[str], context: str | None) -> str:
    head = "" if context is None else f"Context:\n{context}\n\n"
    return head + "Questions:\n" + "\n".join(f"[{i}] {q}" for i, q in enumerate(questions, 1))


# --- answers ---------------------------------------------------------------------------------


def test_openai_client_completes_a_chat(client: openai.OpenAI) -> None:
    question = "What does Cohort do?"
    reply = client.chat.completions.create(
        model="sim-large",
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
    )
    content = reply.choices[0].message.content
    assert content == answer_for(question)
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    assert reply.model == "sim-large" and reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == count_prompt_tokens([SYSTEM, question])
    assert reply.usage.completion_tokens == estimate_tokens(content)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_single_call_reads_its_context(client: openai.OpenAI) -> None:
    assert _single(client, "Why pack?", CONTEXT) == answer_for("Why pack?", CONTEXT)
    assert _single(client, "Why pack?", CONTEXT) != answer_for("Why pack?")


def test_max_tokens_truncates_with_finish_reason_length(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(**_chat("Tell me everything."), max_tokens=5)
    assert reply.choices[0].message.content == answer_for("Tell me everything.")[:20]
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 5


def test_packed_call_answers_each_question_like_a_single_call(client: openai.OpenAI, sim: SimulatorHandle) -> None:
    questions = ["What does Cohort group?", "What shares a call?\nAnswer briefly,\nplease.", "Why?"]
    reply = client.chat.completions.create(
        model="sim-large",
        messages=[
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": _packed_prompt(questions, CONTEXT)},
        ],
        response_format={"type": "json_object"},
    )
    answers = json.loads(reply.choices[0].message.content or "")["answers"]
    assert [a["id"] for a in answers] == [1, 2, 3]
    for question, answer in zip(questions, answers, strict=True):
        assert answer["answer"] == answer_for(question, CONTEXT) == _single(client, question, CONTEXT)
    stats = sim.stats()
    assert stats["prompts"] == {"sim-large": 3 + 3}
    assert stats["calls"] == {"sim-large": {"ok": 4}}


def test_packed_without_context_and_miscount(client: openai.OpenAI, sim: SimulatorHandle) -> None:
    questions = ["one?", "two?", "three?"]
    request: dict[str, Any] = {
        "model": "sim-small",
        "response_format": {"type": "json_object"},
        "messages": [
            {"role": "system", "content": "Reply with a JSON object."},
            {"role": "user", "content": _packed_prompt(questions, None)},
        ],
    }
    full = json.loads(client.chat.completions.create(**request).choices[0].message.content or "")
    assert full == {"answers": [{"id": i, "answer": answer_for(q)} for i, q in enumerate(questions, 1)]}
    sim.set_faults("sim-small", packed_miscount_rate=1.0)
    short = json.loads(client.chat.completions.create(**request).choices[0].message.content or "")
    assert len(short["answers"]) == 2 and all(a in full["answers"] for a in short["answers"])
    assert sim.stats()["prompts"] == {"sim-small": 3 + 2}


def test_json_mode_needs_the_word_json(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="must contain the word 'json'"):
        client.chat.completions.create(**_chat("Questions:\n[1] a?"), response_format={"type": "json_object"})
    reply = client.chat.completions.create(**_chat("Answer in json: what?"), response_format={"type": "json_object"})
    assert json.loads(reply.choices[0].message.content or "") == {"answer": answer_for("Answer in json: what?")}


def test_streaming_sends_openai_chunks(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        **_chat("Stream this."), stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer_for("Stream this.")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == estimate_tokens(text)


def test_anthropic_client_gets_a_message(claude: anthropic.Anthropic, sim: SimulatorHandle) -> None:
    message = claude.messages.create(
        model="sim-small",
        max_tokens=200,
        system=SYSTEM,
        messages=[{"role": "user", "content": "Hello there?"}],
    )
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text" and message.content[0].text == answer_for("Hello there?")
    assert message.stop_reason == "end_turn" and message.model == "sim-small"
    assert message.usage.input_tokens == count_prompt_tokens([SYSTEM, "Hello there?"])
    assert message.usage.output_tokens == estimate_tokens(answer_for("Hello there?"))

    cut = claude.messages.create(
        model="sim-small", max_tokens=3, messages=[{"role": "user", "content": "Hello there?"}]
    )
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 3

    packed = claude.messages.create(
        model="sim-small",
        max_tokens=1000,
        messages=[{"role": "user", "content": _packed_prompt(["a?", "b?"], CONTEXT)}],
    )
    block = packed.content[0]
    assert block.type == "text"
    assert json.loads(block.text)["answers"][1] == {"id": 2, "answer": answer_for("b?", CONTEXT)}
    assert sim.stats()["calls"] == {"sim-small": {"ok": 3}}


# --- faults ----------------------------------------------------------------------------------


def test_429_carries_retry_after(sim: SimulatorHandle, client: openai.OpenAI) -> None:
    sim.set_faults("sim-large", error_429_rate=1.0, retry_after_s=2)
    response = httpx.post(f"{sim.base_url}/chat/completions", json=_chat("hi"))
    assert response.status_code == 429 and response.headers["retry-after"] == "2"
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(**_chat("hi"))
    assert sim.stats()["calls"] == {"sim-large": {"429": 2}}


def test_5xx_and_down(sim: SimulatorHandle, client: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    sim.set_faults("sim-large", error_5xx_rate=1.0)
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(**_chat("hi"))
    assert err.value.status_code == 500
    with pytest.raises(anthropic.InternalServerError):
        claude.messages.create(model="sim-large", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    sim.set_faults("*", down=True)
    sim.set_faults("sim-small", down=False)
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(**{**_chat("hi"), "model": "sim-long"})
    assert err.value.status_code == 503
    assert client.chat.completions.create(**{**_chat("hi"), "model": "sim-small"}).choices[0].message.content
    assert sim.stats()["calls"] == {"sim-large": {"5xx": 2}, "sim-long": {"down": 1}, "sim-small": {"ok": 1}}


def test_malformed_and_truncated_bodies(sim: SimulatorHandle) -> None:
    sim.set_faults("sim-large", malformed_rate=1.0)
    response = httpx.post(f"{sim.base_url}/chat/completions", json=_chat("hi"))
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        response.json()
    sim.set_faults("sim-large", malformed_rate=0.0, truncated_rate=1.0)
    response = httpx.post(f"{sim.base_url}/chat/completions", json=_chat("hi"))
    assert response.status_code == 200 and response.text.startswith('{"id": "chatcmpl-')
    with pytest.raises(json.JSONDecodeError):
        response.json()
    assert sim.stats()["calls"] == {"sim-large": {"malformed": 1, "truncated": 1}}


def test_timeout_hangs_past_the_client_deadline(sim: SimulatorHandle) -> None:
    sim.set_faults("sim-large", timeout_rate=1.0, hang_s=5)
    client = openai.OpenAI(base_url=sim.base_url, api_key="k", max_retries=0, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(**_chat("hi"))
    assert time.monotonic() - started < 2
    assert sim.stats()["calls"] == {"sim-large": {"timeout": 1}}


def test_context_window(sim: SimulatorHandle, client: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    sim.set_faults("*", context_window=60)
    assert client.chat.completions.create(**_chat("short"), max_tokens=20).choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="maximum context length is 60 tokens") as err:
        client.chat.completions.create(**_chat("x" * 400))
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**_chat("short"), max_tokens=100)  # prompt fits, completion does not
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(anthropic.BadRequestError, match="prompt is too long"):
        claude.messages.create(model="sim-small", max_tokens=10, messages=[{"role": "user", "content": "x" * 400}])
    assert sim.stats()["calls"] == {
        "sim-large": {"ok": 1, "context_length": 2},
        "sim-small": {"context_length": 1},
    }


def test_auth_error_knob(sim: SimulatorHandle, client: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    sim.set_faults("*", auth_error=True)
    with pytest.raises(openai.AuthenticationError) as err:
        client.chat.completions.create(**_chat("hi"))
    assert err.value.code == "invalid_api_key"
    with pytest.raises(anthropic.AuthenticationError):
        claude.messages.create(model="sim-large", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert sim.stats()["calls"] == {"sim-large": {"auth": 2}}


def test_same_seed_same_decisions(sim: SimulatorHandle) -> None:
    def run() -> list[int]:
        sim.reset()
        sim.set_faults("sim-large", error_5xx_rate=0.3, error_429_rate=0.2, retry_after_s=0)
        with httpx.Client() as http:
            return [http.post(f"{sim.base_url}/chat/completions", json=_chat("hi")).status_code for _ in range(30)]

    first = run()
    assert first == run()
    assert set(first) == {200, 429, 500}


def test_admin_rejects_unknown_knobs(sim: SimulatorHandle) -> None:
    with pytest.raises(ValueError, match="bogus: unknown knob"):
        sim.set_faults("sim-large", bogus=1)
    with pytest.raises(ValueError, match="error_5xx_rate"):
        sim.set_faults("sim-large", error_5xx_rate=2)


# --- protocol checks, stats, timing ----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, None, None),
        ({"model": "sim-large"}, "messages", "missing_required_parameter"),
        ({"model": "sim-large", "messages": "hi"}, "messages", "invalid_type"),
        ({"model": "sim-large", "messages": []}, "messages", "empty_array"),
        (
            {"model": "sim-large", "messages": [{"role": "robot", "content": "x"}]},
            "messages[0].role",
            "invalid_value",
        ),
        (
            {"model": "sim-large", "messages": [{"role": "user", "content": 3}]},
            "messages[0].content",
            "invalid_type",
        ),
        ({**_chat("x"), "max_tokens": 0}, "max_tokens", "invalid_value"),
    ],
)
def test_openai_request_validation(
    sim: SimulatorHandle, body: dict[str, Any], param: str | None, code: str | None
) -> None:
    response = httpx.post(f"{sim.base_url}/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["code"] == code
    assert error["message"]
    assert sum(sim.stats()["calls"][body.get("model", "unknown")].values()) == 1


def test_bad_bodies_and_anthropic_validation(sim: SimulatorHandle) -> None:
    response = httpx.post(
        f"{sim.base_url}/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "parse the JSON body" in response.json()["error"]["message"]
    headers = {"anthropic-version": "2023-06-01"}
    message = {"model": "sim-large", "messages": [{"role": "user", "content": "hi"}]}
    response = httpx.post(f"{sim.base_url}/messages", json=message, headers=headers)
    assert response.status_code == 400
    assert response.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
    }
    response = httpx.post(f"{sim.base_url}/messages", json={**message, "max_tokens": 5})
    assert response.status_code == 400 and "anthropic-version" in response.json()["error"]["message"]
    assert sim.stats()["calls"] == {"unknown": {"bad_request": 1}, "sim-large": {"bad_request": 2}}


def test_models_health_and_stats(sim: SimulatorHandle, client: openai.OpenAI) -> None:
    assert httpx.get(f"{sim.root_url}/health").json() == {"status": "ok"}
    client.chat.completions.create(**_chat("one"))
    client.chat.completions.create(**{**_chat("two"), "model": "my-model"})
    assert {"sim-large", "sim-small", "sim-long", "my-model"} <= {m.id for m in client.models.list()}
    stats = sim.stats()
    assert stats["requests"] == 2
    assert stats["calls"] == {"sim-large": {"ok": 1}, "my-model": {"ok": 1}}
    assert stats["tokens_in"]["sim-large"] == count_prompt_tokens(["one"])
    assert stats["tokens_out"]["my-model"] == estimate_tokens(answer_for("two"))
    assert stats["prompts"] == {"sim-large": 1, "my-model": 1}


def test_latency_counts_overhead_per_call_and_latency_per_question(sim: SimulatorHandle, client: openai.OpenAI) -> None:
    sim.set_faults("sim-large", overhead_ms=100, latency_ms=80)
    started = time.monotonic()
    client.chat.completions.create(**_chat("one question"))
    single = time.monotonic() - started
    started = time.monotonic()
    client.chat.completions.create(
        **_chat(_packed_prompt(["a", "b", "c"], None) + "\nReply in JSON."),
        response_format={"type": "json_object"},
    )
    packed = time.monotonic() - started
    assert 0.18 <= single < packed and packed >= 0.34


def test_hundreds_of_concurrent_calls_overlap(sim: SimulatorHandle) -> None:
    sim.set_faults("*", latency_ms=400)

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=sim.base_url, limits=limits, timeout=20) as http:
            return await asyncio.gather(*(http.post("/chat/completions", json=_chat(f"q{i}")) for i in range(150)))

    started = time.monotonic()
    responses = asyncio.run(burst())
    assert time.monotonic() - started < 4  # 150 x 0.4 s in sequence would be 60 s
    assert [r.json()["choices"][0]["message"]["content"] for r in responses] == [
        answer_for(f"q{i}") for i in range(150)
    ]


# --- a keyed simulator with start-up faults ----------------------------------------------------

SECRET = "sk-simulator-secret-4242"
PRIVATE_PROMPT = "my private prompt text 9731"


def test_require_key_and_start_up_faults() -> None:
    faults = {"sim-flaky": {"down": True}}
    with run_simulator(require_key=SECRET, faults=faults, log_level="debug") as keyed:
        good = openai.OpenAI(base_url=keyed.base_url, api_key=SECRET, max_retries=0, timeout=10)
        bad = openai.OpenAI(base_url=keyed.base_url, api_key="wrong", max_retries=0, timeout=10)
        assert good.chat.completions.create(**_chat(PRIVATE_PROMPT)).choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(**_chat(PRIVATE_PROMPT))
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        message: dict[str, Any] = {
            "model": "sim-large",
            "max_tokens": 50,
            "messages": [{"role": "user", "content": "hi"}],
        }
        claude = anthropic.Anthropic(base_url=keyed.root_url, api_key=SECRET, max_retries=0, timeout=10)
        assert claude.messages.create(**message).content
        with pytest.raises(anthropic.AuthenticationError):
            anthropic.Anthropic(base_url=keyed.root_url, api_key="wrong", max_retries=0).messages.create(**message)
        url, version = f"{keyed.base_url}/messages", {"anthropic-version": "2023-06-01"}
        assert httpx.post(url, json=message, headers={**version, "x-api-key": SECRET}).status_code == 200
        assert httpx.post(url, json=message, headers={**version, "x-api-key": "wrong"}).status_code == 401
        assert keyed.stats()["calls"] == {"sim-large": {"ok": 3, "auth": 3}}

        keyed.reset()  # start-up faults survive a reset
        with pytest.raises(openai.InternalServerError):
            good.chat.completions.create(**{**_chat("hi"), "model": "sim-flaky"})
        assert keyed.stats()["calls"] == {"sim-flaky": {"down": 1}}
        logs = keyed.logs()
        assert logs.startswith("simulator listening on http://127.0.0.1:")
        assert SECRET not in logs and PRIVATE_PROMPT not in logs


def test_bad_start_up_faults_stop_the_simulator() -> None:
    with (
        pytest.raises(RuntimeError, match=r"(?s)exited with 2.*bogus: unknown knob"),
        run_simulator(faults={"sim-large": {"bogus": 1}}),
    ):
        pass
