"""Spend caps held in Redis: reserve the worst case before a call, settle to the real cost after.

Every call touches four ledgers: global and tenant, per UTC day (``day:YYYY-MM-DD``) and month
(``month:YYYY-MM``). Each ledger is a hash (``Keys.budget``) with ``spent`` and ``reserved``
(integer billionths of the currency, so sums and comparisons are exact) and one field per open
reservation; a sorted set (``Keys.budget_holds``) holds each reservation's expiry.

- ``reserve`` (one Lua script, atomic): drops expired reservations, then checks every cap that
  applies (the request's ``max_cost``, global day and month, tenant day and month). Only if all
  fit does it add the estimate to ``reserved`` everywhere; otherwise it names the cap that failed
  with its spend and the estimate. Racing workers therefore can never reserve past a cap.
- ``settle`` replaces the reservation by the provider-reported cost; ``release`` drops it (the call
  failed, nothing is billed). The estimate is a true upper bound (``tokens.upper_bound_tokens`` and
  ``max_tokens``), so settled spend stays under every cap.
- A worker that dies mid-call leaves a reservation that expires after ``hold_s`` (the tier's timeout
  with a margin), so capacity is not lost for the rest of the period.

Day keys live 3 days and month keys 62 days after their last write.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import redis

from producers.keys import Keys
from workers.tiers.config import NANOS, BudgetConfig

DAY_TTL_S = 3 * 86400
MONTH_TTL_S = 62 * 86400

_PURGE = """
local function purge(b, h, now)
  local expired = redis.call('ZRANGEBYSCORE', h, '-inf', now)
  for _, id in ipairs(expired) do
    local amt = tonumber(redis.call('HGET', b, 'h:' .. id) or '0')
    if amt > 0 then redis.call('HINCRBY', b, 'reserved', -amt) end
    redis.call('HDEL', b, 'h:' .. id)
  end
  if #expired > 0 then redis.call('ZREMRANGEBYSCORE', h, '-inf', now) end
end
"""

# KEYS: ledger1, holds1, ledger2, holds2, ...
# ARGV: now_ms, hold_expiry_ms, reservation id, estimate, max_cost (-1: none), then cap_i (-1: none), ttl_i.
# Returns {1} or {0, failed index (0: max_cost), cap, spent, reserved}.
_RESERVE = _PURGE + """
local n = #KEYS / 2
local now = tonumber(ARGV[1])
local est = tonumber(ARGV[4])
for i = 1, n do purge(KEYS[2*i-1], KEYS[2*i], now) end
local max_cost = tonumber(ARGV[5])
if max_cost >= 0 and est > max_cost then return {0, 0, max_cost, 0, 0} end
for i = 1, n do
  local cap = tonumber(ARGV[4 + 2*i])
  if cap >= 0 then
    local spent = tonumber(redis.call('HGET', KEYS[2*i-1], 'spent') or '0')
    local reserved = tonumber(redis.call('HGET', KEYS[2*i-1], 'reserved') or '0')
    if spent + reserved + est > cap then return {0, i, cap, spent, reserved} end
  end
end
for i = 1, n do
  local ttl = ARGV[5 + 2*i]
  redis.call('HINCRBY', KEYS[2*i-1], 'reserved', ARGV[4])
  redis.call('HSET', KEYS[2*i-1], 'h:' .. ARGV[3], ARGV[4])
  redis.call('ZADD', KEYS[2*i], ARGV[2], ARGV[3])
  redis.call('EXPIRE', KEYS[2*i-1], ttl)
  redis.call('EXPIRE', KEYS[2*i], ttl)
end
return {1}
"""

# KEYS: as for reserve. ARGV: reservation id, actual cost (0 for a release).
_SETTLE = """
local n = #KEYS / 2
local actual = tonumber(ARGV[2])
for i = 1, n do
  local b = KEYS[2*i-1]
  local amt = redis.call('HGET', b, 'h:' .. ARGV[1])
  if amt then
    redis.call('HINCRBY', b, 'reserved', -tonumber(amt))
    redis.call('HDEL', b, 'h:' .. ARGV[1])
    redis.call('ZREM', KEYS[2*i], ARGV[1])
  end
  if actual > 0 then redis.call('HINCRBY', b, 'spent', ARGV[2]) end
