"""Pure routing rules: start tier, context skips, backoff bounds, the attempt cap, adapters."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest

from producers.errors import (
    ContextTooLong,
    MalformedResponse,
    ProviderAuthError,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
)
from workers.tiers.adapters import AnthropicAdapter, OpenAIAdapter, parse_retry_after, redact, transport_error
from workers.tiers.config import RoutingConfig, TierConfig, parse_routing
from workers.tiers.policy import backoff_delay, decide, max_calls, plan_chain
from workers.tiers.router import CallRequest
from workers.tiers.tokens import estimate_tokens, fits_context, upper_bound_tokens


def make_routing(**over: Any) -> RoutingConfig:
    raw = {
        "tiers": [
            {"name": "primary", "provider": "openai", "base_url": "http://h/v1", "model": "big",
             "price_in_per_1k": 0.01, "price_out_per_1k": 0.03, "context_window": 8192, "timeout_s": 5,
             "max_retries": 2},
            {"name": "secondary", "provider": "openai", "base_url": "http://h/v1", "model": "small",
             "price_in_per_1k": 0.0005, "price_out_per_1k": 0.0015, "context_window": 4096, "timeout_s": 5,
             "max_retries": 2, "strength": 1},
            {"name": "long", "provider": "anthropic", "base_url": "http://h/v1", "model": "long",
             "price_in_per_1k": 0.003, "price_out_per_1k": 0.015, "context_window": 128000, "timeout_s": 5,
             "max_retries": 2, "strength": 2},
        ],
        "routing": {"medium_start": "secondary", "max_attempts_per_item": 4, **over},
    }
    return parse_routing(raw, {})


ROUTING = make_routing()


def names(chain: list[TierConfig]) -> list[str]:
    return [t.name for t in chain]


# --- start tier and chain ------------------------------------------------------------------------
@pytest.mark.parametrize(("complexity", "expected"), [
    ("simple", ["secondary", "primary", "long"]),
    ("complex", ["primary", "secondary", "long"]),
    ("medium", ["secondary", "primary", "long"]),
])
def test_start_tier_by_complexity(complexity: str, expected: list[str]) -> None:
    chain, too_small = plan_chain(ROUTING, complexity=complexity, prompt_tokens=50, max_tokens=256)
    assert names(chain) == expected
    assert too_small == []


def test_medium_start_from_config() -> None:
    routing = make_routing(medium_start="long")
    chain, _ = plan_chain(routing, complexity="medium", prompt_tokens=50, max_tokens=256)
    assert names(chain) == ["long", "primary", "secondary"]


def test_simple_takes_the_cheapest_tier_that_fits() -> None:
    chain, too_small = plan_chain(ROUTING, complexity="simple", prompt_tokens=6000, max_tokens=256)
    assert names(too_small) == ["secondary"]
    # primary costs 0.01/0.03, long 0.003/0.015: long is the cheapest that fits.
    assert names(chain) == ["long", "primary"]


def test_long_prompts_skip_small_tiers_before_any_call() -> None:
    chain, too_small = plan_chain(ROUTING, complexity="complex", prompt_tokens=20000, max_tokens=256)
    assert names(chain) == ["long"]
    assert names(too_small) == ["primary", "secondary"]
    chain, too_small = plan_chain(ROUTING, complexity="complex", prompt_tokens=200000, max_tokens=256)
    assert chain == [] and len(too_small) == 3


def test_max_tokens_counts_against_the_window() -> None:
    chain, _ = plan_chain(ROUTING, complexity="simple", prompt_tokens=100, max_tokens=4000)
    assert "secondary" not in names(chain)


def test_medium_start_too_small_moves_to_the_next_tier_after_it() -> None:
    chain, _ = plan_chain(ROUTING, complexity="medium", prompt_tokens=6000, max_tokens=256)
    assert names(chain) == ["long", "primary"]


def test_pinned_tier_is_the_whole_chain() -> None:
    chain, _ = plan_chain(ROUTING, complexity="simple", prompt_tokens=10, max_tokens=10, pinned="primary")
    assert names(chain) == ["primary"]


# --- tokens ------------------------------------------------------------------------------------------
def test_token_estimates() -> None:
    messages = [{"role": "user", "content": "x" * 400}]
    assert estimate_tokens(messages) == math.ceil((100 + 4 + 3) * 1.15)
    assert upper_bound_tokens(messages) == 400 + 4 + 3
    # Upper bound: bytes, so multi-byte text is never undercounted.
    assert upper_bound_tokens([{"role": "user", "content": "é" * 10}]) == 20 + 7
    assert fits_context(100, 50, 50) and not fits_context(100, 51, 50)


def test_upper_bound_is_above_the_simulator_count() -> None:
    from ops.simulator import count_prompt_tokens
    texts = ["You are brief.", "How do I top up my card?" * 7, "∑ unicode ✓" * 30]
    messages = [{"role": "user", "content": t} for t in texts]
    assert upper_bound_tokens(messages) >= count_prompt_tokens(texts)
    assert estimate_tokens(messages) >= count_prompt_tokens(texts)


# --- backoff -----------------------------------------------------------------------------------------
def test_full_jitter_bounds() -> None:
    rng = random.Random(1)
    for retry in range(8):
        ceiling = min(4.0, 0.25 * 2 ** retry)
        samples = [backoff_delay(retry, base_s=0.25, max_s=4.0, rng=rng) for _ in range(400)]
        assert all(0.0 <= s <= ceiling for s in samples)
        # Full jitter spreads over the whole range, not just its top.
        assert min(samples) < ceiling * 0.1 and max(samples) > ceiling * 0.9


def test_retry_after_is_a_floor() -> None:
    rng = random.Random(2)
    assert all(backoff_delay(0, base_s=0.1, max_s=1.0, retry_after_s=2.5, rng=rng) == 2.5 for _ in range(50))


def test_huge_retry_index_does_not_overflow() -> None:
    assert backoff_delay(10_000, base_s=1.0, max_s=3.0, rng=random.Random(0)) <= 3.0


# --- decisions ---------------------------------------------------------------------------------------
def unavailable(**details: Any) -> ProviderUnavailable:
    return ProviderUnavailable("boom", reason="http_5xx", **details)


def step(error: ProviderError, *, tier_attempts: int = 1, total: int = 1, now: float = 0.0,
         deadline: float | None = None, opened: bool = False, routing: RoutingConfig = ROUTING) -> Any:
    return decide(error, tier=routing.tiers[0], tier_attempts=tier_attempts, total_attempts=total,
                  routing=routing, now=now, deadline=deadline, circuit_opened=opened, rng=random.Random(0))


def test_error_classes_decide_the_next_step() -> None:
    assert step(ProviderRejected("no", reason="rejected")).kind == "fail"
    assert step(ContextTooLong("long", reason="context_too_long")).kind == "next_tier"
    assert step(ProviderAuthError("key", reason="auth_error")).kind == "next_tier"
    assert step(unavailable()).kind == "retry"
    assert step(MalformedResponse("bad", reason="malformed")).kind == "retry"


def test_retries_stop_at_the_tier_limit_then_fall_over() -> None:
    assert step(unavailable(), tier_attempts=3, total=3).kind == "next_tier"  # max_retries=2: 3 calls here
    assert step(unavailable(), tier_attempts=2, total=2).kind == "retry"


def test_cap_stops_everything() -> None:
    s = step(unavailable(), tier_attempts=1, total=4)
    assert (s.kind, s.reason) == ("stop", "attempt_cap")


def test_open_circuit_moves_on_without_waiting() -> None:
    s = step(unavailable(), opened=True)
    assert (s.kind, s.reason, s.delay_s) == ("next_tier", "circuit_open", 0.0)


def test_retry_after_honoured_or_moved_on_when_too_long() -> None:
    s = step(unavailable(retry_after_s=0.7))
    assert s.kind == "retry" and s.delay_s >= 0.7
    s = step(unavailable(retry_after_s=ROUTING.max_retry_after_s + 1))
    assert s.kind == "next_tier" and s.delay_s == 0.0


def test_backoff_never_passes_the_deadline() -> None:
    s = step(unavailable(retry_after_s=2.0), now=100.0, deadline=101.0)
    assert s.kind == "next_tier"


def simulate(routing: RoutingConfig, errors_on: set[str], complexity: str = "complex") -> list[str]:
    """The router's loop reduced to decisions: every call on a tier in ``errors_on`` fails retryably."""
    chain, _ = plan_chain(routing, complexity=complexity, prompt_tokens=10, max_tokens=10)
    calls: list[str] = []
    for tier in chain:
        tier_calls = 0
        while True:
            if len(calls) >= routing.max_attempts_per_item:
                return calls
            calls.append(tier.name)
            tier_calls += 1
            if tier.name not in errors_on:
                return calls
            s = decide(unavailable(), tier=tier, tier_attempts=tier_calls, total_attempts=len(calls),
                       routing=routing, now=0.0, deadline=None, rng=random.Random(0))
            if s.kind == "stop":
                return calls
            if s.kind != "retry":
                break
    return calls


