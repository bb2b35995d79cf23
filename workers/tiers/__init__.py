"""Fallback tiers and cost control: the tier chain, routing, circuit breakers, rate limits, budgets.

The batch task builds one ``TierRouter`` per worker process from ``parse_routing`` and
``parse_budgets`` and calls ``TierRouter.complete(CallRequest(...))`` for each upstream call.
"""

from workers.tiers.adapters import AnthropicAdapter, OpenAIAdapter, ProviderAdapter, ProviderResult, adapter_for
from workers.tiers.budget import BudgetLedger, Refusal, Reservation
from workers.tiers.circuit import CircuitBreaker, Permit
from workers.tiers.complexity import Estimate, estimate_complexity, explain
from workers.tiers.config import (
    BudgetConfig,
    RoutingConfig,
    TenantBudget,
    TierConfig,
    parse_budgets,
    parse_routing,
)
from workers.tiers.policy import backoff_delay, decide, plan_chain
from workers.tiers.ratelimit import RateDecision, RateLimiter
from workers.tiers.router import Attempt, CallRequest, Completion, TierRouter, raise_alert
from workers.tiers.tokens import estimate_tokens, upper_bound_tokens

__all__ = [
    # config
    "BudgetConfig",
    "RoutingConfig",
    "TenantBudget",
    "TierConfig",
    "parse_budgets",
    "parse_routing",
    # router
    "Attempt",
    "CallRequest",
    "Completion",
    "TierRouter",
    "raise_alert",
    # adapters
    "AnthropicAdapter",
    "OpenAIAdapter",
    "ProviderAdapter",
    "ProviderResult",
    "adapter_for",
    # shared state in Redis
    "BudgetLedger",
    "CircuitBreaker",
    "Permit",
    "RateDecision",
    "RateLimiter",
    "Refusal",
    "Reservation",
    # pure policy and estimates
    "Estimate",
    "backoff_delay",
    "decide",
    "estimate_complexity",
    "estimate_tokens",
    "explain",
    "plan_chain",
    "upper_bound_tokens",
]
