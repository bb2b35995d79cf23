"""A loopback LLM provider simulator: OpenAI- and Anthropic-compatible, deterministic, with faults.

It stands in for paid APIs in tests, demos and benchmarks. It speaks the real wire protocols, so a
Cohort tier pointed at it is configured exactly like one pointed at OpenAI, vLLM or Ollama.

Command line::

    python -m ops.simulator --host 127.0.0.1 --port PORT [--seed 0] [--latency-ms 0] [--jitter-ms 0]
        [--overhead-ms 0] [--faults JSON] [--require-key KEY] [--log-level warning]

Once it accepts connections it prints one line, ``simulator listening on http://HOST:PORT``
(``--port 0`` picks a free port and prints the real one). It never logs prompt text or keys.

Endpoints:
    ``POST /v1/chat/completions``  OpenAI chat completions (``stream=true`` answers in SSE chunks).
    ``POST /v1/messages``          Anthropic Messages (needs ``anthropic-version``; no streaming;
                                   the key comes as ``x-api-key`` or ``Authorization: Bearer``).
    ``GET /v1/models``             OpenAI model list.  ``GET /health``: ``{"status": "ok"}``.
    ``POST /admin/faults``         ``{"model": "sim-large" | "*", <knobs>}`` merges knobs at run time.
    ``POST /admin/reset``          back to the start-up knobs, empty stats, random generator re-seeded.
    ``GET /admin/stats``           ``{"requests", "calls": {model: {outcome: n}}, "tokens_in",
                                   "tokens_out", "prompts": {model: questions answered}}``.

Answers are pure functions of the text (:func:`answer_for`), so a test can recompute the expected
answer of any prompt. The question of a single call is the last user message; it may carry a
shared context in this form (otherwise the whole message is the question)::

    Context:
    <context text, any number of lines>

    Question:
    <question text>

A packed call (OpenAI: ``response_format`` ``json_object`` or ``json_schema``; Anthropic: any call
whose last user message has this form) carries several questions, numbered, in its last user
message; the ``Context:`` block is optional and a question runs until the next line that starts
with ``[n] ``. The context ends at the first line ``Questions:`` that is followed by a ``[n] `` line::

    Context:
    <context text>

    Questions:
    [1] first question
    [2] second question,
    possibly on several lines

The reply content is ``{"answers": [{"id": 1, "answer": "..."}, ...]}`` where each answer equals
``answer_for(question, context)``: the text a single call with that question and context gets.
A JSON-mode call that is not packed gets ``{"answer": "..."}``. As OpenAI does, JSON mode needs
the word "json" somewhere in the messages (a system message is the usual place), else 400.
Replies longer than ``max_tokens`` are cut to ``max_tokens * 4`` characters (finish reason
``length`` / ``max_tokens``); a cut packed reply is therefore not valid JSON, as with a real model.

Knobs, per model, ``*`` being the default for every model (``--faults '{"*": {...}, "m": {...}}'``):
    ``latency_ms``   delay per question answered (1 for a single call, n for a packed call).
    ``jitter_ms``    uniform +/- noise on the whole delay.      ``overhead_ms``: fixed delay per call.
    ``error_5xx_rate``, ``error_429_rate`` (with ``retry_after_s``, sent as ``Retry-After``),
    ``timeout_rate`` (with ``hang_s``: wait that long, default 30, before answering),
    ``malformed_rate`` (200, non-JSON body), ``truncated_rate`` (200, JSON body cut in half),
    ``packed_miscount_rate`` (a packed answer drops one item), ``auth_error`` (401 on every call),
    ``down`` (503 on every call), ``context_window`` (prompt tokens + max_tokens above it: 400).

Every call draws the same four numbers from one ``random.Random(seed)``, whatever the knobs, so
a run with the same seed, knobs and call order makes the same decisions.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import hmac
import itertools
import json
import math
import random
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

__all__ = [
    # deterministic answers
    "answer_for",
    "count_prompt_tokens",
    "estimate_tokens",
    "parse_packed",
    "parse_single",
    "truncate_to_tokens",
    # server
    "Knobs",
    "SimulatorState",
    "create_app",
    "main",
    "validate_knobs",
]

OUTCOMES = ("ok", "5xx", "429", "timeout", "malformed", "truncated", "auth", "context_length",
            "bad_request", "down")
DEFAULT_MODELS = ("sim-small", "sim-large", "sim-long")

# ---------------------------------------------------------------------------------------------
# Deterministic answers
# ---------------------------------------------------------------------------------------------

_CHARS_PER_TOKEN = 4
_TOKENS_PER_MESSAGE = 4
_TOKENS_PER_REPLY = 3
_FILLER = (
    "amber", "basin", "cedar", "delta", "ember", "fjord", "grove", "harbor", "inlet", "juniper",
    "kestrel", "lagoon", "meadow", "nectar", "orchid", "prairie", "quartz", "ridge", "summit",
    "tundra", "upland", "valley", "willow", "yarrow", "zephyr", "alpine", "birch", "canyon",
    "dune", "estuary", "fern", "glacier", "heath", "island", "jade", "knoll", "lichen", "marsh",
    "nimbus", "oasis", "pebble", "quill", "reef", "sage", "thicket", "umber", "vista", "wren",
    "aspen", "bluff", "coral", "dell", "elm", "flint", "gorge", "hazel", "ivy", "jasper", "kelp",
    "loam", "moss", "north", "oak", "pine",
)
_PACKED_ITEM = re.compile(r"^\[(\d+)\] ", re.M)
_PACKED_HEADER = re.compile(r"^Questions:[ \t]*\n(?=\[\d+\] )", re.M)
_SINGLE_HEADER = re.compile(r"^Question:[ \t]*\n", re.M)
_CONTEXT_HEADER = "Context:\n"


def estimate_tokens(text: str) -> int:
    """Estimate the tokens of a text: one per 4 characters, at least 1.

    Args:
        text: any text.

    Returns:
        ``max(1, ceil(len(text) / 4))``.
    """
    return max(1, math.ceil(len(text) / _CHARS_PER_TOKEN))


def count_prompt_tokens(texts: Iterable[str]) -> int:
    """Count a call's prompt tokens the way the simulator bills them.

    Args:
        texts: the text of each message (for Anthropic, the system prompt counts as one).

    Returns:
        3 plus, for each message, 4 plus :func:`estimate_tokens` of its text.
    """
    return _TOKENS_PER_REPLY + sum(_TOKENS_PER_MESSAGE + estimate_tokens(t) for t in texts)


def truncate_to_tokens(text: str, max_tokens: int | None) -> tuple[str, bool]:
    """Cut a reply to ``max_tokens`` as the simulator does.

    Args:
        text: the full reply.
        max_tokens: the call's limit, or None for no limit.

    Returns:
        The reply (its first ``max_tokens * 4`` characters if longer) and whether it was cut.
    """
    if max_tokens is None or estimate_tokens(text) <= max_tokens:
        return text, False
    return text[: max_tokens * _CHARS_PER_TOKEN], True


def _squash(text: str) -> str:
    return " ".join(text.split())


def answer_for(question: str, context: str | None = None) -> str:
    """The simulator's answer to a question, a pure function of the text.

    Whitespace is normalised first (runs collapse to one space, ends are stripped), and an empty
    context is the same as none, so a packed question and the same question asked alone agree.

    Args:
        question: the question text.
        context: the shared context, if any.

    Returns:
        ``"Answer <10 hex digits>: "`` followed by 12 to 40 filler words and a full stop
        (about 20 to 70 tokens by :func:`estimate_tokens`).
    """
    ctx = _squash(context or "")
    key = f"{_squash(question)}\x1f{ctx}".encode()
    tag = hashlib.sha1(key).hexdigest()
    picks = hashlib.sha512(key).digest()
    n_words = 12 + int(tag[10:12], 16) % 29
    words = " ".join(_FILLER[b % len(_FILLER)] for b in picks[:n_words])
    return f"Answer {tag[:10]}: {words}."


def _normalise(content: str) -> str:
    return content.replace("\r\n", "\n").strip()


def parse_single(content: str) -> tuple[str | None, str]:
    """Split a single call's last user message into context and question.

    Args:
        content: the message text.

    Returns:
        ``(context, question)``; context is None unless the text starts with ``Context:`` and
        has a ``Question:`` line, in which case the question is what follows that line.
    """
    text = _normalise(content)
    if text.startswith(_CONTEXT_HEADER):
        match = _SINGLE_HEADER.search(text)
        if match:
            context = text[len(_CONTEXT_HEADER) : match.start()].strip()
            return context or None, text[match.end() :].strip()
    return None, text


def parse_packed(content: str) -> tuple[str | None, list[tuple[int, str]]] | None:
    """Parse a packed call's last user message (format in the module docstring).

    Args:
        content: the message text.

    Returns:
        ``(context, [(id, question), ...])`` in message order, or None if the text is not in
        the packed format.
    """
    text = _normalise(content)
    context: str | None = None
    if text.startswith(_CONTEXT_HEADER):
        header = _PACKED_HEADER.search(text)
        if header is None:
            return None
        context = text[len(_CONTEXT_HEADER) : header.start()].strip() or None
        body = text[header.end() :]
    elif text.startswith("Questions:"):
        header = _PACKED_HEADER.match(text)
        if header is None:
            return None
        body = text[header.end() :]
    else:
        return None
    items = list(_PACKED_ITEM.finditer(body))
    if not items or items[0].start() != 0:
        return None
    ends = [m.start() for m in items[1:]] + [len(body)]
    questions = [(int(m.group(1)), body[m.end() : end].strip()) for m, end in zip(items, ends, strict=True)]
    return context, questions


# ---------------------------------------------------------------------------------------------
# Knobs and state
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Knobs:
    """The behaviour of one model (see the module docstring for each knob)."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    overhead_ms: float = 0.0
    error_5xx_rate: float = 0.0
    error_429_rate: float = 0.0
    retry_after_s: float = 1.0
    timeout_rate: float = 0.0
    hang_s: float = 30.0
    malformed_rate: float = 0.0
    truncated_rate: float = 0.0
    packed_miscount_rate: float = 0.0
    auth_error: bool = False
    down: bool = False
    context_window: int | None = None


