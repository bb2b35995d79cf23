"""The savings report: what Cohort did, cost and saved over a time window.

    cohort report --since 15m [--tenant acme] [--json]

Figures are computed exactly from the telemetry event stream (``Keys.events()``), one event per
finished item and per upstream call, so they hold for any window the stream still covers (it is
capped at ``EVENTS_MAXLEN`` entries; the report says when the window starts before the oldest
event). Definitions:

- ``requests``: items that reached a final result in the window; ``answered`` + ``failed``.
- latency: end-to-end seconds of those items; percentiles by the nearest-rank method.
- ``throughput_rps``: requests per second of the window; ``active_throughput_rps``: per second
  between the first and the last event of the window (the figure while traffic ran).
- ``cost_total``: what upstream calls cost (the provider's bill), ``cost_per_request`` over requests.
- ``baseline``: the same traffic at one call per prompt on the primary tier (each item's own
  prompt and answer tokens at the first tier's prices, or the cost the worker recorded);
  ``savings`` = baseline - cost.
- per tier: items answered, share of answered items, calls, failed calls, call error rate, cost,
  tokens, mean call latency, busy seconds (sum of call durations) and ``utilization`` = busy
  seconds over active seconds (mean concurrent calls).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from producers.keys import Keys
from workers.telemetry import EVENTS_MAXLEN

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
CHUNK = 5000
CLOCK_SLACK_S = 5.0


def parse_duration(text: str | float) -> float:
    """Seconds in ``90``, ``90s``, ``15m``, ``2h``, ``1d``, ``1w``, ``500ms``; raises ``ValueError``."""
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        match = _DURATION.match(text)
        if not match:
            raise ValueError(f"not a duration: {text!r} (examples: 90s, 15m, 2h, 1d)")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"a duration must be positive, got {text!r}")
    return seconds


@dataclass(frozen=True)
class PrimaryTier:
    """The tier the one-call-per-prompt baseline is priced at."""

    name: str
    price_in_per_1k: float
    price_out_per_1k: float

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PrimaryTier | None:
        tiers = config.get("tiers")
        if not isinstance(tiers, list) or not tiers or not isinstance(tiers[0], dict):
            return None
        first = tiers[0]
        return cls(str(first.get("name", "primary")), float(first.get("price_in_per_1k", 0.0)),
                   float(first.get("price_out_per_1k", 0.0)))


def read_events(client: redis.Redis, keys: Keys, *, start: float,
                end: float) -> tuple[list[dict[str, Any]], float | None]:
    """Events whose ``ts`` lies in [start, end], oldest first, and the ts of the oldest stored event."""
    stream = keys.events()
    oldest = client.xrange(stream, "-", "+", count=1)
    oldest_ts = _event(oldest[0][1]).get("ts") if oldest else None
    events: list[dict[str, Any]] = []
    lower = f"{max(0, int((start - CLOCK_SLACK_S) * 1000))}-0"
    upper = f"{int((end + CLOCK_SLACK_S) * 1000)}-0"
    while True:
        chunk = client.xrange(stream, lower, upper, count=CHUNK)
        for _id, fields in chunk:
            event = _event(fields)
            ts = event.get("ts")
            if isinstance(ts, int | float) and start <= ts <= end:
                events.append(event)
        if len(chunk) < CHUNK:
            break
        last_id = chunk[-1][0]
        lower = "(" + (last_id.decode() if isinstance(last_id, bytes) else str(last_id))
    return events, float(oldest_ts) if isinstance(oldest_ts, int | float) else None


def _event(fields: Mapping[Any, Any]) -> dict[str, Any]:
    raw = fields.get(b"e", fields.get("e"))
    if raw is None:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (``None`` if empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def _num(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return number if math.isfinite(number) else 0.0


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def build_report(events: Sequence[Mapping[str, Any]], *, start: float, end: float, tenant: str | None = None,
                 primary: PrimaryTier | None = None, oldest_event_ts: float | None = None,
                 stream_length: int | None = None) -> dict[str, Any]:
    """Compute the report's figures from events (see the module docstring for definitions)."""
    latencies: list[float] = []
    queue_waits: list[float] = []
    outcomes: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    coalesced = cached = packed = 0
    item_cost = 0.0
    baseline = {"cost": 0.0, "tokens_in": 0, "tokens_out": 0}
    tiers: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    calls = failed_calls = 0
    cost = 0.0
    tokens_in = tokens_out = 0
    retries: Counter[str] = Counter()
    fallbacks: Counter[str] = Counter()
    batches = batched_items = 0
    first_ts: float | None = None
    last_ts: float | None = None
    for e in events:
        kind = e.get("kind")
        if tenant is not None and kind in ("item", "call", "batch") and e.get("tenant") != tenant:
            continue
        if tenant is not None and kind in ("retry", "fallback", "circuit", "tick"):
            continue
        ts = _num(e.get("ts"))
        first_ts = ts if first_ts is None else min(first_ts, ts)
        last_ts = ts if last_ts is None else max(last_ts, ts)
        if kind == "item":
            outcome = str(e.get("outcome"))
            outcomes[outcome] += 1
            latencies.append(_num(e.get("end_to_end_s")))
            queue_waits.append(_num(e.get("queue_wait_s")))
            coalesced += bool(e.get("coalesced"))
            cached += bool(e.get("cached"))
            packed += bool(e.get("packed"))
            item_cost += _num(e.get("cost"))
            is_answered = outcome == "answered"
            if not is_answered:
                errors[str(e.get("error_code") or "unknown")] += 1
            elif e.get("tier"):
                tiers[str(e["tier"])]["items"] += 1
            bl_in = e.get("baseline_tokens_in", e.get("tokens_in") if is_answered else 0)
            bl_out = e.get("baseline_tokens_out", e.get("tokens_out") if is_answered else 0)
            baseline["tokens_in"] += int(_num(bl_in))
            baseline["tokens_out"] += int(_num(bl_out))
            if e.get("baseline_cost") is not None:
                baseline["cost"] += _num(e.get("baseline_cost"))
            elif primary is not None:
                baseline["cost"] += (_num(bl_in) * primary.price_in_per_1k
                                     + _num(bl_out) * primary.price_out_per_1k) / 1000.0
        elif kind == "call":
            tier = tiers[str(e.get("tier"))]
            ok = e.get("outcome") == "ok"
            calls += 1
            failed_calls += not ok
            call_cost = _num(e.get("cost"))
            cost += call_cost
            tokens_in += int(_num(e.get("tokens_in")))
            tokens_out += int(_num(e.get("tokens_out")))
            tier["calls"] += 1
            tier["failed_calls"] += not ok
            tier["cost"] += call_cost
            tier["tokens_in"] += _num(e.get("tokens_in"))
            tier["tokens_out"] += _num(e.get("tokens_out"))
            tier["busy_s"] += _num(e.get("latency_s"))
        elif kind == "retry":
            retries[str(e.get("reason"))] += 1
        elif kind == "fallback":
            fallbacks[str(e.get("reason"))] += 1
        elif kind == "batch":
            batches += 1
            batched_items += int(_num(e.get("size")))
    latencies.sort()
    requests = sum(outcomes.values())
    answered = outcomes.get("answered", 0)
    failed = requests - answered
    window_s = max(end - start, 1e-9)
    active_s = (last_ts - first_ts) if first_ts is not None and last_ts is not None else 0.0
    tier_rows = {}
    for name, t in sorted(tiers.items()):
        tier_rows[name] = {
            "items": int(t["items"]),
            "share": _ratio(t["items"], answered),
            "calls": int(t["calls"]),
            "failed_calls": int(t["failed_calls"]),
            "call_error_rate": _ratio(t["failed_calls"], t["calls"]),
            "cost": t["cost"],
            "tokens_in": int(t["tokens_in"]),
            "tokens_out": int(t["tokens_out"]),
            "avg_call_latency_s": _ratio(t["busy_s"], t["calls"]),
            "busy_s": t["busy_s"],
            "utilization": _ratio(t["busy_s"], active_s),
        }
    savings = baseline["cost"] - cost
    truncated = (oldest_event_ts is not None and oldest_event_ts > start
                 and stream_length is not None and stream_length >= EVENTS_MAXLEN * 0.9)
    return {
        "window": {"start": start, "end": end, "seconds": end - start, "tenant": tenant,
                   "active_seconds": active_s, "complete": not truncated,
                   "oldest_event": oldest_event_ts},
        "requests": requests,
        "answered": answered,
        "failed": failed,
        "error_rate": _ratio(failed, requests),
        "errors": dict(sorted(errors.items())),
        "latency_s": {
            "avg": _ratio(sum(latencies), len(latencies)),
            "p50": percentile(latencies, 0.50),
            "p95": percentile(latencies, 0.95),
            "p99": percentile(latencies, 0.99),
            "max": latencies[-1] if latencies else None,
        },
        "queue_wait_avg_s": _ratio(sum(queue_waits), len(queue_waits)),
        "throughput_rps": requests / window_s,
        "active_throughput_rps": _ratio(requests, active_s),
        "cost_total": cost,
        "cost_per_request": _ratio(cost, requests),
        "item_cost_total": item_cost,
        "calls": calls,
        "failed_calls": failed_calls,
        "call_error_rate": _ratio(failed_calls, calls),
        "calls_per_request": _ratio(calls, requests),
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
        "cache_hit_rate": _ratio(cached, requests),
        "coalescing_rate": _ratio(coalesced, requests),
        "packed_rate": _ratio(packed, requests),
        "cached": cached,
        "coalesced": coalesced,
        "packed": packed,
        "batches": batches,
        "avg_batch_size": _ratio(batched_items, batches),
        "tiers": tier_rows,
        "retries": None if tenant is not None else dict(sorted(retries.items())),
        "fallbacks": None if tenant is not None else dict(sorted(fallbacks.items())),
        "baseline": {
            "tier": primary.name if primary else None,
            "cost": baseline["cost"],
            "tokens_in": baseline["tokens_in"],
            "tokens_out": baseline["tokens_out"],
            "calls": requests,
            "savings": savings,
            "savings_rate": _ratio(savings, baseline["cost"]),
        },
    }


