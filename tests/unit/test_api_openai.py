"""Mapping OpenAI chat requests to Cohort items, and answers back to OpenAI's format. Pure logic."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from ops.api.errors import ApiError, from_item_error
from ops.api.openai_compat import ChatCompletionRequest, completion, stream_events, to_submission
from producers.errors import (
    BudgetExceeded,
    ContextTooLong,
    DeadlineExceeded,
    FallbackExhausted,
    InvalidPrompt,
    ProviderUnavailable,
    RedeliveryLimit,
    ResultTimeout,
)
from producers.results import PromptResult

TIERS = ("primary", "secondary", "long-context")


def submission(**body: Any) -> dict[str, Any]:
    payload = {"model": "cohort", "messages": [{"role": "user", "content": "hi"}], **body}
    return to_submission(ChatCompletionRequest.model_validate(payload), TIERS)


def refused(**body: Any) -> ApiError:
    with pytest.raises(ApiError) as caught:
        submission(**body)
    assert caught.value.status == 400
    return caught.value


def test_last_user_message_is_the_prompt_and_history_becomes_context() -> None:
    s = submission(messages=[
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "developer", "content": "Answer in English."},
        {"role": "user", "content": [{"type": "text", "text": "Reset my PIN"}, {"type": "text", "text": "please"}]},
    ])
    assert s["prompt"] == "Reset my PIN\nplease"
    assert s["system"] == "You are terse.\n\nAnswer in English."
    assert s["context"] == "Conversation so far:\n\nUser: Hello\n\nAssistant: Hi! How can I help?"
    assert s["params"] == {} and s["coalesce"] is True


def test_a_single_question_has_no_context_or_system() -> None:
    s = submission()
    assert (s["prompt"], s["system"], s["context"]) == ("hi", None, None)


def test_cohort_options_and_document_context() -> None:
    s = submission(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": None},
                             {"role": "user", "content": "b"}],
                   cohort={"complexity": "complex", "deadline": 30, "coalesce": False, "max_cost": 0.5,
                           "context": "DOC", "metadata": {"k": 1}})
    assert s["context"] == "DOC\n\nConversation so far:\n\nUser: a\n\nAssistant: "
    assert (s["complexity"], s["deadline"], s["coalesce"], s["max_cost"], s["metadata"]) == \
        ("complex", 30.0, False, 0.5, {"k": 1})


@pytest.mark.parametrize(("model", "pinned"), [("primary", "primary"), ("long-context", "long-context"),
                                               ("cohort", None), ("auto", None), ("gpt-4o", None)])
def test_a_tier_name_pins_the_tier_and_other_names_route(model: str, pinned: str | None) -> None:
    assert submission(model=model)["params"].get("model") == pinned


def test_sampling_parameters() -> None:
    s = submission(max_tokens=10, max_completion_tokens=20, temperature=0.7, top_p=0.9, stop=["\n", "END"],
                   user="someone", seed=1, presence_penalty=0.0, metadata={"a": "b"}, store=False)
    assert s["params"] == {"max_tokens": 20, "temperature": 0.7, "top_p": 0.9, "stop": ["\n", "END"]}
    assert submission(max_tokens=10)["params"] == {"max_tokens": 10}
    assert submission(n=1, tool_choice="none", response_format={"type": "text"}, stream=False)["prompt"] == "hi"


@pytest.mark.parametrize(("body", "param"), [
    ({"n": 3}, "n"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"logprobs": True}, "logprobs"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "function", "content": "y", "name": "f"}]},
     "messages[1].role"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
                   {"role": "user", "content": "x"}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages[0].content[0].type"),
])
def test_unsupported_requests_are_refused_naming_the_parameter(body: dict[str, Any], param: str) -> None:
    assert refused(**body).param == param


@pytest.mark.parametrize("body", [
    {"model": "cohort", "messages": "hi"},
    {"model": "cohort"},
    {"model": 5, "messages": [{"role": "user", "content": "hi"}]},
    {"model": "cohort", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"},
    {"model": "cohort", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1.5},
    {"model": "cohort", "messages": [{"role": "user", "content": "hi"}], "bogus": 1},
])
def test_schema_errors(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(body)


def result(**overrides: Any) -> PromptResult:
    fields: dict[str, Any] = {"id": "item-1", "text": "Open the app, then Settings.", "tier": "secondary",
                              "model": "sim-small", "tokens_in": 12, "tokens_out": 6, "cost": 0.0001,
                              "coalesced": True}
    return PromptResult(**{**fields, **overrides})


def test_completion_object() -> None:
    body = completion(result(), item_id="item-1", created=1700000000, max_tokens=256)
    assert body["id"] == "chatcmpl-item-1" and body["model"] == "secondary" and body["created"] == 1700000000
    assert body["choices"][0]["message"]["content"] == "Open the app, then Settings."
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18}
    assert body["cohort"]["coalesced"] is True and body["cohort"]["provider_model"] == "sim-small"
    assert completion(result(tokens_out=6), item_id="i", created=0, max_tokens=6)["choices"][0]["finish_reason"] \
        == "length"
    assert completion(result(tier=None), item_id="i", created=0, max_tokens=6)["model"] == "cohort"


def test_stream_events_rebuild_the_text() -> None:
    text = "word " * 40 + "end."
    events = list(stream_events(result(text=text), item_id="i", created=1, max_tokens=256, include_usage=False,
                                chunk_chars=16))
    assert events[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
    assert all("usage" not in c for c in chunks)
    assert all(len(c["choices"][0]["delta"].get("content", "")) <= 16 for c in chunks)


@pytest.mark.parametrize(("error", "status", "code"), [
    (InvalidPrompt("bad", field="prompt"), 400, "invalid_prompt"),
    (ContextTooLong("too long"), 400, "context_length_exceeded"),
    (BudgetExceeded("no money"), 429, "budget_exceeded"),
    (ResultTimeout("slow"), 504, "result_timeout"),
    (DeadlineExceeded("late"), 504, "deadline_exceeded"),
    (ProviderUnavailable("down"), 502, "provider_unavailable"),
    (FallbackExhausted("all failed"), 502, "fallback_exhausted"),
    (RedeliveryLimit("again"), 502, "redelivery_limit"),
])
def test_item_errors_map_to_http(error: Any, status: int, code: str) -> None:
    api_error = from_item_error(error, item_id="item-9")
    assert (api_error.status, api_error.code) == (status, code)
    assert api_error.body()["error"]["item_id"] == "item-9"
