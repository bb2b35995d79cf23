"""Cohort's producer side: the submission contract and the client. Imports no ML stack."""

from producers.client import CohortClient, PromptHandle
from producers.errors import (
    BudgetExceeded,
    CohortError,
    CompressionError,
    ConfigError,
    ContextTooLong,
    DeadlineExceeded,
    FallbackExhausted,
    InvalidPrompt,
    ItemFailed,
    MalformedResponse,
    ProviderAuthError,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
    RedeliveryLimit,
    ResultTimeout,
    SubmitError,
    UnknownTenant,
)
from producers.keys import Keys
from producers.results import PromptResult
from producers.schema import ModelParams, PromptItem, build_item
from producers.settings import ProducerSettings, RedisSettings, TenantPolicy, load_producer_settings

__all__ = [
    # client
    "CohortClient",
    "PromptHandle",
    "PromptResult",
    # schema and settings
    "Keys",
    "ModelParams",
    "ProducerSettings",
    "PromptItem",
    "RedisSettings",
    "TenantPolicy",
    "build_item",
    "load_producer_settings",
    # errors
    "BudgetExceeded",
    "CohortError",
    "CompressionError",
    "ConfigError",
    "ContextTooLong",
    "DeadlineExceeded",
    "FallbackExhausted",
    "InvalidPrompt",
    "ItemFailed",
    "MalformedResponse",
    "ProviderAuthError",
    "ProviderError",
    "ProviderRejected",
    "ProviderUnavailable",
    "RedeliveryLimit",
    "ResultTimeout",
    "SubmitError",
    "UnknownTenant",
]