@pytest.mark.parametrize("cap", [1, 2, 3, 4, 5, 9, 20])
def test_attempt_cap_math(cap: int) -> None:
    routing = make_routing(max_attempts_per_item=cap)
    calls = simulate(routing, errors_on={"primary", "secondary", "long"})
    # Per-tier retries (3 calls per tier) never multiply past the item cap.
    assert len(calls) == min(cap, 9) == max_calls(routing, list(routing.tiers))
    calls = simulate(routing, errors_on={"primary"})
    assert calls == (["primary"] * min(cap, 3) + (["secondary"] if cap > 3 else []))


# --- adapters ----------------------------------------------------------------------------------------
TIER = ROUTING.tiers[0]
ANTHROPIC_TIER = ROUTING.tiers[2]
REQUEST = CallRequest(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                      max_tokens=32, stop=("\n\n",), top_p=0.9, json_mode=True)


def test_openai_request_shape() -> None:
    url, headers, body = OpenAIAdapter().build_request(TIER, REQUEST, "sk-test")
    assert url == "http://h/v1/chat/completions"
    assert headers["Authorization"] == "Bearer sk-test"
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert body["max_tokens"] == 32 and body["stop"] == ["\n\n"] and body["top_p"] == 0.9
    assert body["response_format"] == {"type": "json_object"}


