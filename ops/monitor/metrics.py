"""Prometheus metrics of the whole deployment, read from Redis on each scrape.

Every role records through ``workers.telemetry.Telemetry`` into Redis hashes; this collector,
served by one monitor process, turns them into Prometheus families. The figures are therefore
right under Celery's prefork pool and across hosts (no per-process registries, no multiprocess
directory), and a restarted monitor loses nothing.

Families (counters end in ``_total``; money is in the tiers' price currency):

==========================================  ======================================================
``cohort_items_total``                      finished items {tenant, tier, outcome}
``cohort_items_coalesced_total``            items answered by another item's call {tenant}
``cohort_items_cached_total``               items served from the result cache {tenant}
``cohort_items_packed_total``               items answered in a call with several questions {tenant}
``cohort_item_errors_total``                failed items {tenant, code}
``cohort_item_cost_total``                  cost attributed to finished items {tenant, tier}
``cohort_upstream_calls_total``             HTTP calls to tiers {tier, outcome}
``cohort_upstream_call_items_total``        items carried by those calls {tier}
``cohort_tokens_in_total`` / ``_out_total`` tokens of upstream calls {tier, tenant}
``cohort_cost_total``                       cost of upstream calls {tier, tenant}
``cohort_baseline_cost_total``              the same traffic at one call per prompt on the primary tier {tenant}
``cohort_baseline_tokens_in_total`` / out   that baseline's tokens {tenant}
``cohort_retries_total``                    retries {tier, reason}
``cohort_fallbacks_total``                  fallbacks {from_tier, to_tier, reason}
``cohort_circuit_transitions_total``        circuit changes {tier, state}
``cohort_batches_total``                    batches dispatched {kind}
``cohort_batched_items_total``              items in them {kind}
``cohort_unembedded_items_total``           items flushed before the encoder reached them
``cohort_grouping_ticks_total``             grouping ticks
``cohort_queue_wait_seconds``               histogram: submission to batch start
``cohort_grouping_seconds``                 histogram: grouping ticks that did work
``cohort_model_call_seconds``               histogram: upstream calls {tier}
``cohort_end_to_end_seconds``               histogram: submission to final result
``cohort_batch_size``                       histogram: items per dispatched batch
``cohort_cache_hit_ratio``                  share of items served from cache, last alert window
``cohort_coalesce_ratio``                   share of items coalesced, last alert window
``cohort_circuit_state``                    1 for the tier's current state {tier, state}
``cohort_circuit_open``                     1 while a tier's circuit is open or half-open {tier}
``cohort_tier_disabled``                    1 while a tier is out of service {tier}
``cohort_budget_limit`` / ``_spent`` / ``_reserved`` / ``_remaining`` / ``_used_ratio``  {scope, period}
``cohort_pending_items``                    items not yet in a batch (stream + open pool)
``cohort_queue_depth``                      {queue}: pending_stream, pending_unclaimed, pending_unacked,
                                            open_pool, inference, grouper, gpu
``cohort_inflight_batches``                 batches dispatched and not completed
``cohort_grouping_open_items``              open items after the last grouping tick
``cohort_workers_alive``                    workers whose heartbeat is fresh
``cohort_alert_active``                     1 per active alert {alert, rule, severity}
``cohort_alerts_active``                    number of active alerts
``cohort_redis_up``                         1 if this scrape could read Redis
==========================================  ======================================================
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

import redis
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from producers.keys import Keys
from workers.alerting import (
    AlertSettings,
    budget_statuses,
    circuit_states,
    disabled_tiers,
    queue_depths,
    tier_names,
)
from workers.telemetry import HISTOGRAMS, bound_label, parse_field, window_totals

log = logging.getLogger("cohort.monitor")

HEARTBEAT_FRESH_S = 30.0
CIRCUIT_STATES = ("closed", "half_open", "open")

COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "items": ("Items that reached a final result.", ("tenant", "tier", "outcome")),
    "items_coalesced": ("Items answered by another item's upstream call.", ("tenant",)),
    "items_cached": ("Items served from the result cache.", ("tenant",)),
    "items_packed": ("Items answered inside a call that carried several questions.", ("tenant",)),
    "item_errors": ("Failed items by error code.", ("tenant", "code")),
    "item_cost": ("Cost attributed to finished items.", ("tenant", "tier")),
    "upstream_calls": ("HTTP calls to model tiers.", ("tier", "outcome")),
    "upstream_call_items": ("Items carried by upstream calls.", ("tier",)),
    "tokens_in": ("Input tokens of upstream calls.", ("tier", "tenant")),
    "tokens_out": ("Output tokens of upstream calls.", ("tier", "tenant")),
    "cost": ("Cost of upstream calls, in the tiers' price currency.", ("tier", "tenant")),
    "baseline_tokens_in": ("Input tokens the same traffic would send at one call per prompt.", ("tenant",)),
    "baseline_tokens_out": ("Output tokens the same traffic would receive at one call per prompt.", ("tenant",)),
    "retries": ("Retries on the same tier.", ("tier", "reason")),
    "fallbacks": ("Items moved to the next tier.", ("from_tier", "to_tier", "reason")),
    "circuit_transitions": ("Circuit breaker state changes.", ("tier", "state")),
    "batches": ("Batches dispatched by the grouper.", ("kind",)),
    "batched_items": ("Items in dispatched batches.", ("kind",)),
    "unembedded_items": ("Items flushed before the grouper's encoder reached them (encoder behind).", ()),
    "grouping_ticks": ("Grouping ticks run.", ()),
}
HISTOGRAM_HELP: dict[str, tuple[str, tuple[str, ...]]] = {
    "queue_wait_seconds": ("Seconds from submission until the item's batch started.", ()),
    "grouping_seconds": ("Duration of grouping ticks that claimed or dispatched items.", ()),
    "model_call_seconds": ("Duration of upstream model calls.", ("tier",)),
    "end_to_end_seconds": ("Seconds from submission to the item's final result.", ()),
    "batch_size": ("Items per dispatched batch.", ()),
}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class CohortCollector:
    """A prometheus_client collector that reads Cohort's figures from Redis at each scrape.

    Args:
        client: Redis client of the deployment.
        keys: its key builders.
        config: the parsed config file (tiers, budgets, alert window).
        alert_settings: the ``[alerts]`` settings (their window is used for the ratio gauges).
    """

    def __init__(self, client: redis.Redis, keys: Keys, config: Mapping[str, Any],
                 alert_settings: AlertSettings) -> None:
        self._redis = client
        self._keys = keys
        self._config = config
        self._alerts = alert_settings
        self._tiers = tier_names(config)
        self._primary_prices = primary_prices(config)

    def collect(self) -> Iterator[Metric]:
        try:
            families = list(self._collect())
        except (redis.RedisError, OSError) as exc:
            log.warning("scrape could not read Redis: %s", exc)
            families = []
            up = 0.0
        else:
            up = 1.0
        yield from families
        yield GaugeMetricFamily("cohort_redis_up", "1 if this scrape could read Cohort's Redis.", value=up)

    def _collect(self) -> Iterator[Metric]:
        now = time.time()
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(self._keys.metric_counters())
        pipe.hgetall(self._keys.metric_histograms())
        pipe.hgetall(self._keys.metric_gauges())
        pipe.hgetall(self._keys.alerts())
        pipe.zcount(self._keys.heartbeats(), now - HEARTBEAT_FRESH_S, "+inf")
        counters_raw, hist_raw, gauges_raw, alerts_raw, alive = pipe.execute()
        yield from self._counters(counters_raw)
        yield from self._histograms(hist_raw)
        yield from self._gauges(now, gauges_raw, alerts_raw, int(alive or 0))

    # --- counters -------------------------------------------------------------------------
    def _counters(self, raw: Mapping[bytes, bytes]) -> Iterator[Metric]:
        values: dict[str, dict[tuple[str, ...], float]] = defaultdict(lambda: defaultdict(float))
        unpriced: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        priced: dict[str, float] = defaultdict(float)
        for field, value in raw.items():
            name, labels, _ = parse_field(_text(field))
            number = float(value)
            if name == "baseline_cost":
                priced[labels.get("tenant", "")] += number
            elif name in ("baseline_unpriced_tokens_in", "baseline_unpriced_tokens_out"):
                unpriced[labels.get("tenant", "")][name.endswith("_out")] += number
            elif name in COUNTERS:
                label_names = COUNTERS[name][1]
                values[name][tuple(labels.get(k, "") for k in label_names)] += number
        for name, (help_text, label_names) in COUNTERS.items():
            family = CounterMetricFamily(f"cohort_{name}", help_text, labels=list(label_names))
            for label_values, number in sorted(values[name].items()):
                family.add_metric(list(label_values), number)
            yield family
        baseline = CounterMetricFamily(
            "cohort_baseline_cost", "What the same traffic would have cost at one call per prompt on the primary tier.",
            labels=["tenant"])
        price_in, price_out = self._primary_prices
        for tenant in sorted(set(priced) | set(unpriced)):
            tin, tout = unpriced.get(tenant, [0.0, 0.0])
            baseline.add_metric([tenant], priced.get(tenant, 0.0) + (tin * price_in + tout * price_out) / 1000.0)
        yield baseline

    # --- histograms -----------------------------------------------------------------------
    def _histograms(self, raw: Mapping[bytes, bytes]) -> Iterator[Metric]:
        series: dict[str, dict[tuple[str, ...], dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
        for field, value in raw.items():
            name, labels, suffix = parse_field(_text(field))
            if name not in HISTOGRAMS or suffix is None:
                continue
            label_names = HISTOGRAM_HELP[name][1]
            series[name][tuple(labels.get(k, "") for k in label_names)][suffix] = float(value)
        for name, (help_text, label_names) in HISTOGRAM_HELP.items():
            family = HistogramMetricFamily(f"cohort_{name}", help_text, labels=list(label_names))
            bounds = HISTOGRAMS[name]
            for label_values, fields in sorted(series[name].items()):
                cumulative = 0.0
                buckets = []
                for bound in bounds:
                    cumulative += fields.get(bound_label(bound), 0.0)
                    buckets.append((bound_label(bound), cumulative))
                cumulative += fields.get("+Inf", 0.0)
                buckets.append(("+Inf", cumulative))
                family.add_metric(list(label_values), buckets, sum_value=fields.get("sum", 0.0))
            yield family

    # --- gauges read live -----------------------------------------------------------------
    def _gauges(self, now: float, gauges_raw: Mapping[bytes, bytes], alerts_raw: Mapping[bytes, bytes],
                alive: int) -> Iterator[Metric]:
        depths = queue_depths(self._redis, self._keys)
        yield GaugeMetricFamily("cohort_pending_items", "Items submitted and not yet in a batch.",
                                value=depths["pending"])
        queue = GaugeMetricFamily("cohort_queue_depth", "Entries waiting in each queue.", labels=["queue"])
        for name in ("pending_stream", "pending_unclaimed", "pending_unacked", "open_pool", "inference",
                     "grouper", "gpu"):
            queue.add_metric([name], depths[name])
        yield queue
        yield GaugeMetricFamily("cohort_inflight_batches", "Batches dispatched and not completed.",
                                value=depths["inflight_batches"])
        gauges = {_text(k): _text(v) for k, v in gauges_raw.items()}
        yield GaugeMetricFamily("cohort_grouping_open_items", "Open items after the last grouping tick.",
                                value=float(gauges.get("open_items", 0) or 0))
        yield GaugeMetricFamily("cohort_workers_alive", "Workers whose heartbeat is fresh.", value=alive)

        states = circuit_states(self._redis, self._keys, self._tiers)
        state = GaugeMetricFamily("cohort_circuit_state", "1 for the tier's current circuit state.",
                                  labels=["tier", "state"])
        is_open = GaugeMetricFamily("cohort_circuit_open", "1 while a tier's circuit is open or half-open.",
                                    labels=["tier"])
        for tier, current in states.items():
            for name in CIRCUIT_STATES:
                state.add_metric([tier, name], 1.0 if current == name else 0.0)
            is_open.add_metric([tier], 1.0 if current in ("open", "half_open") else 0.0)
        yield state
        yield is_open
        disabled = GaugeMetricFamily("cohort_tier_disabled", "1 while a tier is out of service.", labels=["tier"])
        for tier, off in disabled_tiers(self._redis, self._keys, self._tiers).items():
            disabled.add_metric([tier], 1.0 if off else 0.0)
        yield disabled

        families = {
            "limit": GaugeMetricFamily("cohort_budget_limit", "Spend cap.", labels=["scope", "period"]),
            "spent": GaugeMetricFamily("cohort_budget_spent", "Settled spend in the current period.",
                                       labels=["scope", "period"]),
            "reserved": GaugeMetricFamily("cohort_budget_reserved", "Spend reserved by calls in flight.",
                                          labels=["scope", "period"]),
            "remaining": GaugeMetricFamily("cohort_budget_remaining", "Cap minus spent and reserved.",
                                           labels=["scope", "period"]),
            "used_ratio": GaugeMetricFamily("cohort_budget_used_ratio", "Settled spend over cap.",
                                            labels=["scope", "period"]),
        }
        for b in budget_statuses(self._redis, self._keys, self._config, now=now):
            labels = [b.scope, b.period]
            families["limit"].add_metric(labels, b.limit)
            families["spent"].add_metric(labels, b.spent)
            families["reserved"].add_metric(labels, b.reserved)
            families["remaining"].add_metric(labels, b.remaining)
            families["used_ratio"].add_metric(labels, b.used_ratio)
        yield from families.values()

        window = window_totals(self._redis, self._keys, end=now, seconds=self._alerts.window_s)
        items = window.get("items", 0.0)
        span = f"last {self._alerts.window_s} s"
        yield GaugeMetricFamily("cohort_cache_hit_ratio", f"Share of finished items served from cache ({span}).",
                                value=window.get("cached", 0.0) / items if items else 0.0)
        yield GaugeMetricFamily("cohort_coalesce_ratio", f"Share of finished items coalesced ({span}).",
                                value=window.get("coalesced", 0.0) / items if items else 0.0)

        active = GaugeMetricFamily("cohort_alert_active", "1 per active Cohort alert.",
                                   labels=["alert", "rule", "severity"])
        count = 0
        for raw in alerts_raw.values():
            try:
                alert = json.loads(raw)
            except ValueError:
                continue
            count += 1
            active.add_metric([str(alert.get("id", "")), str(alert.get("rule", "")),
                               str(alert.get("severity", ""))], 1.0)
        yield active
        yield GaugeMetricFamily("cohort_alerts_active", "Number of active Cohort alerts.", value=count)


def primary_prices(config: Mapping[str, Any]) -> tuple[float, float]:
    """Prices per 1,000 tokens (in, out) of the first tier of the chain (0, 0 without tiers)."""
    tiers = config.get("tiers")
    if isinstance(tiers, list) and tiers and isinstance(tiers[0], dict):
        first = tiers[0]
        try:
            return float(first.get("price_in_per_1k", 0.0)), float(first.get("price_out_per_1k", 0.0))
        except (TypeError, ValueError):
            pass
    return 0.0, 0.0


def primary_tier(config: Mapping[str, Any]) -> str | None:
    """Name of the first tier of the chain (the primary), if any."""
    names = tier_names(config)
    return names[0] if names else None


def make_registry(client: redis.Redis, keys: Keys, config: Mapping[str, Any],
                  alert_settings: AlertSettings) -> CollectorRegistry:
    """A registry holding only Cohort's collector (the monitor process's own figures are not Cohort's)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CohortCollector(client, keys, config, alert_settings))
    return registry
