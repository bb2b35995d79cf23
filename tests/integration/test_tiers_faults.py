"""The tier router against the simulator over real HTTP, with real Redis (db 13) and many workers.

Each fault scenario of the issue: every request ends with a ``Completion`` or a clear ``CohortError``,
none is lost or answered twice (the simulator's ``ok`` count equals the answers), attempts never
exceed the cap (counted server-side), and circuits open, skip and close as designed.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis

from producers.errors import (
    BudgetExceeded,
    CohortError,
    ContextTooLong,
    DeadlineExceeded,
    FallbackExhausted,
    ProviderAuthError,
    ProviderRejected,
)
from producers.keys import Keys
from tests.support.simulator import SimulatorHandle, run_simulator
from workers.telemetry import Telemetry
from workers.tiers import CallRequest, Completion, TierRouter, parse_budgets, parse_routing
from workers.tiers.budget import periods, to_nanos

pytestmark = pytest.mark.timeout(60)

REDIS_URL = os.environ.get("COHORT_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
KEY = "test-key-8c1f0e2a"
ENV = {"COHORT_TEST_KEY": KEY}
CAP = 4


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorHandle]:
    with run_simulator(seed=0) as handle:
        yield handle


@pytest.fixture(scope="module")
def client() -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(REDIS_URL)
    r.flushdb()  # db 13 belongs to these tests alone
    yield r
    r.close()


@pytest.fixture
def keys(sim: SimulatorHandle) -> Keys:
    sim.reset()
    return Keys(f"t{uuid.uuid4().hex[:10]}")


def make_config(sim: SimulatorHandle, *, tiers: dict[str, dict[str, Any]] | None = None,
                **routing: Any) -> dict[str, Any]:
    """Three tiers on the simulator: primary (OpenAI), secondary (OpenAI), long (Anthropic)."""
    base = {"base_url": sim.base_url, "api_key_env": "COHORT_TEST_KEY", "timeout_s": 2.0, "max_retries": 2}
    chain = [
        {"name": "primary", "provider": "openai", "model": "sim-large", "price_in_per_1k": 0.01,
         "price_out_per_1k": 0.03, "context_window": 8192, "strength": 3},
        {"name": "secondary", "provider": "openai", "model": "sim-small", "price_in_per_1k": 0.0005,
         "price_out_per_1k": 0.0015, "context_window": 4096, "strength": 1},
        {"name": "long", "provider": "anthropic", "model": "sim-long", "price_in_per_1k": 0.003,
         "price_out_per_1k": 0.015, "context_window": 128000, "strength": 2},
    ]
    tiers = tiers or {}
    return {
        "tiers": [{**base, **t, **tiers.get(t["name"], {})} for t in chain],
        "routing": {"max_attempts_per_item": CAP, "backoff_base_s": 0.01, "backoff_max_s": 0.05,
                    "max_retry_after_s": 1.0, "circuit_failure_threshold": 3, "circuit_failure_ratio": 0.5,
                    "circuit_window_s": 10.0, "circuit_cooldown_s": 0.5, "auth_disable_s": 30.0, **routing},
    }


def make_router(client: redis.Redis, keys: Keys, config: dict[str, Any], *, env: dict[str, str] | None = None,
                sleep: Callable[[float], None] = time.sleep) -> TierRouter:
    return TierRouter(parse_routing(config, {}), parse_budgets(config), client, keys,
                      telemetry=Telemetry(client, keys), env=ENV if env is None else env, sleep=sleep)


def request(i: int = 0, *, complexity: str | None = "complex", **over: Any) -> CallRequest:
    text = over.pop("text", f"Question {i}: how do I top up my card?")
    return CallRequest(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}],
                       max_tokens=over.pop("max_tokens", 128), complexity=complexity, **over)


Outcome = Completion | CohortError


def run_many(routers: list[TierRouter], requests: list[CallRequest], threads: int = 8) -> list[Outcome]:
    """Call ``complete`` from several threads (round-robin over routers, as several workers would)."""
    def one(i: int) -> Outcome:
        try:
            return routers[i % len(routers)].complete(requests[i])
        except CohortError as exc:
            return exc

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(len(requests))))


def calls(sim: SimulatorHandle, model: str, outcome: str | None = None) -> int:
    per = sim.stats()["calls"].get(model, {})
    return sum(per.values()) if outcome is None else per.get(outcome, 0)


def attempts_of(outcome: Outcome) -> list[dict[str, Any]]:
    if isinstance(outcome, Completion):
        return [a.to_dict() for a in outcome.attempts]
    return list(outcome.details.get("attempts", []))


def check_invariants(sim: SimulatorHandle, outcomes: list[Outcome]) -> None:
    """Every request ended clearly; answers = server-side ok calls; attempts <= cap everywhere."""
    stats = sim.stats()
    answered = [o for o in outcomes if isinstance(o, Completion)]
    for o in outcomes:
        assert isinstance(o, Completion | CohortError)
        if isinstance(o, CohortError):
            assert o.message and json.dumps(o.to_dict())
        assert len(attempts_of(o)) <= CAP
    ok_calls = sum(per.get("ok", 0) for per in stats["calls"].values())
    assert ok_calls == len(answered), "an answer was produced twice or lost"
    assert stats["requests"] == sum(len(attempts_of(o)) for o in outcomes), "calls not accounted for"
    assert stats["requests"] <= CAP * len(outcomes)


def circuit_state(client: redis.Redis, keys: Keys, tier: str) -> str:
    value = client.hget(keys.circuit(tier), "state")
    return value.decode() if value else "closed"


def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# --- happy path and error classes -----------------------------------------------------------------
def test_routes_by_complexity_and_bills_reported_usage(sim: SimulatorHandle, client: redis.Redis,
                                                       keys: Keys) -> None:
    router = make_router(client, keys, make_config(sim))
    simple = router.complete(request(complexity=None))
    assert simple.tier == "secondary" and simple.complexity == "simple" and simple.text.startswith("Answer ")
    hard = router.complete(request(complexity=None, text="Write a Python function that parses ISO dates."))
    assert hard.tier == "primary" and hard.complexity == "complex"
    long_tier = router.complete(request(pinned_tier="long"))  # the Anthropic adapter over HTTP
    assert long_tier.tier == "long" and long_tier.tokens_in > 0 and long_tier.finish_reason == "stop"
    stats = sim.stats()
    assert stats["tokens_in"]["sim-large"] == hard.tokens_in
    assert hard.cost == pytest.approx(hard.tokens_in * 0.01 / 1000 + hard.tokens_out * 0.03 / 1000, abs=1e-9)
    spent, reserved = client.hmget(keys.budget("global", periods(time.time())[0]), ["spent", "reserved"])
    assert int(spent) == sum(to_nanos(c.cost) for c in (simple, hard, long_tier)) and int(reserved) == 0
    counters = {k.decode(): float(v) for k, v in client.hgetall(keys.counters()).items()}
    assert counters["calls"] == 3 and counters["calls:ok"] == 3
    router.close()


def test_30_percent_5xx_every_item_answered_within_the_cap(sim: SimulatorHandle, client: redis.Redis,
                                                           keys: Keys) -> None:
    sim.set_faults("sim-large", error_5xx_rate=0.3)
    config = make_config(sim, circuit_failure_threshold=1000)  # retries, not the circuit, absorb 30%
    routers = [make_router(client, keys, config) for _ in range(2)]
    outcomes = run_many(routers, [request(i) for i in range(80)])
    check_invariants(sim, outcomes)
    assert all(isinstance(o, Completion) for o in outcomes)
    retried = [o for o in outcomes if isinstance(o, Completion) and len(o.attempts) > 1]
    assert retried and all(a.outcome == "http_5xx" for o in retried for a in o.attempts[:-1])
    assert calls(sim, "sim-large", "5xx") > 0
    counters = {k.decode(): float(v) for k, v in client.hgetall(keys.counters()).items()}
    assert counters["retries:http_5xx"] > 0


def test_all_tiers_failing_stops_at_the_cap(sim: SimulatorHandle, client: redis.Redis, keys: Keys) -> None:
    sim.set_faults("*", error_5xx_rate=1.0)
    router = make_router(client, keys, make_config(sim, circuit_failure_threshold=1000))
    outcomes = run_many([router], [request(i) for i in range(10)], threads=4)
    check_invariants(sim, outcomes)
    for o in outcomes:
        assert isinstance(o, FallbackExhausted) and len(o.details["attempts"]) == CAP
        assert o.details["cap"] == CAP
    assert sim.stats()["requests"] == CAP * 10  # 3 tiers x 3 tries would be 9: retries do not multiply


def test_429_storm_honours_retry_after_then_opens_the_circuit(sim: SimulatorHandle, client: redis.Redis,
                                                              keys: Keys) -> None:
    sim.set_faults("sim-large", error_429_rate=1.0, retry_after_s=0.2)
    slept: list[float] = []
    lock = threading.Lock()

    def sleep(seconds: float) -> None:
        with lock:
            slept.append(seconds)
        time.sleep(seconds)

    router = make_router(client, keys, make_config(sim, circuit_cooldown_s=5.0), sleep=sleep)
    started = time.monotonic()
    first = router.complete(request(0))
    elapsed = time.monotonic() - started
    # primary, wait >= Retry-After, primary, wait, primary: the third failure opens the circuit.
    assert [a.outcome for a in first.attempts] == ["http_429", "http_429", "http_429", "ok"]
    assert first.attempts[0].retry_after_s == pytest.approx(0.2)
    assert len(slept) == 2 and all(s >= 0.2 for s in slept) and elapsed >= 0.4
    assert first.tier == "secondary" and circuit_state(client, keys, "primary") == "open"
    before = calls(sim, "sim-large")
    outcomes = run_many([router], [request(i) for i in range(1, 20)])
    check_invariants(sim, [first, *outcomes])
    assert calls(sim, "sim-large") == before, "an open circuit is skipped without calling"
    assert all(isinstance(o, Completion) and o.tier == "secondary" and len(o.attempts) == 1 for o in outcomes)


def test_retry_after_longer_than_allowed_moves_on_without_waiting(sim: SimulatorHandle, client: redis.Redis,
                                                                  keys: Keys) -> None:
    sim.set_faults("sim-large", error_429_rate=1.0, retry_after_s=30)
    slept: list[float] = []
    router = make_router(client, keys, make_config(sim), sleep=slept.append)
    answer = router.complete(request())
    assert [a.tier for a in answer.attempts] == ["primary", "secondary"] and slept == []


def test_timeouts_are_retried_then_fall_over(sim: SimulatorHandle, client: redis.Redis, keys: Keys) -> None:
    sim.set_faults("sim-large", timeout_rate=1.0, hang_s=3.0)
    config = make_config(sim, tiers={"primary": {"timeout_s": 0.2, "max_retries": 1}})
    router = make_router(client, keys, config)
    outcomes = run_many([router], [request(i) for i in range(4)], threads=4)
    check_invariants(sim, outcomes)
    for o in outcomes:
        assert isinstance(o, Completion) and o.tier == "secondary"
        for a in o.attempts[:-1]:
            assert a.outcome == "timeout" and 0.15 <= a.latency_s < 1.0
        assert len(o.attempts) <= 3


def test_down_tier_opens_skips_then_one_probe_closes(sim: SimulatorHandle, client: redis.Redis,
                                                     keys: Keys) -> None:
    sim.set_faults("sim-large", down=True)
    router = make_router(client, keys, make_config(sim))
    outcomes = run_many([router], [request(i) for i in range(12)], threads=3)
    check_invariants(sim, outcomes)
    assert all(isinstance(o, Completion) and o.tier == "secondary" for o in outcomes)
    assert circuit_state(client, keys, "primary") == "open"
    down_calls = calls(sim, "sim-large")
    assert 3 <= down_calls <= 3 + 2 * 3  # threshold reached, plus calls already in flight

    # Cooldown over, tier still down: of many racing workers exactly one probes, and it re-opens.
    time.sleep(0.55)
    # The racers re-open for 2 s, so that no second probe can fall inside this phase on a slow machine.
    racers = [make_router(client, keys, make_config(sim, circuit_cooldown_s=2.0)) for _ in range(4)]
    racing = run_many(racers, [request(i) for i in range(16)])
    check_invariants(sim, outcomes + racing)
    assert calls(sim, "sim-large") == down_calls + 1
    assert circuit_state(client, keys, "primary") == "open"

    # Tier back: after the cooldown one probe succeeds and closes the circuit for everyone.
    sim.set_faults("sim-large", down=False)
    wait_for(lambda: float(client.hget(keys.circuit("primary"), "open_until")) / 1000 < time.time(), 5.0)
    probe = router.complete(request(99))
    assert probe.tier == "primary" and circuit_state(client, keys, "primary") == "closed"
    after = run_many(racers, [request(i) for i in range(8)])
    assert all(isinstance(o, Completion) and o.tier == "primary" for o in after)
    events = [json.loads(e[b"e"]) for _, e in client.xrange(keys.events())]
    states = [e["state"] for e in events if e["kind"] == "circuit" and e["tier"] == "primary"]
    assert states[0] == "open" and "half_open" in states and states[-1] == "closed"


def test_malformed_json_is_retried_on_the_same_tier(sim: SimulatorHandle, client: redis.Redis,
                                                    keys: Keys) -> None:
    sim.set_faults("sim-large", malformed_rate=0.25, truncated_rate=0.25)
    router = make_router(client, keys, make_config(sim, circuit_failure_threshold=1000))
    outcomes = run_many([router], [request(i) for i in range(40)])
    check_invariants(sim, outcomes)
    assert all(isinstance(o, Completion) for o in outcomes)
    recovered = [o for o in outcomes if isinstance(o, Completion) and o.tier == "primary" and len(o.attempts) > 1]
    assert recovered, "some answers came after a retry on the same tier"
    assert {a.outcome for o in recovered for a in o.attempts[:-1]} <= {"malformed"}


def test_context_error_goes_straight_to_a_larger_window(sim: SimulatorHandle, client: redis.Redis,
                                                        keys: Keys) -> None:
    sim.set_faults("sim-large", context_window=100)  # the provider's window is smaller than configured
    router = make_router(client, keys, make_config(sim))
    answer = router.complete(request(text="Explain why the sky is blue. " * 40))
    assert [(a.tier, a.outcome) for a in answer.attempts] == [("primary", "context_too_long"), ("long", "ok")]
    assert calls(sim, "sim-small") == 0  # secondary's window (4096) is not larger than primary's: skipped


def test_known_long_prompts_skip_small_tiers_before_any_call(sim: SimulatorHandle, client: redis.Redis,
                                                             keys: Keys) -> None:
    router = make_router(client, keys, make_config(sim))
    answer = router.complete(request(text="word " * 10000))  # ~12,500 tokens estimated
    assert answer.tier == "long" and len(answer.attempts) == 1
    assert calls(sim, "sim-large") == 0 and calls(sim, "sim-small") == 0
    with pytest.raises(ContextTooLong) as info:
        router.complete(request(text="word " * 120000))
    assert info.value.details["largest_window"] == 128000
    assert sim.stats()["requests"] == 1


def test_auth_error_takes_the_tier_out_for_every_worker(sim: SimulatorHandle, client: redis.Redis,
                                                        keys: Keys) -> None:
    sim.set_faults("sim-large", auth_error=True)
    routers = [make_router(client, keys, make_config(sim)) for _ in range(2)]
    first = routers[0].complete(request())
    assert [(a.tier, a.outcome) for a in first.attempts] == [("primary", "auth_error"), ("secondary", "ok")]
    assert 0 < client.ttl(keys.tier_disabled("primary")) <= 30
    alert = json.loads(client.hget(keys.alerts(), "tier_auth:primary"))
    assert alert["tier"] == "primary" and alert["status"] == 401
    outcomes = run_many(routers, [request(i) for i in range(10)])
    assert calls(sim, "sim-large") == 1, "no worker calls a disabled tier"
    assert all(isinstance(o, Completion) and o.tier == "secondary" for o in outcomes)
    # The key appears nowhere in Redis: not in alerts, events, circuits or budgets.
    for key in client.scan_iter(f"{keys.prefix}:*"):
        kind = client.type(key)
        blob = (repr(client.hgetall(key)) if kind == b"hash" else repr(client.xrange(key)) if kind == b"stream"
                else repr(client.zrange(key, 0, -1)) if kind == b"zset" else repr(client.get(key)))
        assert KEY not in blob


def test_every_tier_refusing_the_key_raises_auth_error(sim: SimulatorHandle, client: redis.Redis,
                                                       keys: Keys) -> None:
    sim.set_faults("*", auth_error=True)
    router = make_router(client, keys, make_config(sim))
    with pytest.raises(ProviderAuthError) as info:
        router.complete(request())
    assert KEY not in json.dumps(info.value.to_dict())
    assert len(info.value.details["attempts"]) == 3
    with pytest.raises(ProviderAuthError):  # all out of service now: no call at all
        router.complete(request())
    assert sim.stats()["requests"] == 3


def test_missing_key_skips_the_tier_with_an_alert(sim: SimulatorHandle, client: redis.Redis, keys: Keys) -> None:
    config = make_config(sim, tiers={"primary": {"api_key_env": "COHORT_TEST_MISSING"}})
    answer = make_router(client, keys, config).complete(request())
    assert answer.tier == "secondary" and calls(sim, "sim-large") == 0
    assert client.hexists(keys.alerts(), "tier_key_missing:primary")


def test_other_4xx_fails_the_item_without_retry(sim: SimulatorHandle, client: redis.Redis, keys: Keys) -> None:
    router = make_router(client, keys, make_config(sim))
    # JSON mode without the word "json" in the messages: the provider's 400 invalid request.
    with pytest.raises(ProviderRejected) as info:
        router.complete(request(json_mode=True, text="Give me an object"))
    assert info.value.details["status"] == 400 and len(info.value.details["attempts"]) == 1
    assert sim.stats()["requests"] == 1


def test_deadline_bounds_waits_and_calls(sim: SimulatorHandle, client: redis.Redis, keys: Keys) -> None:
    router = make_router(client, keys, make_config(sim))
    with pytest.raises(DeadlineExceeded):
        router.complete(request(deadline=time.time() - 1))
    assert sim.stats()["requests"] == 0
    sim.set_faults("*", timeout_rate=1.0, hang_s=3.0)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        router.complete(request(deadline=time.time() + 0.3))
    assert time.monotonic() - started < 0.6


def test_rate_limited_tier_spills_over(sim: SimulatorHandle, client: redis.Redis, keys: Keys) -> None:
    config = make_config(sim, tiers={"primary": {"rpm": 3}}, rate_limit_max_wait_s=0.0)
    outcomes = run_many([make_router(client, keys, config)], [request(i) for i in range(10)], threads=2)
    check_invariants(sim, outcomes)
    assert all(isinstance(o, Completion) for o in outcomes)
    assert 3 <= calls(sim, "sim-large") <= 6  # 3 per minute window (a boundary may fall inside the test)
    assert calls(sim, "sim-small") == 10 - calls(sim, "sim-large")


def test_attempts_persist_across_redelivery(sim: SimulatorHandle, client: redis.Redis, keys: Keys) -> None:
    sim.set_faults("*", error_5xx_rate=1.0)
    router = make_router(client, keys, make_config(sim, circuit_failure_threshold=1000))
    for _ in range(2):
        with pytest.raises(FallbackExhausted):
            router.complete(request(call_id="item-1"))
    assert sim.stats()["requests"] == CAP  # the second delivery found the cap already spent


# --- budgets --------------------------------------------------------------------------------------
def test_cost_aware_fallback_and_budget_exceeded(sim: SimulatorHandle, client: redis.Redis, keys: Keys) -> None:
    router = make_router(client, keys, make_config(sim))
    # Worst case on primary: ~(bytes + framing) * 0.01/1k + 128 * 0.03/1k > 0.004; on secondary ~0.0002.
    answer = router.complete(request(max_cost=0.001))
    assert answer.tier == "secondary" and len(answer.attempts) == 1
    with pytest.raises(BudgetExceeded) as info:
        router.complete(request(max_cost=0.00001))
    details = info.value.details
    assert details["cap_name"] == "request max_cost" and details["cap"] == 0.00001
    assert details["estimate"] > details["cap"] and "spend" in details
    assert "cap" in info.value.message and "estimate" in info.value.message
    assert sim.stats()["requests"] == 1


def test_tenant_cap_refuses_and_names_the_cap(sim: SimulatorHandle, client: redis.Redis, keys: Keys) -> None:
    config = make_config(sim)
    config["budgets"] = {"tenants": {"acme": {"daily": 0.002}}}
    router = make_router(client, keys, config)
    results = [router.complete(request(i, tenant="other")) for i in range(3)]  # no cap for them
    assert all(r.tier == "primary" for r in results)
    outcomes = run_many([router], [request(i, tenant="acme") for i in range(40)], threads=4)
    refused = [o for o in outcomes if isinstance(o, BudgetExceeded)]
    answered = [o for o in outcomes if isinstance(o, Completion)]
    # Primary's worst case never fits 0.002: acme is served by the cheaper secondary until the cap.
    assert answered and all(o.tier == "secondary" for o in answered)
    assert refused and all(o.details["cap_name"] == "tenant acme daily" for o in refused)
    spent = int(client.hget(keys.budget("tenant:acme", periods(time.time())[0]), "spent"))
    assert spent == sum(to_nanos(o.cost) for o in answered) <= to_nanos(0.002)


def _race_worker(args: tuple[str, str, dict[str, Any], int, int]) -> list[tuple[str, int, dict[str, Any]]]:
    """One worker process: its own Redis client and router, racing the others on one budget."""
    url, prefix, config, worker, count = args
    client = redis.Redis.from_url(url)
    router = TierRouter(parse_routing(config, {}), parse_budgets(config), client, Keys(prefix), env=ENV)
    results: list[tuple[str, int, dict[str, Any]]] = []
    for i in range(count):
        try:
            done = router.complete(request(worker * 1000 + i))
            results.append(("ok", to_nanos(done.cost), {"tier": done.tier}))
        except CohortError as exc:
            results.append((exc.code, 0, exc.to_dict()))
    router.close()
    client.close()
    return results


def test_budget_race_many_processes_never_exceed_the_cap(sim: SimulatorHandle, client: redis.Redis,
                                                         keys: Keys) -> None:
    cap = 0.05
    config = make_config(sim, tiers={"secondary": {"price_in_per_1k": 0.005, "price_out_per_1k": 0.015},
                                     "long": {"price_in_per_1k": 0.008, "price_out_per_1k": 0.02}})
    config["budgets"] = {"global_daily": cap}
    workers, per_worker = 8, 12
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        batches = pool.map(_race_worker, [(REDIS_URL, keys.prefix, config, w, per_worker) for w in range(workers)])
    results = [r for batch in batches for r in batch]
    assert len(results) == workers * per_worker
    ok = [r for r in results if r[0] == "ok"]
    refused = [r for r in results if r[0] != "ok"]
    assert ok and refused, "the budget covers part of the load"
    assert {r[0] for r in refused} == {"budget_exceeded"}
    for _, _, details in refused:
        assert details["cap"] == cap and details["estimate"] > 0 and details["spend"] >= 0
        assert details["spend"] + details["reserved"] + details["estimate"] > cap
    spent, reserved = client.hmget(keys.budget("global", periods(time.time())[0]), ["spent", "reserved"])
    assert int(reserved) == 0
    assert int(spent) == sum(r[1] for r in ok) <= to_nanos(cap)
    assert int(spent) >= to_nanos(cap) * 0.8, "worst-case reservations still let most of the cap be used"
    assert sim.stats()["calls"].get("sim-large", {}).get("ok", 0) + sum(
        sim.stats()["calls"].get(m, {}).get("ok", 0) for m in ("sim-small", "sim-long")) == len(ok)
