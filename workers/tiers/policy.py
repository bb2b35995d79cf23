"""Pure decisions of the tier loop: where an item starts, in what order tiers are tried, and
what follows an error. No I/O here, so that every rule is unit-tested.

Order of the chain
    The item starts at a tier chosen by complexity, then falls over to the other tiers in the
    config file's order. ``simple`` starts at the cheapest tier whose context window fits the
    prompt (price of this very call: estimated input plus ``max_tokens`` output), ``complex`` at the
    strongest tier that fits, ``medium`` at ``routing.medium_start``. A pinned tier is the whole
    chain. Tiers whose window is too small for the estimated prompt plus ``max_tokens`` are dropped
    before any call.

After an error (``decide``)
    =========================================  ===============================================
    error                                      next step
    =========================================  ===============================================
    ProviderRejected (other 4xx)               fail the item, no retry
    ContextTooLong                             next tier with a larger window, no retry
    ProviderAuthError                          next tier (the router takes this one out)
    ProviderUnavailable, MalformedResponse     retry on the same tier after a backoff, unless:
      - the item's attempt cap is spent         stop (FallbackExhausted)
      - the tier's ``max_retries`` are spent    next tier
      - the tier's circuit just opened          next tier, without waiting
      - ``Retry-After`` > max_retry_after_s     next tier, without waiting
      - the wait would pass the deadline        next tier, without waiting
    =========================================  ===============================================

Backoff is exponential with full jitter (uniform in ``[0, min(max, base * 2**n)]``) and never
shorter than the provider's ``Retry-After``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from producers.errors import (
    ContextTooLong,
    ProviderAuthError,
    ProviderError,
    ProviderRejected,
)
from workers.tiers.config import RoutingConfig, TierConfig
from workers.tiers.tokens import fits_context

COMPLEXITIES = ("simple", "medium", "complex")


def call_estimate(tier: TierConfig, prompt_tokens: int, max_tokens: int) -> int:
    """Worst-case cost (billionths) of one call with this prompt size on ``tier``."""
    return tier.cost_nanos(min(prompt_tokens, tier.context_window), max_tokens)


def start_tier(routing: RoutingConfig, complexity: str, candidates: list[TierConfig], *, prompt_tokens: int,
               max_tokens: int) -> TierConfig:
    """Where an item of this complexity starts, among tiers that fit its prompt."""
    if complexity == "simple":
        return min(candidates, key=lambda t: call_estimate(t, prompt_tokens, max_tokens))
    if complexity == "complex":
        return max(candidates, key=lambda t: t.strength)  # max keeps the first of equals: list order
    for tier in candidates:
        if tier.name == routing.medium_start:
            return tier
    # The medium tier cannot hold the prompt: the next tier after it in the chain that can.
    names = routing.names
    after = names.index(routing.medium_start)
    ordered = sorted(candidates, key=lambda t: (names.index(t.name) - after) % len(names))
    return ordered[0]


def plan_chain(routing: RoutingConfig, *, complexity: str, prompt_tokens: int, max_tokens: int,
               pinned: str | None = None) -> tuple[list[TierConfig], list[TierConfig]]:
    """(tiers to try in order, tiers dropped because the prompt cannot fit their window).

    ``prompt_tokens`` is the margin-included estimate (``tokens.estimate_tokens``).
    """
    if complexity not in COMPLEXITIES:
        raise ValueError(f"complexity must be one of {COMPLEXITIES}, got {complexity!r}")
    tiers = [routing.tier(pinned)] if pinned is not None else list(routing.tiers)
    fitting = [t for t in tiers if fits_context(t.context_window, prompt_tokens, max_tokens)]
    too_small = [t for t in tiers if t not in fitting]
    if not fitting:
        return [], too_small
    first = start_tier(routing, complexity, fitting, prompt_tokens=prompt_tokens, max_tokens=max_tokens)
    return [first] + [t for t in fitting if t is not first], too_small


def backoff_delay(retry_index: int, *, base_s: float, max_s: float, retry_after_s: float | None = None,
                  rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``retry_index`` (0 for the first retry).

    Full jitter: uniform in ``[0, min(max_s, base_s * 2**retry_index)]``, raised to the provider's
    ``Retry-After`` when it asked for longer.
    """
    ceiling = min(max_s, base_s * (2 ** min(retry_index, 30)))
    delay = (rng or random).uniform(0.0, ceiling)
    if retry_after_s is not None:
        delay = max(delay, retry_after_s)
    return delay


@dataclass(frozen=True)
class Step:
    """What the loop does after a failed call."""

    kind: Literal["retry", "next_tier", "fail", "stop"]
    reason: str
    delay_s: float = 0.0


def error_reason(error: ProviderError) -> str:
    """Short outcome name of an error, for attempts and telemetry (``timeout``, ``http_5xx``...)."""
    return str(error.details.get("reason") or error.code)


def decide(error: ProviderError, *, tier: TierConfig, tier_attempts: int, total_attempts: int,
           routing: RoutingConfig, now: float, deadline: float | None, circuit_opened: bool = False,
           rng: random.Random | None = None) -> Step:
    """The next step after ``error`` on ``tier``.

    Args:
        error: what the call raised.
        tier: the tier just called.
        tier_attempts: calls made on this tier for this item, including this one.
        total_attempts: calls made for this item on every tier, including this one.
        routing: the limits.
        now, deadline: epoch seconds; ``deadline`` ``None`` means none.
        circuit_opened: this failure opened the tier's circuit.
        rng: source of jitter.
    """
    reason = error_reason(error)
    if isinstance(error, ProviderRejected):
        return Step("fail", reason)
    if isinstance(error, ContextTooLong | ProviderAuthError):
        return Step("next_tier", reason)
    if not error.retryable:
        return Step("fail", reason)
    if total_attempts >= routing.max_attempts_per_item:
        return Step("stop", "attempt_cap")
    if tier_attempts > tier.max_retries or circuit_opened:
        return Step("next_tier", "circuit_open" if circuit_opened else reason)
    retry_after = error.details.get("retry_after_s")
    if retry_after is not None and retry_after > routing.max_retry_after_s:
        return Step("next_tier", reason)
    delay = backoff_delay(tier_attempts - 1, base_s=routing.backoff_base_s, max_s=routing.backoff_max_s,
                          retry_after_s=retry_after, rng=rng)
    if deadline is not None and now + delay >= deadline:
        return Step("next_tier", reason)
    return Step("retry", reason, delay)


def max_calls(routing: RoutingConfig, chain: list[TierConfig]) -> int:
    """Most upstream calls one item can cause over ``chain``: per-tier retries, bounded by the item cap."""
    return min(routing.max_attempts_per_item, sum(1 + t.max_retries for t in chain))
