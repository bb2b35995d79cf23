"""The one exception hierarchy of Cohort.

Every error Cohort raises, in every role, is a ``CohortError``::

    CohortError
    ├── ConfigError                 a settings or tiers file is invalid (names the bad key)
    ├── SubmitError                 a submission was refused before it was enqueued
    │   ├── InvalidPrompt           the prompt or its parameters break the message schema
    │   └── UnknownTenant           the tenant is not configured (when tenants are enforced)
    ├── ResultTimeout               waiting for a result ran past its timeout
    ├── ItemFailed                  an item ended with a final error (carries its code)
    ├── ProviderError               an upstream model call went wrong
    │   ├── ProviderUnavailable     retryable: timeout, connection error, 5xx, 429
    │   ├── ProviderRejected        final: a 4xx other than the ones below
    │   ├── ProviderAuthError       the tier's key was refused: the tier leaves service
    │   ├── ContextTooLong          the prompt does not fit the tier's context window
    │   └── MalformedResponse       the body is not the protocol's JSON (retryable)
    ├── BudgetExceeded              a spend cap cannot cover the call
    ├── FallbackExhausted           every tier and attempt was used (carries every attempt)
    ├── DeadlineExceeded            the item's deadline passed before it could be answered
    ├── RedeliveryLimit             the item was redelivered too often
    ├── GrouperLockLost             a grouping tick outlived its lock (internal: the tick stops)
    └── CompressionError            a compression job cannot run or failed

Errors that travel as final results keep their class name as ``code`` so that any
Celery client (``AsyncResult(id).get()``) re-raises a readable exception.
"""

from __future__ import annotations

from typing import Any


class CohortError(Exception):
    """Base of every Cohort error."""

    code: str = "cohort_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe form for results and HTTP errors."""
        return {"code": self.code, "message": self.message, **_json_safe(self.details)}


def _json_safe(details: dict[str, Any]) -> dict[str, Any]:
    safe: dict[str, Any] = {}
    for key, value in details.items():
        if isinstance(value, str | int | float | bool) or value is None:
            safe[key] = value
        elif isinstance(value, list | tuple):
            safe[key] = [v if isinstance(v, str | int | float | bool | dict) else str(v) for v in value]
        elif isinstance(value, dict):
            safe[key] = value
        else:
            safe[key] = str(value)
    return safe


class ConfigError(CohortError):
    code = "config_error"


class SubmitError(CohortError):
    code = "submit_error"


class InvalidPrompt(SubmitError):
    code = "invalid_prompt"


class UnknownTenant(SubmitError):
    code = "unknown_tenant"


class ResultTimeout(CohortError):
    code = "result_timeout"


class ItemFailed(CohortError):
    """An item ended with a final error; ``details['code']`` names its cause."""

    code = "item_failed"


class ProviderError(CohortError):
    code = "provider_error"
    retryable: bool = False


class ProviderUnavailable(ProviderError):
    code = "provider_unavailable"
    retryable = True


class ProviderRejected(ProviderError):
    code = "provider_rejected"


class ProviderAuthError(ProviderError):
    code = "provider_auth_error"


class ContextTooLong(ProviderError):
    code = "context_too_long"


class MalformedResponse(ProviderError):
    code = "malformed_response"
    retryable = True


class BudgetExceeded(CohortError):
    code = "budget_exceeded"


class FallbackExhausted(CohortError):
    code = "fallback_exhausted"


class DeadlineExceeded(CohortError):
    code = "deadline_exceeded"


class RedeliveryLimit(CohortError):
    code = "redelivery_limit"


class GrouperLockLost(CohortError):
    code = "grouper_lock_lost"


class CompressionError(CohortError):
    code = "compression_error"


ERRORS_BY_CODE: dict[str, type[CohortError]] = {
    cls.code: cls
    for cls in (
        CohortError, ConfigError, SubmitError, InvalidPrompt, UnknownTenant, ResultTimeout, ItemFailed,
        ProviderError, ProviderUnavailable, ProviderRejected, ProviderAuthError, ContextTooLong,
        MalformedResponse, BudgetExceeded, FallbackExhausted, DeadlineExceeded, RedeliveryLimit,
        GrouperLockLost, CompressionError,
    )
}
