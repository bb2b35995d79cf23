"""The figures behind the live dashboard (``GET /dashboard/data``), read from Redis.

Totals come from the running counters (exact, since the counters began); live figures from the
per-second telemetry windows: throughput over the last ``RATE_WINDOW_S`` seconds, latency
percentiles over the last ``LATENCY_WINDOW_S`` seconds (estimated from histogram buckets, as
Prometheus's ``histogram_quantile`` does), and a per-second series for the charts.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import redis

from ops.monitor.metrics import primary_prices
from producers.keys import Keys
from workers.alerting import AlertStore, circuit_states, disabled_tiers, queue_depths, tier_names
from workers.telemetry import (
    LATENCY_BUCKETS,
    estimate_quantile,
    latency_buckets,
    parse_field,
    window_series,
    window_totals,
)

RATE_WINDOW_S = 10
LATENCY_WINDOW_S = 60
SERIES_S = 120
SERIES_FIELDS = ("items", "o:failed", "cost", "calls")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def dashboard_data(client: redis.Redis, keys: Keys, config: Mapping[str, Any], *,
                   now: float | None = None, refresh_ms: int = 1000, flower_url: str = "") -> dict[str, Any]:
    """Everything the dashboard page shows, as one JSON-ready dict."""
    now = time.time() if now is None else now
    tiers = tier_names(config)
    raw = client.hgetall(keys.metric_counters())
    totals: dict[str, float] = defaultdict(float)
    by_tier: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    errors: dict[str, float] = defaultdict(float)
    price_in, price_out = primary_prices(config)
    for field, value in raw.items():
        name, labels, _ = parse_field(_text(field))
        number = float(value)
        if name == "items":
            totals["requests"] += number
            totals[labels.get("outcome", "")] += number
            if labels.get("outcome") == "answered":
                by_tier[labels.get("tier", "none")]["items"] += number
        elif name in ("items_coalesced", "items_cached", "items_packed"):
            totals[name.removeprefix("items_")] += number
        elif name == "item_errors":
            errors[labels.get("code", "unknown")] += number
        elif name == "upstream_calls":
            totals["calls"] += number
            by_tier[labels.get("tier", "")]["calls"] += number
            if labels.get("outcome") != "ok":
                totals["failed_calls"] += number
                by_tier[labels.get("tier", "")]["failed_calls"] += number
        elif name == "cost":
            totals["cost"] += number
            by_tier[labels.get("tier", "")]["cost"] += number
        elif name in ("tokens_in", "tokens_out"):
            totals[name] += number
        elif name == "baseline_cost":
            totals["baseline_cost"] += number
        elif name == "baseline_unpriced_tokens_in":
            totals["baseline_cost"] += number * price_in / 1000.0
        elif name == "baseline_unpriced_tokens_out":
            totals["baseline_cost"] += number * price_out / 1000.0
    requests = totals["requests"]
    savings = totals["baseline_cost"] - totals["cost"]

    rate = window_totals(client, keys, end=now - 1, seconds=RATE_WINDOW_S)
    lat_window = window_totals(client, keys, end=now, seconds=LATENCY_WINDOW_S)
    counts = latency_buckets(lat_window)
    latency = {
        "avg": _ratio(lat_window.get("e2e_sum", 0.0), lat_window.get("items", 0.0)),
        **{f"p{q}": estimate_quantile(counts, LATENCY_BUCKETS, q / 100) for q in (50, 95, 99)},
        "window_s": LATENCY_WINDOW_S,
        "items": lat_window.get("items", 0.0),
    }
    states = circuit_states(client, keys, tiers)
    disabled = disabled_tiers(client, keys, tiers)
    answered = totals["answered"]
    tier_rows = []
    for name in [*tiers, *sorted(set(by_tier) - set(tiers) - {"none"})]:
        t = by_tier.get(name, {})
        busy = lat_window.get(f"tb:{name}", 0.0)
        tier_rows.append({
            "name": name,
            "items": t.get("items", 0.0),
            "share": _ratio(t.get("items", 0.0), answered),
            "calls": t.get("calls", 0.0),
            "failed_calls": t.get("failed_calls", 0.0),
            "cost": t.get("cost", 0.0),
            "calls_per_s": lat_window.get(f"tc:{name}", 0.0) / LATENCY_WINDOW_S,
            "utilization": busy / LATENCY_WINDOW_S,
            "circuit": states.get(name, "closed"),
            "disabled": disabled.get(name, False),
        })
    series = window_series(client, keys, end=now - 1, seconds=SERIES_S, fields=SERIES_FIELDS)
    store = AlertStore(client, keys)
    return {
        "now": now,
        "refresh_ms": refresh_ms,
        "flower_url": flower_url,
        "totals": {
            "requests": requests,
            "answered": answered,
            "failed": totals["failed"],
            "error_rate": _ratio(totals["failed"], requests),
            "coalesced": totals["coalesced"],
            "cached": totals["cached"],
            "packed": totals["packed"],
            "cache_hit_rate": _ratio(totals["cached"], requests),
            "coalescing_rate": _ratio(totals["coalesced"], requests),
            "calls": totals["calls"],
            "failed_calls": totals["failed_calls"],
            "calls_per_request": _ratio(totals["calls"], requests),
            "tokens_in": totals["tokens_in"],
            "tokens_out": totals["tokens_out"],
            "cost": totals["cost"],
            "cost_per_request": _ratio(totals["cost"], requests),
            "baseline_cost": totals["baseline_cost"],
            "savings": savings,
            "savings_rate": _ratio(savings, totals["baseline_cost"]),
        },
        "live": {
            "window_s": RATE_WINDOW_S,
            "throughput_rps": rate.get("items", 0.0) / RATE_WINDOW_S,
            "calls_per_s": rate.get("calls", 0.0) / RATE_WINDOW_S,
            "cost_per_s": rate.get("cost", 0.0) / RATE_WINDOW_S,
            "error_rate": _ratio(rate.get("o:failed", 0.0), rate.get("items", 0.0)),
            "latency_s": latency,
        },
        "tiers": tier_rows,
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])),
        "alerts": store.active(),
        "queues": queue_depths(client, keys),
        "series": [{"ts": row["ts"], "items": row["items"], "failed": row["o:failed"], "cost": row["cost"],
                    "calls": row["calls"]} for row in series],
    }


def to_json(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
