"""Per-tier requests-per-minute and tokens-per-minute limits, shared by every worker.

Fixed one-minute windows (``Keys.rate_window(tier, "rpm"|"tpm", minute)``), checked and counted
in one Lua script: a call is admitted only if it fits both limits, and then counted in both.
Tokens counted are the prompt estimate plus ``max_tokens`` (what providers count against their
own limits). A request larger than the whole ``tpm`` is admitted into an empty window, so that
it is never starved. Fixed windows admit up to twice the rate across a minute boundary; pick
limits below the provider's with that in mind.

What the router does with a saturated tier: it waits only when the window frees within
``routing.rate_limit_max_wait_s`` (and the deadline allows); otherwise it moves the item on to
the next tier at once, since a batch gateway prefers a slightly dearer answer now to an idle wait.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from producers.keys import Keys
from workers.tiers.config import TierConfig

WINDOW_S = 60

# KEYS: rpm key, tpm key. ARGV: rpm limit (-1: none), tpm limit (-1: none), tokens, ttl_s.
# Returns {1, ''} or {0, 'rpm'|'tpm'}.
_ACQUIRE = """
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local tokens = tonumber(ARGV[3])
if rpm >= 0 and tonumber(redis.call('GET', KEYS[1]) or '0') + 1 > rpm then
  return {0, 'rpm'}
end
if tpm >= 0 then
  local used = tonumber(redis.call('GET', KEYS[2]) or '0')
  if used > 0 and used + tokens > tpm then return {0, 'tpm'} end
end
if rpm >= 0 then
  redis.call('INCR', KEYS[1])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
end
if tpm >= 0 then
  redis.call('INCRBY', KEYS[2], ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
return {1, ''}
"""


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    limit: str = ""
    """``rpm`` or ``tpm`` when refused."""
    wait_s: float = 0.0
    """When refused: seconds until the current window ends."""


class RateLimiter:
    """The rpm/tpm windows of all tiers."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._keys = keys
        self._acquire = client.register_script(_ACQUIRE)

    def acquire(self, tier: TierConfig, *, tokens: int, now: float) -> RateDecision:
        """Count one call of ``tokens`` on ``tier`` if it fits the current window."""
        if tier.rpm is None and tier.tpm is None:
            return RateDecision(True)
        window = int(now // WINDOW_S)
        allowed, limit = self._acquire(
            keys=[self._keys.rate_window(tier.name, "rpm", window), self._keys.rate_window(tier.name, "tpm", window)],
            args=[-1 if tier.rpm is None else tier.rpm, -1 if tier.tpm is None else tier.tpm, tokens, 2 * WINDOW_S],
        )
        if int(allowed):
            return RateDecision(True)
        limit = limit.decode() if isinstance(limit, bytes) else str(limit)
        return RateDecision(False, limit=limit, wait_s=(window + 1) * WINDOW_S - now)
