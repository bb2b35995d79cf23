"""The per-tenant sliding-window rate limit, against a real Redis (db 10), with a fake clock."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import redis

from ops.api.ratelimit import RateLimiter, _retry_after
from producers.keys import Keys
from tests.unit.test_api_app import connect_or_skip, redis_url

KEYS = Keys("cohort")


@pytest.fixture
def redis_db() -> Iterator[redis.Redis]:
    client = connect_or_skip(redis_url())
    client.flushdb()
    yield client
    client.close()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def limiter(client: redis.Redis, limit: int, clock: Clock) -> RateLimiter:
    return RateLimiter(client, KEYS, lambda tenant: limit if tenant != "free" else 0, clock=clock)


def test_allows_up_to_the_limit_then_refuses_with_retry_after(redis_db: redis.Redis) -> None:
    clock = Clock(6000.0)  # the start of a minute
    rl = limiter(redis_db, 5, clock)
    decisions = [rl.take("acme") for _ in range(5)]
    assert all(d.allowed for d in decisions)
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0]
    refused = rl.take("acme")
    assert not refused.allowed and refused.retry_after_s >= 60
    assert refused.headers()["Retry-After"] == str(refused.retry_after_s)
    assert rl.take("beta").allowed  # tenants are independent
    assert rl.take("free", 10_000).allowed  # 0 = unlimited


def test_the_previous_minute_slides_out(redis_db: redis.Redis) -> None:
    clock = Clock(6000.0)
    rl = limiter(redis_db, 10, clock)
    assert all(rl.take("acme").allowed for _ in range(10))
    clock.now = 6060.0 + 1  # next minute: the previous one still counts almost fully
    refused = rl.take("acme")
    assert not refused.allowed
    clock.now += refused.retry_after_s
    assert rl.take("acme").allowed
    clock.now = 6060.0 + 59  # almost all of it slid out
    assert sum(rl.take("acme").allowed for _ in range(12)) >= 8


def test_cost_counts_several_units(redis_db: redis.Redis) -> None:
    rl = limiter(redis_db, 10, Clock(6000.0))
    assert rl.take("acme", 7).allowed
    assert not rl.take("acme", 4).allowed
    assert rl.take("acme", 3).allowed


def test_concurrent_takes_never_exceed_the_limit(redis_db: redis.Redis) -> None:
    rl = limiter(redis_db, 50, Clock(6000.0))
    allowed: list[bool] = []
    lock = threading.Lock()

    def hammer() -> None:
        for _ in range(10):
            decision = rl.take("acme")
            with lock:
                allowed.append(decision.allowed)

    threads = [threading.Thread(target=hammer) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(allowed) == 50 and len(allowed) == 100


def test_retry_after_arithmetic() -> None:
    # Current minute full: wait for its end, then for this minute to slide out enough.
    assert _retry_after(limit=10, cost=1, cur=10, prev=0, elapsed=30) == 30 + 6
    # Room in this minute, previous one too heavy: wait for part of it to slide out.
    assert _retry_after(limit=10, cost=1, cur=0, prev=10, elapsed=0) == 6
    assert _retry_after(limit=10, cost=1, cur=0, prev=0, elapsed=0) == 1