_KNOB_NAMES = frozenset(f.name for f in dataclasses.fields(Knobs))


def validate_knobs(raw: Any, where: str) -> dict[str, Any]:
    """Check a knob mapping, naming the bad key; returns it with numbers as floats."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object of knobs")
    out: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in _KNOB_NAMES:
            raise ValueError(f"{where}.{name}: unknown knob (known: {', '.join(sorted(_KNOB_NAMES))})")
        if name in ("auth_error", "down"):
            if not isinstance(value, bool):
                raise ValueError(f"{where}.{name}: expected true or false")
        elif name == "context_window":
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{where}.{name}: expected a positive integer or null")
        else:
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{where}.{name}: expected a number >= 0")
            if name.endswith("_rate") and value > 1:
                raise ValueError(f"{where}.{name}: expected a rate between 0 and 1")
            value = float(value)
        out[name] = value
    return out


@dataclass(frozen=True)
class Decision:
    """What the random draws decided for one call."""

    outcome: str
    delay_s: float
    miscount: bool
    pick: float


class SimulatorState:
    """Knobs, statistics and the seeded random generator of one running simulator."""

    def __init__(self, *, seed: int, faults: dict[str, dict[str, Any]]) -> None:
        self._seed = seed
        self._startup = {model: validate_knobs(k, f"faults.{model}") for model, k in faults.items()}
        self._ids = itertools.count(1)
        self.reset()

    def reset(self) -> None:
        """Go back to the start-up knobs, empty the stats and re-seed the generator."""
        self.faults: dict[str, dict[str, Any]] = {m: dict(k) for m, k in self._startup.items()}
        self.rng = random.Random(self._seed)
        self.requests = 0
        self.calls: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.tokens_in: Counter[str] = Counter()
        self.tokens_out: Counter[str] = Counter()
        self.prompts: Counter[str] = Counter()

    def next_id(self) -> str:
        return f"{next(self._ids):024x}"

    def set_faults(self, model: str, knobs: dict[str, Any]) -> None:
        self.faults.setdefault(model, {}).update(validate_knobs(knobs, f"faults.{model}"))

    def knobs_for(self, model: str) -> Knobs:
        return Knobs(**{**self.faults.get("*", {}), **self.faults.get(model, {})})

    def decide(self, knobs: Knobs, n_questions: int) -> Decision:
        u_fault, u_jitter, u_miscount, pick = (self.rng.random() for _ in range(4))
        outcome, edge = "ok", 0.0
        for name, rate in (("429", knobs.error_429_rate), ("5xx", knobs.error_5xx_rate),
                           ("timeout", knobs.timeout_rate), ("malformed", knobs.malformed_rate),
                           ("truncated", knobs.truncated_rate)):
            edge += rate
            if u_fault < edge:
                outcome = name
                break
        delay_ms = knobs.overhead_ms + knobs.latency_ms * n_questions
        delay_ms += (2 * u_jitter - 1) * knobs.jitter_ms
        return Decision(outcome, max(0.0, delay_ms) / 1000, u_miscount < knobs.packed_miscount_rate, pick)

    def record(self, model: str, outcome: str, *, tokens_in: int = 0, tokens_out: int = 0,
               prompts: int = 0) -> None:
        self.calls[model][outcome] += 1
        if tokens_in or tokens_out:
            self.tokens_in[model] += tokens_in
            self.tokens_out[model] += tokens_out
        if prompts:
            self.prompts[model] += prompts

    def stats(self) -> dict[str, Any]:
        return {"requests": self.requests, "calls": {m: dict(c) for m, c in self.calls.items()},
                "tokens_in": dict(self.tokens_in), "tokens_out": dict(self.tokens_out),
                "prompts": dict(self.prompts)}

    def models(self) -> list[str]:
        seen = set(DEFAULT_MODELS) | set(self.faults) | set(self.calls)
        return sorted(seen - {"*", "unknown"})


# ---------------------------------------------------------------------------------------------
# Protocols
# ---------------------------------------------------------------------------------------------


class ApiError(Exception):
    """A request the protocol rejects; ``kind`` is one of the protocol-neutral error kinds."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request") -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.kind = message, param, code, kind


