"""One small interface per wire protocol: build the HTTP request, read the HTTP response.

Adapters do no I/O and no retrying: the router sends the request and its one loop decides what
happens next from the exception class an adapter raises:

==========================================  ====================================================
response                                    raised
==========================================  ====================================================
200 with the expected JSON                  (returns a ``ProviderResult``)
200, body not JSON / truncated / no text    ``MalformedResponse`` (retryable)
408, 409, 429, 5xx (Anthropic 529 too)      ``ProviderUnavailable`` with ``retry_after_s``
401, 403                                    ``ProviderAuthError``
400/413 naming the context length           ``ContextTooLong``
any other 4xx                               ``ProviderRejected`` (final)
==========================================  ====================================================

Timeouts and connection errors never reach an adapter; the router maps them to
``ProviderUnavailable`` itself (``transport_error``).
"""

from __future__ import annotations

import email.utils
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from producers.errors import (
    ContextTooLong,
    MalformedResponse,
    ProviderAuthError,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
)
from workers.tiers.config import TierConfig

ANTHROPIC_VERSION = "2023-06-01"
MAX_ERROR_CHARS = 300
_CONTEXT_PATTERN = re.compile(
    r"context[ _-]?(length|window)|maximum context|too many tokens|prompt is too long|input is too long"
    r"|reduce the length|exceeds the (model'?s )?(maximum|context)",
    re.IGNORECASE,
)
_CONTEXT_CODES = {"context_length_exceeded", "string_above_max_length", "context_window_exceeded"}
_SECRETISH = re.compile(r"\b(sk|key|pk|rk)-[A-Za-z0-9_\-*]{4,}")


@dataclass(frozen=True)
class ProviderResult:
    """What a successful call returned."""

    text: str
    tokens_in: int
    tokens_out: int
    finish_reason: str
    model: str
    usage_reported: bool = True
    """False when the provider sent no usage: the router then bills the reserved worst case."""


class ProviderAdapter(Protocol):
    """The interface each wire protocol implements."""

    def build_request(self, tier: TierConfig, request: Any, api_key: str | None
                      ) -> tuple[str, dict[str, str], dict[str, Any]]:
        """The URL, headers and JSON body of one call for ``request`` (a ``CallRequest``)."""
        ...

    def parse_response(self, tier: TierConfig, status: int, headers: Mapping[str, str], body: bytes,
                       *, api_key: str | None = None) -> ProviderResult:
        """The result of a 200, or raise the ``ProviderError`` subclass the response means.

        ``api_key`` is only used to scrub it from error messages that echo it back.
        """
        ...


def _join_url(base_url: str, path: str) -> str:
    """``base_url`` + ``path``, keeping a query string (Azure's ``?api-version=``) at the end."""
    root, sep, query = base_url.partition("?")
    return f"{root.rstrip('/')}/{path}{sep}{query}"


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    ms = lowered.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
            if value >= 0 and value == value and value != float("inf"):
                return value
        except ValueError:
            pass
    raw = lowered.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        value = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        return max(0.0, when.timestamp() - (time.time() if now is None else now))
    if value != value or value < 0 or value == float("inf"):
        return None
    return value


def redact(text: str, secret: str | None) -> str:
    """Provider text made safe to log: the key (and anything key-like) removed, length bounded."""
    if secret:
        text = text.replace(secret, "[redacted]")
    text = _SECRETISH.sub("[redacted]", text)
    return text[:MAX_ERROR_CHARS]