def report(client: redis.Redis, keys: Keys, config: Mapping[str, Any], *, since_s: float,
           tenant: str | None = None, now: float | None = None) -> dict[str, Any]:
    """The report over the last ``since_s`` seconds, read from Redis."""
    end = time.time() if now is None else now
    start = end - since_s
    events, oldest = read_events(client, keys, start=start, end=end)
    return build_report(events, start=start, end=end, tenant=tenant, primary=PrimaryTier.from_config(config),
                        oldest_event_ts=oldest, stream_length=int(client.xlen(keys.events())))


# --- rendering ------------------------------------------------------------------------------
def _fmt(value: Any, kind: str = "num") -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{value * 100:.1f}%"
    if kind == "money":
        return f"{value:.6f}" if abs(value) < 1 else f"{value:,.4f}"
    if kind == "s":
        return f"{value:.3f} s"
    if kind == "rate":
        return f"{value:.2f}/s"
    if isinstance(value, float):
        return f"{value:,.2f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _table(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None) -> Iterator[str]:
    all_rows = ([list(header)] if header else []) + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(all_rows[0]))]
    for n, row in enumerate(all_rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        yield "  " + "  ".join(cells).rstrip()
        if header and n == 0:
            yield "  " + "  ".join("-" * w for w in widths)


def render_table(r: Mapping[str, Any]) -> str:
    """The report as a terminal table."""
    w = r["window"]
    start = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(w["start"]))
    end = time.strftime("%H:%M:%S", time.localtime(w["end"]))
    title = f"Cohort report  {start} -> {end}  ({w['seconds']:.0f} s)"
    if w.get("tenant"):
        title += f"  tenant {w['tenant']}"
    lines = [title, "=" * len(title)]
    if not w.get("complete", True):
        oldest = time.strftime("%H:%M:%S", time.localtime(w["oldest_event"]))
        lines.append(f"  note: the event stream starts at {oldest}; earlier figures are gone")
    lat = r["latency_s"]
    bl = r["baseline"]
    summary = [
        ("requests", _fmt(r["requests"])),
        ("answered", _fmt(r["answered"])),
        ("failed", _fmt(r["failed"])),
        ("error rate", _fmt(r["error_rate"], "pct")),
        ("latency avg", _fmt(lat["avg"], "s")),
        ("latency p50 / p95 / p99", " / ".join(_fmt(lat[k], "s") for k in ("p50", "p95", "p99"))),
        ("throughput (window)", _fmt(r["throughput_rps"], "rate")),
        ("throughput (while active)", _fmt(r["active_throughput_rps"], "rate")),
        ("upstream calls", f"{_fmt(r['calls'])} ({_fmt(r['calls_per_request'])} per request)"),
        ("cost total", _fmt(r["cost_total"], "money")),
        ("cost per request", _fmt(r["cost_per_request"], "money")),
        ("cache hit rate", _fmt(r["cache_hit_rate"], "pct")),
        ("coalescing rate", _fmt(r["coalescing_rate"], "pct")),
        ("packed rate", _fmt(r["packed_rate"], "pct")),
        ("batches (avg size)", f"{_fmt(r['batches'])} ({_fmt(r['avg_batch_size'])})"),
        (f"one call per prompt on {bl['tier'] or 'primary'}", _fmt(bl["cost"], "money")),
        ("savings", f"{_fmt(bl['savings'], 'money')} ({_fmt(bl['savings_rate'], 'pct')})"),
    ]
    lines += list(_table(summary))
    if r["tiers"]:
        lines += ["", "Model utilization per tier"]
        rows = [(name, _fmt(t["items"]), _fmt(t["share"], "pct"), _fmt(t["calls"]), _fmt(t["call_error_rate"], "pct"),
                 _fmt(t["cost"], "money"), _fmt(t["avg_call_latency_s"], "s"), _fmt(t["utilization"]))
                for name, t in r["tiers"].items()]
        lines += list(_table(rows, ("tier", "items", "share", "calls", "call errors", "cost", "avg call",
                                    "utilization")))
    if r["errors"]:
        lines += ["", "Errors"]
        lines += list(_table([(code, _fmt(n), _fmt(n / r["requests"], "pct")) for code, n in r["errors"].items()],
                             ("code", "items", "of requests")))
    extra = [(f"retries: {k}", _fmt(v)) for k, v in (r["retries"] or {}).items()]
    extra += [(f"fallbacks: {k}", _fmt(v)) for k, v in (r["fallbacks"] or {}).items()]
    if extra:
        lines += ["", "Retries and fallbacks"] + list(_table(extra))
    return "\n".join(lines)
