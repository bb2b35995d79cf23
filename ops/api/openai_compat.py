"""The OpenAI-compatible chat endpoint: a chat request becomes one Cohort item, its answer a completion.

Mapping of a request (``POST /v1/chat/completions``) to an item:

- the **last message** must come from the user: its text is the item's ``prompt``;
- ``system`` and ``developer`` messages, wherever they are, are joined (blank line between) into
  the item's ``system``;
- earlier ``user`` and ``assistant`` turns are folded into the item's ``context`` as a transcript::

      Conversation so far:

      User: <text>

      Assistant: <text>

  (after ``cohort.context``, a shared document, when one is given). Items with the same
  transcript may be packed into one upstream call, as items sharing a document are.
- ``model``: a tier name from ``[[tiers]]`` pins that tier; any other name (``cohort``, ``auto``,
  ``gpt-4o``...) lets Cohort route the item as usual. The response's ``model`` names the tier that
  answered.
- ``max_completion_tokens`` (or the older ``max_tokens``), ``temperature``, ``top_p``, ``stop``
  become the item's params; ``n`` must be 1.
- ``stream=true`` is served by sending the finished answer as ``chat.completion.chunk`` events
  (``stream_options.include_usage`` adds the usage chunk); errors come before the stream starts,
  as ordinary JSON errors.
- accepted and ignored: ``user``, ``seed``, ``metadata``, ``store``, ``service_tier``,
  ``parallel_tool_calls``, ``presence_penalty``, ``frequency_penalty``, ``reasoning_effort``.
  Refused with 400: tools and functions, ``logprobs``, ``logit_bias``, non-text ``response_format``,
  audio, non-text content parts, ``tool`` messages; any other unknown field.
- Cohort's own options go in an optional ``cohort`` object (``extra_body={"cohort": {...}}`` in the
  openai package): ``complexity``, ``deadline``, ``coalesce``, ``max_cost``, ``context``, ``metadata``.

Usage is the item's ``tokens_in``/``tokens_out``: its share of the upstream call that answered it
(0 for an answer shared from an identical question or served from the cache). ``finish_reason`` is
``length`` when the answer used all of ``max_tokens``, else ``stop``. A ``cohort`` object is added
to the completion (ignored by OpenAI clients): item id, tier, provider model, cost, whether the
answer was coalesced, cached or packed, and the pipeline's timings.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ops.api.errors import ApiError, invalid
from producers.results import PromptResult

ROUTING_MODELS = ("cohort", "auto")
_PIECES = re.compile(r"\S+\s*|\s+")


class ContentPart(BaseModel):
    """One part of a message's content; only ``text`` parts are supported."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One message. Fields OpenAI returns on assistant messages (``refusal``...) are tolerated."""

    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    function_call: Any | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class CohortOptions(BaseModel):
    """Cohort's own options for the item (all optional)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    complexity: Literal["simple", "medium", "complex"] | None = None
    deadline: float | None = Field(default=None, description="Seconds after which the item fails instead of waiting.")
    coalesce: bool = Field(default=True, description="False to never share an answer with another item.")
    max_cost: float | None = None
    context: str | None = Field(default=None, description="A shared document the question is about.")
    metadata: dict[str, Any] | None = None


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request, as far as Cohort supports it (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(..., description="A tier name pins that tier; 'cohort', 'auto' or any other routes.")
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=1000)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    cohort: CohortOptions | None = None
    # Accepted and ignored.
    user: str | None = None
    seed: int | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    reasoning_effort: str | None = None
    # Refused unless empty or default.
    tools: list[Any] | None = None
    tool_choice: Any | None = None
    functions: list[Any] | None = None
    function_call: Any | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: Any | None = None
    prediction: Any | None = None


def to_submission(request: ChatCompletionRequest, tiers: tuple[str, ...]) -> dict[str, Any]:
    """The keyword arguments of ``CohortClient.submit`` (tenant aside) for a chat request.

    Raises:
        ApiError: 400 naming the unsupported or inconsistent parameter.
    """
    _refuse_unsupported(request)
    texts: list[tuple[str, str]] = []
    for index, message in enumerate(request.messages):
        if message.role in ("tool", "function"):
            raise invalid(f"messages[{index}]: '{message.role}' messages are not supported (no tool calls)",
                          param=f"messages[{index}].role")
        if message.tool_calls or message.function_call:
            raise invalid(f"messages[{index}]: tool calls are not supported", param=f"messages[{index}].tool_calls")
        texts.append((message.role, _message_text(message, index)))
    last_role, prompt = texts[-1]
    if last_role != "user":
        raise invalid("the last message must come from the user", param=f"messages[{len(texts) - 1}].role")
    system = "\n\n".join(t for role, t in texts[:-1] if role in ("system", "developer") and t.strip())
    turns = [f"{'User' if role == 'user' else 'Assistant'}: {t}" for role, t in texts[:-1]
             if role in ("user", "assistant")]
    options = request.cohort or CohortOptions()
    context_parts = [options.context] if options.context else []
    if turns:
        context_parts.append("Conversation so far:\n\n" + "\n\n".join(turns))
    params: dict[str, Any] = {}
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    for name in ("temperature", "top_p", "stop"):
        value = getattr(request, name)
        if value is not None:
            params[name] = value
    if request.model in tiers:
        params["model"] = request.model
    submission: dict[str, Any] = {
        "prompt": prompt,
        "params": params,
        "system": system or None,
        "context": "\n\n".join(context_parts) or None,
        "coalesce": options.coalesce,
    }
    for name in ("complexity", "deadline", "max_cost", "metadata"):
        value = getattr(options, name)
        if value is not None:
            submission[name] = value
    return submission


def _refuse_unsupported(request: ChatCompletionRequest) -> None:
    if request.n is not None and request.n != 1:
        raise invalid("n must be 1: Cohort returns one choice per request", param="n")
    if request.tools or request.functions:
        raise invalid("tools and functions are not supported", param="tools" if request.tools else "functions")
    if request.tool_choice not in (None, "none") or request.function_call not in (None, "none"):
        raise invalid("tool_choice is not supported", param="tool_choice")
    if request.logprobs or request.top_logprobs:
        raise invalid("logprobs are not supported", param="logprobs")
    if request.logit_bias:
        raise invalid("logit_bias is not supported", param="logit_bias")
    if request.response_format is not None and request.response_format.get("type") != "text":
        raise invalid("only response_format {'type': 'text'} is supported", param="response_format")
    if request.audio is not None or (request.modalities is not None and request.modalities != ["text"]):
        raise invalid("only text output is supported", param="modalities")
    if request.prediction is not None:
        raise invalid("predicted outputs are not supported", param="prediction")
    if request.stream_options is not None and not request.stream:
        raise invalid("stream_options is only allowed with stream=true", param="stream_options")


def _message_text(message: ChatMessage, index: int) -> str:
    content = message.content
    if content is None:
        if message.role == "assistant":
            return ""
        raise invalid(f"messages[{index}].content is required", param=f"messages[{index}].content")
    if isinstance(content, str):
        return content
    texts = []
    for part_index, part in enumerate(content):
        if part.type != "text" or not isinstance(part.text, str):
            raise invalid(f"messages[{index}].content[{part_index}]: only text parts are supported",
                          param=f"messages[{index}].content[{part_index}].type")
        texts.append(part.text)
    return "\n".join(texts)


# --- responses -----------------------------------------------------------------------------
def completion_id(item_id: str) -> str:
    return f"chatcmpl-{item_id}"


def finish_reason(result: PromptResult, max_tokens: int | None) -> str:
    return "length" if max_tokens is not None and result.tokens_out >= max_tokens else "stop"


def usage(result: PromptResult) -> dict[str, int]:
    return {"prompt_tokens": result.tokens_in, "completion_tokens": result.tokens_out,
            "total_tokens": result.tokens_in + result.tokens_out}


def cohort_extension(result: PromptResult) -> dict[str, Any]:
    """What Cohort adds to a completion, under ``cohort`` (ignored by OpenAI clients)."""
    return {"item_id": result.id, "tier": result.tier, "provider_model": result.model, "cost": result.cost,
            "coalesced": result.coalesced, "cached": result.cached, "packed": result.packed,
            "timings": result.timings}


def completion(result: PromptResult, *, item_id: str, created: int, max_tokens: int | None) -> dict[str, Any]:
    """The ``chat.completion`` object of an answered item."""
    return {
        "id": completion_id(item_id),
        "object": "chat.completion",
        "created": created,
        "model": result.tier or "cohort",
        "system_fingerprint": None,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": result.text, "refusal": None},
            "logprobs": None,
            "finish_reason": finish_reason(result, max_tokens),
        }],
        "usage": usage(result),
        "cohort": cohort_extension(result),
    }


def stream_events(result: PromptResult, *, item_id: str, created: int, max_tokens: int | None,
                  include_usage: bool, chunk_chars: int) -> Iterator[str]:
    """The SSE events (``data: ...\\n\\n``) of the finished answer, ending with ``data: [DONE]``."""
    base = {"id": completion_id(item_id), "object": "chat.completion.chunk", "created": created,
            "model": result.tier or "cohort", "system_fingerprint": None}

    def event(delta: dict[str, Any], reason: str | None) -> str:
        chunk = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}
        if include_usage:
            chunk["usage"] = None
        return f"data: {json.dumps(chunk, ensure_ascii=False, separators=(',', ':'))}\n\n"

    yield event({"role": "assistant", "content": "", "refusal": None}, None)
    for piece in _pieces(result.text, chunk_chars):
        yield event({"content": piece}, None)
    yield event({}, finish_reason(result, max_tokens))
    if include_usage:
        final = {**base, "choices": [], "usage": usage(result), "cohort": cohort_extension(result)}
        yield f"data: {json.dumps(final, ensure_ascii=False, separators=(',', ':'))}\n\n"
    yield "data: [DONE]\n\n"


def _pieces(text: str, chunk_chars: int) -> Iterator[str]:
    piece = ""
    for token in _PIECES.findall(text):
        if piece and len(piece) + len(token) > chunk_chars:
            yield piece
            piece = ""
        piece += token
    if piece:
        yield piece


def unsupported_field(name: str) -> ApiError:
    """OpenAI's own wording for an unknown request field."""
    return invalid(f"Unrecognized request argument supplied: {name}", param=name, code="unknown_parameter")