end
return 1
"""


def to_nanos(amount: float) -> int:
    return round(amount * NANOS)


def from_nanos(amount: int) -> float:
    return amount / NANOS


def periods(now: float) -> tuple[str, str]:
    """The UTC day and month period names of an instant."""
    t = time.gmtime(now)
    return time.strftime("day:%Y-%m-%d", t), time.strftime("month:%Y-%m", t)


@dataclass(frozen=True)
class Reservation:
    """An open hold on every ledger a call touches."""

    id: str
    keys: tuple[str, ...]
    estimate: int
    """Reserved amount, in billionths."""


@dataclass(frozen=True)
class Refusal:
    """Why a reservation was refused: which cap, its spend, and the call's worst-case estimate."""

    cap_name: str
    cap: float
    spent: float
    reserved: float
    estimate: float

    def message(self, tier: str) -> str:
        return (f"{self.cap_name} cap {self.cap:.6f} cannot cover a call to tier {tier}: spent {self.spent:.6f}"
                f" (+{self.reserved:.6f} reserved by calls in flight), estimate {self.estimate:.6f}")

    def details(self, tier: str) -> dict[str, object]:
        return {"cap_name": self.cap_name, "cap": self.cap, "spend": self.spent, "reserved": self.reserved,
                "estimate": self.estimate, "tier": tier}


class BudgetLedger:
    """Reservations and settlements against the configured caps."""

    def __init__(self, client: redis.Redis, keys: Keys, budgets: BudgetConfig) -> None:
        self._redis = client
        self._keys = keys
        self._budgets = budgets
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)

    def _scopes(self, tenant: str, now: float) -> list[tuple[str, str, str, float | None, int]]:
        """(scope, period, cap name, cap, ttl) of the four ledgers of a call."""
        day, month = periods(now)
        tb = self._budgets.tenant(tenant)
        return [
            ("global", day, "global daily", self._budgets.global_daily, DAY_TTL_S),
            ("global", month, "global monthly", self._budgets.global_monthly, MONTH_TTL_S),
            (f"tenant:{tenant}", day, f"tenant {tenant} daily", tb.daily, DAY_TTL_S),
            (f"tenant:{tenant}", month, f"tenant {tenant} monthly", tb.monthly, MONTH_TTL_S),
        ]

    def reserve(self, *, tenant: str, estimate: int, max_cost: float | None, now: float,
                hold_s: float) -> Reservation | Refusal:
        """Hold ``estimate`` (billionths) on every ledger, or say which cap refuses it."""
        scopes = self._scopes(tenant, now)
        keys: list[str] = []
        res_id = uuid.uuid4().hex
        args: list[str | int | float] = [int(now * 1000), int((now + hold_s) * 1000), res_id, estimate,
                                         -1 if max_cost is None else to_nanos(max_cost)]
        for scope, period, _, cap, ttl in scopes:
            keys += [self._keys.budget(scope, period), self._keys.budget_holds(scope, period)]
            args += [-1 if cap is None else to_nanos(cap), ttl]
        result = self._reserve(keys=keys, args=args)
        if int(result[0]) == 1:
            return Reservation(id=res_id, keys=tuple(keys), estimate=estimate)
        index, cap, spent, reserved = (int(x) for x in result[1:5])
        name = "request max_cost" if index == 0 else scopes[index - 1][2]
        return Refusal(cap_name=name, cap=from_nanos(cap), spent=from_nanos(spent), reserved=from_nanos(reserved),
                       estimate=from_nanos(estimate))

    def settle(self, reservation: Reservation, actual: int) -> None:
        """Replace the hold by the real cost (billionths)."""
        self._settle(keys=list(reservation.keys), args=[reservation.id, max(0, actual)])

    def release(self, reservation: Reservation) -> None:
        """Drop the hold: the call failed and is not billed."""
        self._settle(keys=list(reservation.keys), args=[reservation.id, 0])

    def spent(self, scope: str, *, now: float, period: str = "day") -> tuple[int, int]:
        """(spent, reserved) of ``scope`` (``global`` or ``tenant:<name>``) in billionths."""
        day, month = periods(now)
        key = self._keys.budget(scope, day if period == "day" else month)
        spent, reserved = self._redis.hmget(key, ["spent", "reserved"])
        return int(spent or 0), int(reserved or 0)
