"""A circuit breaker per tier, its state shared by every worker through Redis.

States (hash ``Keys.circuit(tier)``: ``state``, ``window_start``, ``failures``, ``calls``, ``open_until``)::

    closed ──(failures >= threshold and failures/calls >= ratio, within one window)──> open
    open ──(cooldown over: the first caller wins the probe, SET NX on Keys.circuit_probe)──> half_open
    half_open ──(probe succeeds)──> closed
    half_open ──(probe fails)──> open (a fresh cooldown)

While open, and while a probe is in flight, callers are refused at once: the router skips the
tier without waiting or spending an attempt. The probe key expires (the tier's timeout plus a
margin), so a worker that dies during its probe does not hold the circuit half-open forever.
Counting uses fixed windows that start at the first call after the previous window ended.
Requiring a failure *ratio* as well as a count keeps a busy tier with scattered errors (which
retries absorb) closed, and opens a tier that is down or drowning in 429s.
All transitions happen inside Lua scripts, so racing workers see one consistent state.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import redis

from producers.keys import Keys

# KEYS: circuit hash, probe key. ARGV: now_ms, probe_ttl_ms, token.
# Returns {allowed (0/1), is_probe (0/1), state, retry_at_ms, changed (0/1)}.
_ACQUIRE = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'closed' then
  return {1, 0, 'closed', 0, 0}
end
local now = tonumber(ARGV[1])
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
if state == 'open' and now < open_until then
  return {0, 0, 'open', open_until, 0}
end
if redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', ARGV[2]) then
  local changed = 0
  if state ~= 'half_open' then
    redis.call('HSET', KEYS[1], 'state', 'half_open')
    changed = 1
  end
  return {1, 1, 'half_open', 0, changed}
end
return {0, 0, 'half_open', now + tonumber(redis.call('PTTL', KEYS[2])), 0}
"""

# KEYS: circuit hash, probe key. ARGV: now_ms, ok (0/1), token ('' if not a probe), threshold,
# ratio, window_ms, cooldown_ms, ttl_s. Returns the new state if it changed, else ''.
_RECORD = """
local now = tonumber(ARGV[1])
local ok = ARGV[2] == '1'
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local probe = ARGV[3] ~= '' and redis.call('GET', KEYS[2]) == ARGV[3]
local ttl = tonumber(ARGV[8])
if probe then
  redis.call('DEL', KEYS[2])
  if ok then
    redis.call('HSET', KEYS[1], 'state', 'closed', 'window_start', now, 'failures', 0, 'calls', 0, 'open_until', 0)
    redis.call('EXPIRE', KEYS[1], ttl)
    return 'closed'
  end
  redis.call('HSET', KEYS[1], 'state', 'open', 'open_until', now + tonumber(ARGV[7]))
  redis.call('EXPIRE', KEYS[1], ttl)
  return 'open'
end
if state ~= 'closed' then
  return ''
end
local start = tonumber(redis.call('HGET', KEYS[1], 'window_start') or '0')
if now - start >= tonumber(ARGV[6]) then
  redis.call('HSET', KEYS[1], 'window_start', now, 'failures', 0, 'calls', 0)
end
local calls = redis.call('HINCRBY', KEYS[1], 'calls', 1)
local failures = tonumber(redis.call('HGET', KEYS[1], 'failures') or '0')
if not ok then
  failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
end
redis.call('EXPIRE', KEYS[1], ttl)
if (not ok) and failures >= tonumber(ARGV[4]) and failures >= tonumber(ARGV[5]) * calls then
  redis.call('HSET', KEYS[1], 'state', 'open', 'open_until', now + tonumber(ARGV[7]))
  return 'open'
end
return ''
"""

# KEYS: probe key. ARGV: token. Gives back a probe that was not used (the call never happened).
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True)
class Permit:
    """The breaker's answer for one call."""

    allowed: bool
    state: str
    token: str = ""
    """Non-empty when this call is the half-open probe."""
    retry_at: float = 0.0
    """When refused: epoch seconds when the tier may be tried again (best guess)."""
    changed: bool = False

    @property
    def is_probe(self) -> bool:
        return bool(self.token)


class CircuitBreaker:
    """Redis-shared breakers of all tiers, with one set of thresholds."""

    def __init__(self, client: redis.Redis, keys: Keys, *, failure_threshold: int, failure_ratio: float,
                 window_s: float, cooldown_s: float) -> None:
        self._redis = client
        self._keys = keys
        self._threshold = failure_threshold
        self._ratio = failure_ratio
        self._window_ms = int(window_s * 1000)
        self._cooldown_ms = int(cooldown_s * 1000)
        self._ttl_s = int(max(window_s, cooldown_s) * 4) + 60
        self._acquire = client.register_script(_ACQUIRE)
        self._record = client.register_script(_RECORD)
        self._release = client.register_script(_RELEASE)

    def acquire(self, tier: str, *, now: float, probe_ttl_s: float) -> Permit:
        """May a call go to ``tier`` now? If half-open, at most one caller gets the probe."""
        token = uuid.uuid4().hex
        allowed, probe, state, retry_at_ms, changed = self._acquire(
            keys=[self._keys.circuit(tier), self._keys.circuit_probe(tier)],
            args=[int(now * 1000), max(1, int(probe_ttl_s * 1000)), token],
        )
        state = state.decode() if isinstance(state, bytes) else str(state)
        return Permit(allowed=bool(allowed), state=state, token=token if probe else "",
                      retry_at=int(retry_at_ms) / 1000.0, changed=bool(changed))

    def record(self, tier: str, *, ok: bool, permit: Permit, now: float) -> str | None:
        """Count one finished call; returns the new state when this call changed it."""
        changed = self._record(
            keys=[self._keys.circuit(tier), self._keys.circuit_probe(tier)],
            args=[int(now * 1000), int(ok), permit.token, self._threshold, self._ratio, self._window_ms,
                  self._cooldown_ms, self._ttl_s],
        )
        changed = changed.decode() if isinstance(changed, bytes) else str(changed or "")
        return changed or None

    def release(self, tier: str, permit: Permit) -> None:
        """Give back an unused probe so another worker may probe at once."""
        if permit.token:
            self._release(keys=[self._keys.circuit_probe(tier)], args=[permit.token])

    def state(self, tier: str) -> str:
        """The stored state (``closed`` when none is stored)."""
        value = self._redis.hget(self._keys.circuit(tier), "state")
        if value is None:
            return "closed"
        return value.decode() if isinstance(value, bytes) else str(value)
