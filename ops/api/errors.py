"""HTTP errors of the API, all in one JSON shape (OpenAI's), whatever the endpoint::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": "invalid_prompt"}}

Status codes:

- 400 ``invalid_request_error``: bad input on ``/v1/chat/completions`` (as OpenAI does), malformed JSON anywhere.
- 422 ``invalid_request_error``: bad input on Cohort's native endpoints.
- 401 ``invalid_request_error`` / ``invalid_api_key``: missing or unknown key.
- 404 ``invalid_request_error`` / ``not_found``: unknown id, or an id of another tenant.
- 413 ``invalid_request_error`` / ``request_too_large``.
- 429 ``requests`` / ``rate_limit_exceeded`` (with ``Retry-After``), or ``insufficient_quota`` /
  ``budget_exceeded`` (with ``x-should-retry: false``).
- 502 ``upstream_error``: every tier failed or refused (``code`` names Cohort's error).
- 503 ``service_unavailable``: Redis cannot be reached.
- 504 ``timeout``: no answer within the wait, or the item's deadline passed; ``item_id`` lets the
  caller collect the answer later from ``GET /v1/prompts/{id}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi.responses import JSONResponse

from producers.errors import (
    BudgetExceeded,
    CohortError,
    ContextTooLong,
    DeadlineExceeded,
    ResultTimeout,
    SubmitError,
)


class ApiError(Exception):
    """An HTTP error answer; raised by handlers, rendered by the app's exception handler."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",  # noqa: A002
                 code: str | None = None, param: str | None = None,
                 headers: Mapping[str, str] | None = None, extra: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code,
                          **self.extra}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, *, param: str | None = None, status: int = 400,
            code: str = "invalid_request") -> ApiError:
    """A bad-input error naming the offending field."""
    return ApiError(status, message, param=param, code=code)


def not_found(what: str = "prompt") -> ApiError:
    return ApiError(404, f"no such {what}", code="not_found")


def unauthorized(message: str = "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.") -> ApiError:
    return ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def from_submit_error(error: SubmitError, *, status: int) -> ApiError:
    """A refused submission (``InvalidPrompt``, ``UnknownTenant``) as a bad-input error."""
    field = error.details.get("field")
    return ApiError(status, error.message, param=field if isinstance(field, str) else None, code=error.code)


def from_item_error(error: CohortError, *, item_id: str) -> ApiError:
    """The final error of an item, as the chat endpoint reports it."""
    extra = {"item_id": item_id}
    if isinstance(error, SubmitError):
        return ApiError(400, error.message, code=error.code, extra=extra,
                        param=error.details.get("field") if isinstance(error.details.get("field"), str) else None)
    if isinstance(error, ContextTooLong):
        return ApiError(400, error.message, code="context_length_exceeded", param="messages", extra=extra)
    if isinstance(error, BudgetExceeded):
        return ApiError(429, error.message, type="insufficient_quota", code=error.code, extra=extra,
                        headers={"x-should-retry": "false"})
    if isinstance(error, ResultTimeout | DeadlineExceeded):
        # Retrying would submit the question again while the first one may still be answered.
        return ApiError(504, error.message, type="timeout", code=error.code, extra=extra,
                        headers={"x-should-retry": "false"})
    return ApiError(502, error.message, type="upstream_error", code=error.code, extra=extra)