def _error_fields(body: bytes) -> tuple[str, str, str]:
    """(message, code, type) of an error body in OpenAI's or Anthropic's shape, best effort."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body[:MAX_ERROR_CHARS].decode("utf-8", "replace"), "", ""
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        return (str(err.get("message") or ""), str(err.get("code") or ""), str(err.get("type") or ""))
    if isinstance(err, str):
        return err, "", ""
    if isinstance(data, dict) and "message" in data:
        return str(data.get("message") or ""), str(data.get("code") or ""), str(data.get("type") or "")
    return "", "", ""


def classify_error(tier: TierConfig, status: int, headers: Mapping[str, str], body: bytes,
                   api_key: str | None = None) -> ProviderError:
    """The exception a non-200 response means (shared by both protocols)."""
    message, code, kind = _error_fields(body)
    message = redact(message, api_key)
    details: dict[str, Any] = {"tier": tier.name, "status": status}
    if code:
        details["provider_code"] = redact(code, api_key)
    where = f"tier {tier.name} answered {status}"
    if status in (401, 403) or kind in ("authentication_error", "permission_error"):
        return ProviderAuthError(f"{where}: the key was refused ({message or kind or 'no message'})",
                                 reason="auth_error", **details)
    if status in (408, 409, 429) or status >= 500:
        retry_after = parse_retry_after(headers)
        return ProviderUnavailable(f"{where}: {message or 'temporarily unavailable'}",
                                   retry_after_s=retry_after, reason="http_5xx" if status >= 500 else f"http_{status}",
                                   **details)
    if status in (400, 413, 422) and (code in _CONTEXT_CODES or _CONTEXT_PATTERN.search(message or "")):
        return ContextTooLong(f"{where}: the prompt does not fit the context window of {tier.model} "
                              f"({tier.context_window} tokens): {message}", context_window=tier.context_window,
                              reason="context_too_long", **details)
    return ProviderRejected(f"{where}: {message or kind or 'request rejected'}", reason="rejected", **details)


def _load_json(tier: TierConfig, body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise _malformed(tier, f"a body that is not JSON ({len(body)} bytes)") from None
    if not isinstance(data, dict):
        raise _malformed(tier, "JSON that is not an object")
    return data


def _malformed(tier: TierConfig, what: str) -> MalformedResponse:
    return MalformedResponse(f"tier {tier.name} sent {what}", tier=tier.name, status=200, reason="malformed")


def _count(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


class OpenAIAdapter:
    """OpenAI-compatible chat completions (OpenAI, Azure deployments, vLLM, Ollama, many others)."""

    def build_request(self, tier: TierConfig, request: Any, api_key: str | None
                      ) -> tuple[str, dict[str, str], dict[str, Any]]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            if tier.auth_header.lower() == "authorization":
                headers["Authorization"] = f"Bearer {api_key}"
            else:
                headers[tier.auth_header] = api_key
        body: dict[str, Any] = {
            "model": tier.model,
            "messages": [{"role": m["role"], "content": m["content"]} for m in request.messages],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
        }
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.stop:
            body["stop"] = list(request.stop)
        if request.json_mode:
            body["response_format"] = {"type": "json_object"}
        return _join_url(tier.base_url, "chat/completions"), headers, body

    def parse_response(self, tier: TierConfig, status: int, headers: Mapping[str, str], body: bytes,
                       *, api_key: str | None = None) -> ProviderResult:
        if status != 200:
            raise classify_error(tier, status, headers, body, api_key)
        data = _load_json(tier, body)
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise _malformed(tier, "no choices")
        message = choices[0].get("message")
        text = message.get("content") if isinstance(message, dict) else None
        if not isinstance(text, str):
            raise _malformed(tier, "a choice without text content")
        usage = data.get("usage")
        tokens_in = _count(usage.get("prompt_tokens")) if isinstance(usage, dict) else None
        tokens_out = _count(usage.get("completion_tokens")) if isinstance(usage, dict) else None
        return ProviderResult(
            text=text,
            tokens_in=tokens_in or 0,
            tokens_out=tokens_out or 0,
            finish_reason=str(choices[0].get("finish_reason") or "stop"),
            model=str(data.get("model") or tier.model),
            usage_reported=tokens_in is not None and tokens_out is not None,
        )


_ANTHROPIC_STOP = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls"}


class AnthropicAdapter:
    """Anthropic's Messages API: system prompt at the top level, content blocks, its own usage names."""

    def build_request(self, tier: TierConfig, request: Any, api_key: str | None
                      ) -> tuple[str, dict[str, str], dict[str, Any]]:
        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   "anthropic-version": ANTHROPIC_VERSION}
        if api_key:
            headers["x-api-key"] = api_key
        system = [m["content"] for m in request.messages if m["role"] == "system"]
        if request.json_mode:
            system.append("Answer with one JSON object and nothing else.")
        messages = [{"role": m["role"], "content": m["content"]} for m in request.messages
                    if m["role"] != "system"]
        body: dict[str, Any] = {"model": tier.model, "max_tokens": request.max_tokens, "messages": messages,
                                "temperature": request.temperature}
        if system:
            body["system"] = "\n\n".join(system)
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.stop:
            body["stop_sequences"] = list(request.stop)
        return _join_url(tier.base_url, "messages"), headers, body

    def parse_response(self, tier: TierConfig, status: int, headers: Mapping[str, str], body: bytes,
                       *, api_key: str | None = None) -> ProviderResult:
        if status != 200:
            raise classify_error(tier, status, headers, body, api_key)
        data = _load_json(tier, body)
        if data.get("type") == "error":
            raise classify_error(tier, 500, headers, body, api_key)
        content = data.get("content")
        if not isinstance(content, list):
            raise _malformed(tier, "no content blocks")
        parts = [b.get("text") for b in content if isinstance(b, dict) and b.get("type") == "text"]
        if not parts or not all(isinstance(p, str) for p in parts):
            raise _malformed(tier, "no text block")
        usage = data.get("usage")
        tokens_in = _count(usage.get("input_tokens")) if isinstance(usage, dict) else None
        tokens_out = _count(usage.get("output_tokens")) if isinstance(usage, dict) else None
        stop = str(data.get("stop_reason") or "end_turn")
        return ProviderResult(
            text="".join(parts),  # type: ignore[arg-type]
            tokens_in=tokens_in or 0,
            tokens_out=tokens_out or 0,
            finish_reason=_ANTHROPIC_STOP.get(stop, stop),
            model=str(data.get("model") or tier.model),
            usage_reported=tokens_in is not None and tokens_out is not None,
        )


ADAPTERS: dict[str, ProviderAdapter] = {"openai": OpenAIAdapter(), "anthropic": AnthropicAdapter()}


def adapter_for(tier: TierConfig) -> ProviderAdapter:
    """The adapter of a tier's provider."""
    return ADAPTERS[tier.provider]


def transport_error(tier: TierConfig, exc: Exception, *, timeout_s: float) -> ProviderUnavailable:
    """A timeout or connection failure as a retryable error (the URL's host only, never headers)."""
    timed_out = "timeout" in type(exc).__name__.lower()
    what = f"timed out after {timeout_s:.2f}s" if timed_out else "connection failed"
    return ProviderUnavailable(f"tier {tier.name}: {what} ({type(exc).__name__})", tier=tier.name, status=None,
                               retry_after_s=None, reason="timeout" if timed_out else "connect_error")
