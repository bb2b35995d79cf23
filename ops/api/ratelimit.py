"""Per-tenant request rate limit, shared by every API process through Redis.

A sliding-window counter: the current minute's count plus the previous minute's, weighted by how
much of it is still inside the last 60 seconds. Check and increment are one Lua script, so two
API replicas never both take the last unit. A request submitting N prompts costs N units.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from producers.keys import Keys

WINDOW_S = 60

_TAKE = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local prev = tonumber(redis.call('GET', KEYS[2]) or '0')
local limit = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local weight = tonumber(ARGV[3])
if prev * weight + cur + cost > limit then
  return {0, cur, prev}
end
redis.call('INCRBY', KEYS[1], cost)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return {1, cur + cost, prev}
"""


@dataclass(frozen=True)
class RateDecision:
    """The outcome of one check."""

    allowed: bool
    limit: int
    """Units per minute (0 = unlimited)."""
    remaining: int
    retry_after_s: int = 0
    """Seconds until the same request would be allowed (only when refused)."""

    def headers(self) -> dict[str, str]:
        """OpenAI-style rate-limit headers (plus ``Retry-After`` when refused)."""
        if self.limit <= 0:
            return {}
        headers = {"x-ratelimit-limit-requests": str(self.limit),
                   "x-ratelimit-remaining-requests": str(self.remaining)}
        if not self.allowed:
            headers["Retry-After"] = str(self.retry_after_s)
        return headers


class RateLimiter:
    """Takes units from a tenant's per-minute allowance."""

    def __init__(self, client: redis.Redis, keys: Keys, limit_for: Callable[[str], int], *,
                 clock: Callable[[], float] = time.time) -> None:
        self._keys = keys
        self._limit_for = limit_for
        self._clock = clock
        self._take = client.register_script(_TAKE)

    def take(self, tenant: str, cost: int = 1) -> RateDecision:
        """Take ``cost`` units for ``tenant`` if its allowance has them; blocking (one Redis call)."""
        limit = self._limit_for(tenant)
        if limit <= 0:
            return RateDecision(True, 0, 0)
        now = self._clock()
        window = int(now // WINDOW_S)
        elapsed = now - window * WINDOW_S
        weight = 1.0 - elapsed / WINDOW_S
        keys = [self._keys.api_rate(tenant, window), self._keys.api_rate(tenant, window - 1)]
        allowed, cur, prev = self._take(keys=keys, args=[limit, cost, repr(weight), 2 * WINDOW_S + 5])
        used = prev * weight + cur
        if allowed:
            return RateDecision(True, limit, max(0, math.floor(limit - used)))
        retry = _retry_after(limit=limit, cost=cost, cur=int(cur), prev=int(prev), elapsed=elapsed)
        return RateDecision(False, limit, max(0, math.floor(limit - used)), retry)


def _retry_after(*, limit: int, cost: int, cur: int, prev: int, elapsed: float) -> int:
    """Seconds until ``prev * weight + cur + cost <= limit`` holds, assuming no other traffic."""
    if cur + cost <= limit:
        # The current minute has room: wait for enough of the previous one to slide out.
        if prev <= 0:
            return 1
        needed_elapsed = WINDOW_S * (1.0 - (limit - cur - cost) / prev)
        wait = needed_elapsed - elapsed
    else:
        # Wait for the next minute, then for enough of this one to slide out.
        wait = WINDOW_S - elapsed
        if cur > 0:
            wait += max(0.0, WINDOW_S * (1.0 - (limit - cost) / cur))
    return max(1, math.ceil(wait))