def test_azure_style_base_url_and_header() -> None:
    tier = TierConfig(name="az", provider="openai", base_url="https://x.openai.azure.com/openai/deployments/d?api-version=2024-06-01",
                      model="d", api_key_env="K", price_in_per_1k=0, price_out_per_1k=0, context_window=1000,
                      timeout_s=1, max_retries=0, auth_header="api-key")
    url, headers, _ = OpenAIAdapter().build_request(tier, REQUEST, "k")
    assert url == "https://x.openai.azure.com/openai/deployments/d/chat/completions?api-version=2024-06-01"
    assert headers["api-key"] == "k" and "Authorization" not in headers


def test_anthropic_request_shape() -> None:
    url, headers, body = AnthropicAdapter().build_request(ANTHROPIC_TIER, REQUEST, "k")
    assert url == "http://h/v1/messages"
    assert headers["x-api-key"] == "k" and headers["anthropic-version"]
    assert body["system"].startswith("Be brief.") and "JSON" in body["system"]
    assert body["messages"] == [{"role": "user", "content": "Hi"}]
    assert body["stop_sequences"] == ["\n\n"]


def ok_openai(**over: Any) -> bytes:
    data = {"model": "big", "choices": [{"message": {"role": "assistant", "content": "hello"},
                                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3}}
    data.update(over)
    return json.dumps(data).encode()


def test_openai_parse_ok_and_malformed() -> None:
    result = OpenAIAdapter().parse_response(TIER, 200, {}, ok_openai())
    assert (result.text, result.tokens_in, result.tokens_out, result.usage_reported) == ("hello", 12, 3, True)
    assert OpenAIAdapter().parse_response(TIER, 200, {}, ok_openai(usage=None)).usage_reported is False
    for body in (b"<html>502</html>", ok_openai()[:40], json.dumps({"choices": []}).encode(), b"[1]",
                 json.dumps({"choices": [{"message": {"content": None}}]}).encode()):
        with pytest.raises(MalformedResponse):
            OpenAIAdapter().parse_response(TIER, 200, {}, body)


def test_anthropic_parse_ok() -> None:
    body = json.dumps({"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "model": "long",
                       "stop_reason": "max_tokens", "usage": {"input_tokens": 5, "output_tokens": 2}}).encode()
    result = AnthropicAdapter().parse_response(ANTHROPIC_TIER, 200, {}, body)
    assert (result.text, result.tokens_in, result.tokens_out, result.finish_reason) == ("ab", 5, 2, "length")


def err(message: str, code: str | None = None, kind: str = "invalid_request_error") -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()


@pytest.mark.parametrize(("status", "body", "headers", "cls"), [
    (500, err("oops", kind="server_error"), {}, ProviderUnavailable),
    (503, b"", {}, ProviderUnavailable),
    (529, err("overloaded", kind="overloaded_error"), {}, ProviderUnavailable),
    (429, err("slow down"), {"Retry-After": "3"}, ProviderUnavailable),
    (401, err("Incorrect API key provided: sk-abc***xyz", "invalid_api_key"), {}, ProviderAuthError),
    (403, err("forbidden", kind="permission_error"), {}, ProviderAuthError),
    (400, err("maximum context length is 4096 tokens", "context_length_exceeded"), {}, ContextTooLong),
    (400, json.dumps({"type": "error", "error": {"type": "invalid_request_error",
                                                  "message": "prompt is too long: 9000 tokens > 4096 maximum"}}
                     ).encode(), {}, ContextTooLong),
    (400, err("bad temperature"), {}, ProviderRejected),
    (404, err("no such model"), {}, ProviderRejected),
])
def test_error_classification(status: int, body: bytes, headers: dict[str, str], cls: type) -> None:
    for adapter, tier in ((OpenAIAdapter(), TIER), (AnthropicAdapter(), ANTHROPIC_TIER)):
        with pytest.raises(cls) as info:
            adapter.parse_response(tier, status, headers, body, api_key="sk-abc-secret")
        assert info.type is cls
        assert "sk-abc" not in info.value.message
        if status == 429:
            assert info.value.details["retry_after_s"] == 3.0


def test_key_is_scrubbed_from_echoed_errors() -> None:
    body = err("key sk-live-1234567890 is wrong, also my-own-key-value")
    with pytest.raises(ProviderAuthError) as info:
        OpenAIAdapter().parse_response(TIER, 401, {}, body, api_key="my-own-key-value")
    assert "1234567890" not in info.value.message and "my-own-key-value" not in info.value.message
    assert redact("x" * 1000, None) == "x" * 300


def test_retry_after_forms() -> None:
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"Retry-After": "2"}) == 2.0
    assert parse_retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, now=1445412470.0) == 10.0
    assert parse_retry_after({"Retry-After": "soon"}) is None
    assert parse_retry_after({"Retry-After": "-1"}) is None
    assert parse_retry_after({}) is None


def test_transport_errors_are_retryable() -> None:
    import httpx
    e = transport_error(TIER, httpx.ReadTimeout("t"), timeout_s=0.5)
    assert e.retryable and e.details["reason"] == "timeout"
    e = transport_error(TIER, httpx.ConnectError("c"), timeout_s=0.5)
    assert e.retryable and e.details["reason"] == "connect_error"
