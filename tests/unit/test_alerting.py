"""Alert rules, deduplication and resolution (pure logic; the Redis store is faked in memory)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from producers.errors import ConfigError
from producers.keys import Keys
from workers.alerting import (
    AlertSettings,
    AlertStore,
    BudgetStatus,
    Snapshot,
    alert_settings,
    evaluate,
    notify,
)
from workers.telemetry import LATENCY_BUCKETS, bucket_index, estimate_quantile, parse_field

SETTINGS = AlertSettings(min_requests=10, pending_growth_s=60.0)


def window(items: int, *, cost: float = 0.0, failed: int = 0, latencies: list[float] | None = None,
           **extra: float) -> dict[str, float]:
    """A window as telemetry writes it: counts, sums and latency bucket counts."""
    w: dict[str, float] = {"items": items, "o:failed": failed, "o:answered": items - failed, "cost": cost, **extra}
    for value in latencies or []:
        key = f"e2e:{bucket_index(LATENCY_BUCKETS, value)}"
        w[key] = w.get(key, 0) + 1
        w["e2e_sum"] = w.get("e2e_sum", 0.0) + value
    return w


def firing(conditions: list[Any]) -> set[str]:
    return {c.id for c in conditions if c.firing}


def by_id(conditions: list[Any]) -> dict[str, Any]:
    return {c.id: c for c in conditions}


# --- the article's three thresholds ---------------------------------------------------------
def test_cost_per_request_fires_above_the_threshold_only() -> None:
    at = evaluate(Snapshot(now=0, window=window(100, cost=1.0)), SETTINGS, {})[0]  # exactly 0.01
    above = evaluate(Snapshot(now=0, window=window(100, cost=1.01)), SETTINGS, {})[0]
    assert "cost_per_request" not in firing(at)
    assert "cost_per_request" in firing(above)
    assert by_id(above)["cost_per_request"].value == pytest.approx(0.0101)


def test_rate_rules_wait_for_enough_requests() -> None:
    few = window(9, cost=9.0, failed=9, latencies=[10.0] * 9)
    assert firing(evaluate(Snapshot(now=0, window=few), SETTINGS, {})[0]) == set()
    enough = window(10, cost=10.0, failed=10, latencies=[10.0] * 10)
    conditions = evaluate(Snapshot(now=0, window=enough), SETTINGS, {})[0]
    assert {"cost_per_request", "error_rate", "latency"} <= firing(conditions)


def test_error_rate_above_five_percent() -> None:
    assert "error_rate" not in firing(evaluate(Snapshot(now=0, window=window(100, failed=5)), SETTINGS, {})[0])
    conditions = evaluate(Snapshot(now=0, window=window(100, failed=6)), SETTINGS, {})[0]
    assert "error_rate" in firing(conditions)
    assert by_id(conditions)["error_rate"].severity == "critical"


def test_latency_average_and_percentile() -> None:
    # 90 fast items and 10 very slow ones: the mean is above 2 s, the median is not.
    w = window(100, latencies=[0.2] * 90 + [30.0] * 10)
    assert "latency" in firing(evaluate(Snapshot(now=0, window=w), SETTINGS, {})[0])
    p50 = AlertSettings(min_requests=10, latency_stat="p50")
    assert "latency" not in firing(evaluate(Snapshot(now=0, window=w), p50, {})[0])
    p95 = AlertSettings(min_requests=10, latency_stat="p95")
    assert "latency" in firing(evaluate(Snapshot(now=0, window=w), p95, {})[0])


def test_quantile_estimate_interpolates_within_buckets() -> None:
    bounds = (1.0, 2.0, 4.0)
    assert estimate_quantile([0, 10, 0, 0], bounds, 0.5) == pytest.approx(1.5)
    assert estimate_quantile([10, 10, 0, 0], bounds, 0.5) == pytest.approx(1.0)
    assert estimate_quantile([0, 0, 0, 5], bounds, 0.99) == 4.0  # +Inf bucket: the last bound
    assert estimate_quantile([0, 0, 0, 0], bounds, 0.5) is None


def test_zero_threshold_disables_a_rule() -> None:
    off = AlertSettings(cost_per_request=0, latency_s=0, error_rate=0, budget_warn_ratio=0, pending_growth_s=0)
    conditions = evaluate(Snapshot(now=0, window=window(100, cost=100, failed=100, latencies=[9.0] * 100)), off, {})[0]
    assert {c.rule for c in conditions} == set()


# --- budgets, circuits, tiers ---------------------------------------------------------------
def budget(spent: float, *, limit: float = 10.0) -> BudgetStatus:
    return BudgetStatus(scope="tenant:acme", period="day", period_name="day:2025-01-01", limit=limit,
                        spent=spent, reserved=0.0)


def test_budget_warning_at_80_and_exhausted_at_100_percent() -> None:
    ids = ("budget_warning:tenant:acme:day", "budget_exhausted:tenant:acme:day")
    assert firing(evaluate(Snapshot(now=0, window={}, budgets=[budget(7.99)]), SETTINGS, {})[0]) == set()
    assert firing(evaluate(Snapshot(now=0, window={}, budgets=[budget(8.0)]), SETTINGS, {})[0]) == {ids[0]}
    assert firing(evaluate(Snapshot(now=0, window={}, budgets=[budget(10.0)]), SETTINGS, {})[0]) == set(ids)


def test_budget_exhausted_when_items_are_refused_above_the_warning() -> None:
    refused = {"err:budget_exceeded": 3.0}
    assert firing(evaluate(Snapshot(now=0, window=refused, budgets=[budget(9.5)]), SETTINGS, {})[0]) == {
        "budget_warning:tenant:acme:day", "budget_exhausted:tenant:acme:day"}
    # Refusals while the cap is far from used are another cap's (or a request's max_cost).
    assert firing(evaluate(Snapshot(now=0, window=refused, budgets=[budget(1.0)]), SETTINGS, {})[0]) == set()


def test_circuit_open_or_half_open_and_disabled_tier() -> None:
    snapshot = Snapshot(now=0, window={}, circuits={"primary": "open", "secondary": "half_open", "long": "closed"},
                        disabled={"primary": False, "secondary": True})
    assert firing(evaluate(snapshot, SETTINGS, {})[0]) == {
        "circuit_open:primary", "circuit_open:secondary", "tier_disabled:secondary"}


# --- pending depth growing ------------------------------------------------------------------
def run_pending(depths: list[tuple[float, int]]) -> list[bool]:
    state: dict[str, Any] = {}
    out = []
    for now, depth in depths:
        conditions, state = evaluate(Snapshot(now=now, window={}, pending=depth), SETTINGS, state)
        out.append("pending_growing" in firing(conditions))
    return out


def test_pending_growing_longer_than_the_set_time_fires() -> None:
    assert run_pending([(0, 5), (30, 10), (59, 20), (60, 30), (90, 31)]) == [False, False, False, True, True]


def test_pending_that_drains_below_its_start_does_not_fire() -> None:
    # It dips under the level where the rise began at t=40: the rise starts again from there.
    assert run_pending([(0, 5), (40, 4), (70, 50), (99, 60), (100, 70)]) == [False, False, False, False, True]


def test_pending_flat_or_empty_does_not_fire() -> None:
    assert run_pending([(0, 5), (100, 5)]) == [False, False]  # not higher than where it started
    assert run_pending([(0, 5), (50, 0), (120, 9)]) == [False, False, False]  # emptied in between


# --- settings -------------------------------------------------------------------------------
def test_settings_defaults_are_the_articles_thresholds() -> None:
    s = alert_settings({}, env={})
    assert (s.cost_per_request, s.latency_s, s.error_rate) == (0.01, 2.0, 0.05)
    assert (s.budget_warn_ratio, s.budget_critical_ratio) == (0.8, 1.0)


@pytest.mark.parametrize(("table", "key"), [
    ({"cost_per_requests": 0.02}, "alerts.cost_per_requests"),
    ({"latency_stat": "p90"}, "alerts.latency_stat"),
    ({"error_rate": 2.0}, "alerts.error_rate"),
    ({"window_s": "5m"}, "alerts.window_s"),
    ({"webhook_url": "ftp://x"}, "alerts.webhook_url"),
    ({"budget_warn_ratio": 0.9, "budget_critical_ratio": 0.5}, "alerts.budget_critical_ratio"),
])
def test_bad_settings_name_the_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        alert_settings({"alerts": table}, env={})
    assert info.value.details["key"] == key


def test_webhook_url_from_the_environment_wins() -> None:
    s = alert_settings({"alerts": {"webhook_url": "http://a.invalid/x"}}, env={"COHORT_ALERT_WEBHOOK_URL": "http://b/y"})
    assert s.webhook_url == "http://b/y"


# --- dedup and resolve (store with an in-memory Redis stand-in) ----------------------------
class FakeRedis:
    """Just the hash and list commands the alert store uses, with a pipeline that runs at once."""

    def __init__(self) -> None:
        self.hashes: dict[str, dict[str, str]] = {}
        self.lists: dict[str, list[str]] = {}

    def pipeline(self, transaction: bool = True) -> FakeRedis:
        return self

    def execute(self) -> list[Any]:
        return []

    def hgetall(self, key: str) -> dict[bytes, bytes]:
        return {k.encode(): v.encode() for k, v in self.hashes.get(key, {}).items()}

    def hset(self, key: str, field: str | None = None, value: str | None = None,
             mapping: dict[str, str] | None = None) -> None:
        table = self.hashes.setdefault(key, {})
        if field is not None:
            table[field] = value or ""
        table.update(mapping or {})

    def hdel(self, key: str, field: str) -> None:
        self.hashes.get(key, {}).pop(field, None)

    def delete(self, key: str) -> None:
        self.hashes.pop(key, None)

    def lpush(self, key: str, value: str) -> None:
        self.lists.setdefault(key, []).insert(0, value)

    def ltrim(self, key: str, start: int, end: int) -> None:
        self.lists[key] = self.lists.get(key, [])[start:end + 1]

    def lrange(self, key: str, start: int, end: int) -> list[bytes]:
        return [v.encode() for v in self.lists.get(key, [])[start:end + 1]]


def test_store_dedups_while_active_and_resolves_when_cleared() -> None:
    fake = FakeRedis()
    store = AlertStore(fake, Keys("t"), history_max=3)  # type: ignore[arg-type]
    hot = Snapshot(now=0, window=window(100, cost=5.0), circuits={"primary": "open"})
    conditions, _ = evaluate(hot, SETTINGS, {})
    fired = store.apply(conditions, now=100.0)
    assert {t.alert["id"] for t in fired} == {"cost_per_request", "circuit_open:primary"}
    assert all(t.event == "fired" for t in fired)

    again = store.apply(evaluate(hot, SETTINGS, {})[0], now=105.0)
    assert again == []  # deduplicated: still one active alert each, no new history entry
    active = {a["id"]: a for a in store.active()}
    assert active["cost_per_request"]["fired_at"] == 100.0 and active["cost_per_request"]["last_seen"] == 105.0
    assert len(store.history(10)) == 2

    calm = Snapshot(now=0, window=window(100, cost=0.5), circuits={"primary": "closed"})
    resolved = store.apply(evaluate(calm, SETTINGS, {})[0], now=130.0)
    assert {(t.event, t.alert["id"]) for t in resolved} == {("resolved", "cost_per_request"),
                                                            ("resolved", "circuit_open:primary")}
    assert store.active() == []
    history = store.history(10)
    assert len(history) == 3  # capped at history_max
    assert history[0]["event"] == "resolved" and history[0]["duration_s"] == 30.0


def test_store_resolves_alerts_whose_subject_disappeared() -> None:
    fake = FakeRedis()
    store = AlertStore(fake, Keys("t"))  # type: ignore[arg-type]
    store.apply(evaluate(Snapshot(now=0, window={}, circuits={"old-tier": "open"}), SETTINGS, {})[0], now=1.0)
    resolved = store.apply(evaluate(Snapshot(now=0, window={}, circuits={}), SETTINGS, {})[0], now=2.0)
    assert [(t.event, t.alert["id"]) for t in resolved] == [("resolved", "circuit_open:old-tier")]


def test_store_keeps_the_evaluator_state() -> None:
    fake = FakeRedis()
    store = AlertStore(fake, Keys("t"))  # type: ignore[arg-type]
    _, state = evaluate(Snapshot(now=50.0, window={}, pending=7), SETTINGS, {})
    store.apply([], now=50.0, state=state)
    assert store.load_state() == {"pending": {"since": 50.0, "floor": 7}}
    assert json.loads(fake.hashes["t:alerts:state"]["pending"]) == {"since": 50.0, "floor": 7}


def test_webhook_failure_never_raises() -> None:
    from workers.alerting import Transition

    # Port 9 (discard) on loopback: nothing listens, the connection is refused at once.
    assert notify("http://127.0.0.1:9/hook", [Transition("fired", {"id": "x"})], timeout_s=0.5) == 0
    assert notify("", [Transition("fired", {"id": "x"})], timeout_s=0.5) == 0


def test_counter_fields_round_trip() -> None:
    assert parse_field('items|{"outcome":"answered","tenant":"a|b"}') == (
        "items", {"outcome": "answered", "tenant": "a|b"}, None)
    assert parse_field('end_to_end_seconds|{}|+Inf') == ("end_to_end_seconds", {}, "+Inf")
    assert parse_field('model_call_seconds|{"tier":"p"}|0.5') == ("model_call_seconds", {"tier": "p"}, "0.5")


def test_the_task_has_a_readable_name_and_no_arguments() -> None:
    import inspect

    from workers.alert_task import evaluate_alerts

    assert evaluate_alerts.name == "cohort.evaluate_alerts"
    assert evaluate_alerts.ignore_result
    assert not inspect.signature(evaluate_alerts.run).parameters