@dataclass(frozen=True)
class Call:
    """A validated model call, whichever protocol it came in."""

    model: str
    texts: list[str]
    last_user: str
    max_tokens: int | None
    json_mode: bool = False
    stream: bool = False
    include_usage: bool = False
    n: int = 1

    @property
    def prompt_tokens(self) -> int:
        return count_prompt_tokens(self.texts)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    for kind, name in ((bool, "a boolean"), (str, "a string"), (int, "an integer"),
                       (float, "a number"), (list, "an array"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return "an unknown type"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _part_text(parts: list[Any], param: str) -> str:
    texts = []
    for i, part in enumerate(parts):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise ApiError(f"Invalid '{param}[{i}]': expected an object with a 'type'.",
                           param=f"{param}[{i}]", code="invalid_type")
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise ApiError(f"Missing required parameter: '{param}[{i}].text'.",
                               param=f"{param}[{i}].text", code="missing_required_parameter")
            texts.append(part["text"])
    return "\n".join(texts)


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _last_user(roles_texts: list[tuple[str, str]]) -> str:
    users = [text for role, text in roles_texts if role == "user"]
    return users[-1] if users else roles_texts[-1][1]


class OpenAIProtocol:
    """OpenAI chat completions: request checks, error bodies and replies."""

    _ROLES = ("system", "developer", "user", "assistant", "tool", "function")
    _ERRORS = {"invalid_request": (400, "invalid_request_error"), "auth": (401, "invalid_request_error"),
               "rate_limit": (429, "requests"), "server": (500, "server_error"),
               "down": (503, "server_error")}

    def authorized(self, request: Request, key: str) -> bool:
        return _same(request.headers.get("authorization", ""), f"Bearer {key}")

    def error(self, err: ApiError, headers: dict[str, str] | None = None) -> Response:
        status, kind = self._ERRORS[err.kind]
        body = {"error": {"message": err.message, "type": kind, "param": err.param, "code": err.code}}
        return JSONResponse(body, status_code=status, headers=headers)

    def auth_error(self) -> ApiError:
        return ApiError("Incorrect API key provided.", code="invalid_api_key", kind="auth")

    def context_error(self, call: Call, window: int) -> ApiError:
        completion = call.max_tokens or 0
        return ApiError(
            f"This model's maximum context length is {window} tokens. However, you requested "
            f"{call.prompt_tokens + completion} tokens ({call.prompt_tokens} in the messages, "
            f"{completion} in the completion). Please reduce the length of the messages or completion.",
            param="messages", code="context_length_exceeded")

    def validate(self, body: Any, headers: Any) -> Call:
        if not isinstance(body, dict):
            raise ApiError(f"Invalid type for request body: expected an object, but got {_json_type(body)} "
                           "instead.", code="invalid_type")
        model, messages = body.get("model"), body.get("messages")
        if model is None:
            raise ApiError("you must provide a model parameter")
        if not isinstance(model, str):
            raise ApiError(f"Invalid type for 'model': expected a string, but got {_json_type(model)} "
                           "instead.", param="model", code="invalid_type")
        if messages is None:
            raise ApiError("Missing required parameter: 'messages'.", param="messages",
                           code="missing_required_parameter")
        if not isinstance(messages, list):
            raise ApiError(f"Invalid type for 'messages': expected an array of objects, but got "
                           f"{_json_type(messages)} instead.", param="messages", code="invalid_type")
        if not messages:
            raise ApiError("Invalid 'messages': empty array. Expected an array with minimum length 1, "
                           "but got an empty array instead.", param="messages", code="empty_array")
        roles_texts = [self._message(i, m) for i, m in enumerate(messages)]
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
            raise ApiError(f"Invalid '{name}': expected an integer >= 1, but got {max_tokens!r} instead.",
                           param=name, code="invalid_value")
        n = 1 if body.get("n") is None else body["n"]
        if not _is_int(n) or not 1 <= n <= 128:
            raise ApiError(f"Invalid 'n': expected an integer between 1 and 128, but got {n!r} instead.",
                           param="n", code="invalid_value")
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            raise ApiError(f"Invalid type for 'stream': expected a boolean, but got {_json_type(stream)} "
                           "instead.", param="stream", code="invalid_type")
        if stream and n != 1:
            raise ApiError("The simulator streams only n=1.", param="n", code="invalid_value")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise ApiError("Invalid type for 'stream_options': expected an object.",
                           param="stream_options", code="invalid_type")
        fmt = body.get("response_format") or {"type": "text"}
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise ApiError("Invalid 'response_format': expected an object whose 'type' is 'text', "
                           "'json_object' or 'json_schema'.", param="response_format", code="invalid_value")
        json_mode = fmt["type"] != "text"
        texts = [text for _, text in roles_texts]
        if fmt["type"] == "json_object" and not any("json" in t.lower() for t in texts):
            raise ApiError("'messages' must contain the word 'json' in some form, to use 'response_format' "
                           "of type 'json_object'.", param="messages")
        return Call(model=model, texts=texts, last_user=_last_user(roles_texts), max_tokens=max_tokens,
                    json_mode=json_mode, stream=stream, include_usage=bool(options.get("include_usage")), n=n)

    def _message(self, i: int, message: Any) -> tuple[str, str]:
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(f"Invalid type for '{param}': expected an object, but got {_json_type(message)} "
                           "instead.", param=param, code="invalid_type")
        role = message.get("role")
        if role is None:
            raise ApiError(f"Missing required parameter: '{param}.role'.", param=f"{param}.role",
                           code="missing_required_parameter")
        if role not in self._ROLES:
            raise ApiError(f"Invalid value: {role!r}. Supported values are: "
                           + ", ".join(f"'{r}'" for r in self._ROLES) + ".",
                           param=f"{param}.role", code="invalid_value")
        content = message.get("content")
        if isinstance(content, str):
            return role, content
        if isinstance(content, list):
            return role, _part_text(content, f"{param}.content")
        if content is None and role == "assistant" and {"tool_calls", "function_call"} & message.keys():
            return role, ""
        if content is None:
            raise ApiError(f"Missing required parameter: '{param}.content'.", param=f"{param}.content",
                           code="missing_required_parameter")
        raise ApiError(f"Invalid type for '{param}.content': expected one of a string or array of "
                       f"objects, but got {_json_type(content)} instead.", param=f"{param}.content",
                       code="invalid_type")

    def packed(self, call: Call) -> tuple[str | None, list[tuple[int, str]]] | None:
        return parse_packed(call.last_user) if call.json_mode else None

    def render(self, call: Call, call_id: str, content: str, cut: bool) -> dict[str, Any]:
        completion = estimate_tokens(content) * call.n
        choice = {"message": {"role": "assistant", "content": content}, "logprobs": None,
                  "finish_reason": "length" if cut else "stop"}
        return {"id": f"chatcmpl-{call_id}", "object": "chat.completion", "created": int(time.time()),
                "model": call.model, "choices": [{"index": i, **choice} for i in range(call.n)],
                "usage": {"prompt_tokens": call.prompt_tokens, "completion_tokens": completion,
                          "total_tokens": call.prompt_tokens + completion}}

    def stream_events(self, call: Call, reply: dict[str, Any]) -> list[str]:
        """The reply as SSE ``data:`` events, ending with ``[DONE]``."""
        base = {k: reply[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
        extra = {"usage": None} if call.include_usage else {}
        content = reply["choices"][0]["message"]["content"]
        pieces = re.findall(r"\S*\s*", content)[:-1] or [content]
        deltas = [{"role": "assistant", "content": ""}] + [{"content": p} for p in pieces]
        chunks = [{**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}], **extra}
                  for d in deltas]
        chunks.append({**base, "choices": [{"index": 0, "delta": {},
                                            "finish_reason": reply["choices"][0]["finish_reason"]}], **extra})
        if call.include_usage:
            chunks.append({**base, "choices": [], "usage": reply["usage"]})
        return [f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]


class AnthropicProtocol:
    """Anthropic Messages: request checks, error bodies and replies."""

    _ERRORS = {"invalid_request": (400, "invalid_request_error"), "auth": (401, "authentication_error"),
               "rate_limit": (429, "rate_limit_error"), "server": (500, "api_error"),
               "down": (503, "overloaded_error")}

    def authorized(self, request: Request, key: str) -> bool:
        # Newer SDKs send the key as a bearer token instead of x-api-key; the API takes either.
        api_key, bearer = request.headers.get("x-api-key", ""), request.headers.get("authorization", "")
        return _same(api_key, key) or _same(bearer, f"Bearer {key}")

    def error(self, err: ApiError, headers: dict[str, str] | None = None) -> Response:
        status, kind = self._ERRORS[err.kind]
        return JSONResponse({"type": "error", "error": {"type": kind, "message": err.message}},
                            status_code=status, headers=headers)

    def auth_error(self) -> ApiError:
        return ApiError("invalid x-api-key", kind="auth")

    def context_error(self, call: Call, window: int) -> ApiError:
        if call.prompt_tokens > window:
            return ApiError(f"prompt is too long: {call.prompt_tokens} tokens > {window} maximum")
        return ApiError(f"input length and `max_tokens` exceed context limit: {call.prompt_tokens} + "
                        f"{call.max_tokens} > {window}, decrease input length or `max_tokens` and try again")

    def validate(self, body: Any, headers: Any) -> Call:
        if not headers.get("anthropic-version"):
            raise ApiError("anthropic-version: header is required")
        if not isinstance(body, dict):
            raise ApiError("Input should be a valid dictionary")
        model, max_tokens, messages = body.get("model"), body.get("max_tokens"), body.get("messages")
        for name, value in (("model", model), ("max_tokens", max_tokens), ("messages", messages)):
            if value is None:
                raise ApiError(f"{name}: Field required")
        if not isinstance(model, str):
            raise ApiError("model: Input should be a valid string")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ApiError("max_tokens: Input should be a valid integer greater than or equal to 1")
        if not isinstance(messages, list) or not messages:
            raise ApiError("messages: Input should be a non-empty list")
        if body.get("stream"):
            raise ApiError("stream: the simulator does not stream Anthropic messages; send stream=false")
        roles_texts = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
                raise ApiError(f"messages.{i}.role: Input should be 'user' or 'assistant'")
            text = self._content(message.get("content"), f"messages.{i}.content")
            roles_texts.append((message["role"], text))
        texts = [text for _, text in roles_texts]
        if body.get("system") is not None:
            texts.insert(0, self._content(body["system"], "system"))
        return Call(model=model, texts=texts, last_user=_last_user(roles_texts), max_tokens=max_tokens)

    @staticmethod
    def _content(content: Any, param: str) -> str:
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            try:
                return _part_text(content, param)
            except ApiError as exc:
                raise ApiError(f"{param}: {exc.message}") from None
        raise ApiError(f"{param}: Input should be a valid string or a list of content blocks")

    def packed(self, call: Call) -> tuple[str | None, list[tuple[int, str]]] | None:
        return parse_packed(call.last_user)

    def render(self, call: Call, call_id: str, content: str, cut: bool) -> dict[str, Any]:
        return {"id": f"msg_{call_id}", "type": "message", "role": "assistant",
                "content": [{"type": "text", "text": content}], "model": call.model,
                "stop_reason": "max_tokens" if cut else "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": call.prompt_tokens, "output_tokens": estimate_tokens(content)}}

    def stream_events(self, call: Call, reply: dict[str, Any]) -> list[str]:
        raise AssertionError("validate() refuses Anthropic streaming")


# ---------------------------------------------------------------------------------------------
# The HTTP application
# ---------------------------------------------------------------------------------------------

_MALFORMED = b"<html><body><h1>502 Bad Gateway</h1>upstream sent an invalid reply</body></html>\n"
Protocol = OpenAIProtocol | AnthropicProtocol


def _compose(call: Call, packed: tuple[str | None, list[tuple[int, str]]] | None,
             decision: Decision) -> tuple[str, int]:
    """The reply content before truncation, and how many questions it answers."""
    if packed is None:
        context, question = parse_single(call.last_user)
        answer = answer_for(question, context)
        return (json.dumps({"answer": answer}) if call.json_mode else answer), 1
    context, questions = packed
    answers = [{"id": qid, "answer": answer_for(q, context)} for qid, q in questions]
    if decision.miscount and answers:
        del answers[int(decision.pick * len(answers))]
    return json.dumps({"answers": answers}, ensure_ascii=False), len(answers)


async def _hang(request: Request, seconds: float) -> None:
    """Wait ``seconds``, or less if the client goes away first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (remaining := deadline - loop.time()) > 0:
        if await request.is_disconnected():
            return
        await asyncio.sleep(min(0.05, remaining))


async def _serve_call(state: SimulatorState, proto: Protocol, require_key: str | None,
                      request: Request) -> Response:
    raw = await request.body()
    try:
        body: Any = json.loads(raw)
        parse_error = None
    except ValueError:
        body, parse_error = None, ApiError("We could not parse the JSON body of your request.")
    model = body.get("model") if isinstance(body, dict) else None
    model = model if isinstance(model, str) and model else "unknown"
    state.requests += 1
    if require_key is not None and not proto.authorized(request, require_key):
        state.record(model, "auth")
        return proto.error(proto.auth_error())
    try:
        if parse_error is not None:
            raise parse_error
        call = proto.validate(body, request.headers)
    except ApiError as err:
        state.record(model, "bad_request")
        return proto.error(err)
    knobs = state.knobs_for(call.model)
    if knobs.auth_error:
        state.record(call.model, "auth")
        return proto.error(proto.auth_error())
    if knobs.down:
        state.record(call.model, "down")
        return proto.error(ApiError("The server is overloaded or not ready yet.", kind="down"))
    window = knobs.context_window
    if window is not None and call.prompt_tokens + (call.max_tokens or 0) > window:
        state.record(call.model, "context_length")
        return proto.error(proto.context_error(call, window))

    packed = proto.packed(call)
    decision = state.decide(knobs, len(packed[1]) if packed else 1)
    if decision.outcome == "429":
        state.record(call.model, "429")
        wait = knobs.retry_after_s
        headers = {"retry-after": f"{wait:g}", "retry-after-ms": str(round(wait * 1000))}
        return proto.error(ApiError(f"Rate limit reached for {call.model}. Please try again in {wait:g}s.",
                                    code="rate_limit_exceeded", kind="rate_limit"), headers)
    content, n_answered = _compose(call, packed, decision)
    content, cut = truncate_to_tokens(content, call.max_tokens)
    reply = proto.render(call, state.next_id(), content, cut)
    billed = decision.outcome in ("ok", "malformed", "truncated")
    state.record(call.model, decision.outcome,
                 tokens_in=call.prompt_tokens if billed else 0,
                 tokens_out=estimate_tokens(content) * call.n if billed else 0,
                 prompts=n_answered if decision.outcome == "ok" else 0)
    if decision.outcome == "timeout":
        await _hang(request, knobs.hang_s)
    else:
        await asyncio.sleep(decision.delay_s)
    if decision.outcome == "5xx":
        return proto.error(ApiError("The server had an error while processing your request.", kind="server"))
    if call.stream:
        events = proto.stream_events(call, reply)
        if decision.outcome == "malformed":
            events = ["data: " + _MALFORMED.decode() + "\n\n"]
        elif decision.outcome == "truncated":
            events = events[: len(events) // 2]
        return StreamingResponse(_emit(events), media_type="text/event-stream")
    data = json.dumps(reply, ensure_ascii=False).encode()
    if decision.outcome == "malformed":
        data = _MALFORMED
    elif decision.outcome == "truncated":
        data = data[: len(data) // 2]
    return Response(data, media_type="application/json")


async def _emit(events: list[str]) -> Any:
    for event in events:
        yield event
        await asyncio.sleep(0)


def create_app(state: SimulatorState, *, require_key: str | None = None) -> Starlette:
    """Build the simulator's ASGI application.

    Args:
        state: knobs, stats and random generator, shared by every request.
        require_key: when set, every model call must carry this key.

    Returns:
        The Starlette application.
    """
    openai_proto, anthropic_proto = OpenAIProtocol(), AnthropicProtocol()

    async def chat(request: Request) -> Response:
        return await _serve_call(state, openai_proto, require_key, request)

    async def messages(request: Request) -> Response:
        return await _serve_call(state, anthropic_proto, require_key, request)

    async def models(request: Request) -> Response:
        if require_key is not None and not openai_proto.authorized(request, require_key):
            return openai_proto.error(openai_proto.auth_error())
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "cohort-simulator"}
                for m in state.models()]
        return JSONResponse({"object": "list", "data": data})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def set_faults(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
            if not isinstance(body, dict) or not isinstance(body.get("model"), str):
                raise ValueError('expected {"model": "<name or *>", <knobs>}')
            knobs = {k: v for k, v in body.items() if k != "model"}
            state.set_faults(body["model"], knobs)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"faults": state.faults})

    async def reset(request: Request) -> Response:
        state.reset()
        return JSONResponse({"faults": state.faults})

    async def stats(request: Request) -> Response:
        return JSONResponse(state.stats())

    return Starlette(routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/messages", messages, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/admin/faults", set_faults, methods=["POST"]),
        Route("/admin/reset", reset, methods=["POST"]),
        Route("/admin/stats", stats, methods=["GET"]),
    ])


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """A uvicorn server that prints the ready line once its socket accepts connections."""

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            print(f"simulator listening on http://{host}:{port}", flush=True)


def _parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, dict[str, Any]]]:
    parser = argparse.ArgumentParser(prog="python -m ops.simulator", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8900, help="0 picks a free port (default 8900)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault and jitter draws")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay per question answered")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="uniform +/- noise on the delay")
    parser.add_argument("--overhead-ms", type=float, default=0.0, help="fixed delay per call")
    parser.add_argument("--faults", default="{}", help='JSON {"<model or *>": {knobs}}')
    parser.add_argument("--require-key", default=None, help="key every model call must carry")
    parser.add_argument("--log-level", default="warning",
                        choices=["critical", "error", "warning", "info", "debug", "trace"])
    args = parser.parse_args(argv)
    try:
        faults = json.loads(args.faults)
        if not isinstance(faults, dict):
            raise ValueError('--faults: expected a JSON object {"<model or *>": {knobs}}')
        defaults = {"latency_ms": args.latency_ms, "jitter_ms": args.jitter_ms,
                    "overhead_ms": args.overhead_ms}
        faults = {**faults, "*": {**defaults, **(faults.get("*") or {})}}
        for model, knobs in faults.items():
            validate_knobs(knobs, f"--faults[{model}]")
    except ValueError as exc:
        parser.error(str(exc))
    return args, faults


def main(argv: list[str] | None = None) -> None:
    """Run the simulator until interrupted (SIGINT or SIGTERM)."""
    args, faults = _parse_args(argv)
    state = SimulatorState(seed=args.seed, faults=faults)
    app = create_app(state, require_key=args.require_key)
    # No access log: paths carry no secrets, but keep the output to the ready line and errors.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            access_log=False, lifespan="off", timeout_graceful_shutdown=1)
    _Server(config).run()


if __name__ == "__main__":
    main()
