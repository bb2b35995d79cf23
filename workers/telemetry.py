"""Recording what happens, for metrics, alerts and the savings report.

Every role records through one ``Telemetry`` object. Figures are kept in Redis, so that they
are correct under Celery's prefork pool and across hosts; one process (``python -m ops.monitor``)
reads them back on each scrape. Four shapes are written, all in one pipelined round trip per call:

- ``Keys.counters()``: the original running totals (``items:answered``, ``calls``, ``cost``...).
- ``Keys.metric_counters()``: labelled counters, field ``name|{"label":"value",...}`` (labels as
  sorted compact JSON), e.g. ``items|{"outcome":"answered","tenant":"acme","tier":"primary"}``.
- ``Keys.metric_histograms()``: histogram buckets (not cumulative), field ``name|{labels}|<bound>``
  where ``<bound>`` is a bound of ``HISTOGRAMS[name]`` or ``+Inf``, plus ``...|sum`` and ``...|count``.
- ``Keys.metric_window(second)``: the figures of one wall-clock second, kept ``WINDOW_TTL_S``: live
  rates for the dashboard and the sliding windows of the alert rules (``WINDOW_FIELDS`` lists them).

and the bounded event stream ``Keys.events()`` (one JSON entry per item outcome, upstream call,
retry, fallback, circuit change, batch and non-empty grouping tick), from which ``cohort report``
computes exact figures over any window the stream still holds. No prompt text is ever recorded.
"""

from __future__ import annotations

import bisect
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from producers.keys import Keys

EVENTS_MAXLEN = 200_000
WINDOW_TTL_S = 3900
"""Per-second window hashes live a little over an hour: the longest alert window is one hour."""
NO_TIER = "none"
"""Label value of an item that no tier answered (failed before any call, cached...)."""

LATENCY_BUCKETS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
                                      7.5, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0)
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)

HISTOGRAMS: dict[str, tuple[float, ...]] = {
    "queue_wait_seconds": LATENCY_BUCKETS,
    "grouping_seconds": LATENCY_BUCKETS,
    "model_call_seconds": LATENCY_BUCKETS,
    "end_to_end_seconds": LATENCY_BUCKETS,
    "batch_size": BATCH_SIZE_BUCKETS,
}
"""Histogram name -> upper bounds of its buckets (``+Inf`` is implied)."""

WINDOW_FIELDS: dict[str, str] = {
    "items": "items that reached a final result",
    "o:<outcome>": "items by outcome (answered, failed)",
    "coalesced": "items answered by another item's call",
    "cached": "items served from the result cache",
    "packed": "items answered inside a call with several questions",
    "e2e_sum": "sum of end-to-end latency (s)",
    "e2e:<i>": "items whose end-to-end latency falls in LATENCY_BUCKETS bucket i (len = +Inf)",
    "qw_sum": "sum of queue wait (s)",
    "item_cost": "cost attributed to finished items",
    "err:<code>": "failed items by error code",
    "ti:<tier>": "items answered by a tier",
    "bl_cost": "one-call-per-prompt baseline cost, when known",
    "bl_tin": "baseline input tokens whose cost was not given",
    "bl_tout": "baseline output tokens whose cost was not given",
    "calls": "upstream calls",
    "calls_failed": "upstream calls that did not return ok",
    "cost": "cost of upstream calls",
    "tokens_in": "input tokens of upstream calls",
    "tokens_out": "output tokens of upstream calls",
    "tc:<tier>": "upstream calls per tier",
    "tf:<tier>": "failed upstream calls per tier",
    "tb:<tier>": "seconds spent in upstream calls per tier (busy time)",
    "tcost:<tier>": "cost per tier",
    "retries": "retries",
    "fallbacks": "fallbacks",
    "batches": "batches dispatched",
    "batched_items": "items in dispatched batches",
}


def counter_field(name: str, labels: Mapping[str, Any] | None = None) -> str:
    """The field of a labelled counter in ``Keys.metric_counters()``."""
    return f"{name}|{_labels_json(labels)}"


def _labels_json(labels: Mapping[str, Any] | None) -> str:
    clean = {k: (NO_TIER if v is None else str(v)) for k, v in (labels or {}).items()}
    return json.dumps(clean, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def parse_field(field: str) -> tuple[str, dict[str, str], str | None]:
    """Split a counter or histogram field into (name, labels, suffix); suffix is None for counters."""
    name, _, rest = field.partition("|")
    suffix: str | None = None
    if not rest.endswith("}"):
        rest, _, suffix = rest.rpartition("|")
    try:
        labels = json.loads(rest) if rest else {}
    except ValueError:
        labels = {}
    return name, {str(k): str(v) for k, v in labels.items()}, suffix


def bucket_index(bounds: Sequence[float], value: float) -> int:
    """Index of the first bucket whose upper bound is >= value (``len(bounds)`` for +Inf)."""
    return bisect.bisect_left(bounds, value)


def bound_label(bound: float) -> str:
    """The text of a bucket bound as Prometheus writes it (``0.5``, ``2.0``, ``+Inf``)."""
    return repr(float(bound))


@dataclass(frozen=True)
class DispatchedBatch:
    """What telemetry records of a batch the grouper dispatched."""

    size: int
    kind: str
    """``cluster`` or ``packed``."""
    tenant: str
    unembedded: int = 0
    """Items that fell due before the grouper's encoder reached them."""


class _Batch:
    """What one telemetry call writes, gathered before one pipelined round trip."""

    __slots__ = ("legacy", "counters", "hist", "window", "gauges", "hsets")

    def __init__(self) -> None:
        self.legacy: dict[str, float] = {}
        self.counters: dict[str, float] = {}
        self.hist: dict[str, float] = {}
        self.window: dict[str, float] = {}
        self.gauges: dict[str, str] = {}
        self.hsets: list[tuple[str, str, str]] = []

    def count(self, name: str, labels: Mapping[str, Any] | None = None, value: float = 1) -> None:
        if value:
            field = counter_field(name, labels)
            self.counters[field] = self.counters.get(field, 0) + value

    def observe(self, name: str, value: float, labels: Mapping[str, Any] | None = None) -> None:
        bounds = HISTOGRAMS[name]
        base = f"{name}|{_labels_json(labels)}"
        index = bucket_index(bounds, value)
        bucket = "+Inf" if index == len(bounds) else bound_label(bounds[index])
        for field, amount in ((f"{base}|{bucket}", 1), (f"{base}|count", 1), (f"{base}|sum", float(value))):
            self.hist[field] = self.hist.get(field, 0) + amount

    def win(self, field: str, value: float = 1) -> None:
        if value:
            self.window[field] = self.window.get(field, 0) + value


def _add(pipe: Any, key: str, field: str, value: float) -> None:
    """HINCRBY for whole numbers (exact), HINCRBYFLOAT for the rest."""
    if isinstance(value, int) and not isinstance(value, bool):
        pipe.hincrby(key, field, value)
    else:
        pipe.hincrbyfloat(key, field, float(value))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _num(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return number if number == number and abs(number) != float("inf") else 0.0


class Telemetry:
    """Writes counters and events to Redis. Never raises: telemetry must not fail a batch.

    Args:
        client: Redis client of the deployment.
        keys: key builders of the deployment.
        baseline_price_in_per_1k: price per 1,000 input tokens of the primary tier, used to price
            the one-call-per-prompt baseline when ``item_finished`` gets no ``baseline_cost``
            (``None``: the baseline tokens are recorded and priced by the reader).
        baseline_price_out_per_1k: the same for output tokens.
        clock: source of wall-clock time (tests pass a fake one).
    """

    def __init__(self, client: redis.Redis, keys: Keys, *, baseline_price_in_per_1k: float | None = None,
                 baseline_price_out_per_1k: float | None = None, clock: Any = time.time) -> None:
        self._redis = client
        self._keys = keys
        self._price_in = baseline_price_in_per_1k
        self._price_out = baseline_price_out_per_1k
        self._clock = clock

    def _write(self, kind: str, batch: _Batch, event: dict[str, Any] | list[dict[str, Any]] | None) -> None:
        try:
            now = float(self._clock())
            pipe = self._redis.pipeline(transaction=False)
            for name, value in batch.legacy.items():
                pipe.hincrbyfloat(self._keys.counters(), name, value)
            for field, value in batch.counters.items():
                _add(pipe, self._keys.metric_counters(), field, value)
            for field, value in batch.hist.items():
                _add(pipe, self._keys.metric_histograms(), field, value)
            if batch.gauges:
                pipe.hset(self._keys.metric_gauges(), mapping=batch.gauges)
            for key, field, text in batch.hsets:
                pipe.hset(key, field, text)
            if batch.window:
                window_key = self._keys.metric_window(int(now))
                for field, value in batch.window.items():
                    _add(pipe, window_key, field, value)
                pipe.expire(window_key, WINDOW_TTL_S)
            for one in ([] if event is None else [event] if isinstance(event, dict) else event):
                payload = json.dumps({"kind": kind, "ts": now, **one}, separators=(",", ":"))
                pipe.xadd(self._keys.events(), {"e": payload}, maxlen=EVENTS_MAXLEN, approximate=True)
            pipe.execute()
        except (redis.RedisError, OSError, TypeError, ValueError):
            pass

    def _emit(self, kind: str, counters: dict[str, float], event: dict[str, Any] | None) -> None:
        """Running totals and an event only (kept for callers of the first version)."""
        batch = _Batch()
        batch.legacy.update(counters)
        self._write(kind, batch, event)

    def item_finished(self, *, tenant: str, tier: str | None, outcome: str, cost: float, tokens_in: int,
                      tokens_out: int, queue_wait_s: float, model_call_s: float, end_to_end_s: float,
                      coalesced: bool = False, cached: bool = False, error_code: str | None = None,
                      packed: bool = False, baseline_tokens_in: int | None = None,
                      baseline_tokens_out: int | None = None, baseline_cost: float | None = None) -> None:
        """One item reached its final result (``outcome``: ``answered`` or ``failed``).

        Args:
            tenant: the item's tenant.
            tier: the tier whose answer the item got (``None`` if none did).
            outcome: ``answered`` or ``failed``.
            cost: the item's share of what was paid for it.
            tokens_in: the item's input tokens (its share of the call).
            tokens_out: the item's output tokens.
            queue_wait_s: from submission until its batch started.
            model_call_s: time spent in upstream calls for it.
            end_to_end_s: from submission to its final result.
            coalesced: answered by another item's call.
            cached: served from the result cache.
            error_code: the ``CohortError.code`` of a failed item.
            packed: answered inside a call that carried several questions.
            baseline_tokens_in: the prompt tokens a one-call-per-prompt client would have sent for
                it (default: ``tokens_in``; failed items count nothing).
            baseline_tokens_out: the answer tokens such a client would have received (default: ``tokens_out``).
            baseline_cost: what that call would have cost on the primary tier (default: the baseline
                tokens at the primary tier's prices, when the ``Telemetry`` knows them).
        """
        b = _Batch()
        b.legacy.update({f"items:{outcome}": 1, "items:coalesced": int(coalesced), "items:cached": int(cached)})
        tier_label = tier or NO_TIER
        b.count("items", {"tenant": tenant, "tier": tier_label, "outcome": outcome})
        b.count("items_coalesced", {"tenant": tenant}, int(bool(coalesced)))
        b.count("items_cached", {"tenant": tenant}, int(bool(cached)))
        b.count("items_packed", {"tenant": tenant}, int(bool(packed)))
        b.count("item_cost", {"tenant": tenant, "tier": tier_label}, _num(cost))
        if outcome != "answered":
            b.count("item_errors", {"tenant": tenant, "code": error_code or "unknown"})
            b.win(f"err:{error_code or 'unknown'}")
        b.observe("queue_wait_seconds", _num(queue_wait_s))
        b.observe("end_to_end_seconds", _num(end_to_end_s))
        b.win("items")
        b.win(f"o:{outcome}")
        b.win("coalesced", int(bool(coalesced)))
        b.win("cached", int(bool(cached)))
        b.win("packed", int(bool(packed)))
        b.win("e2e_sum", _num(end_to_end_s))
        b.win(f"e2e:{bucket_index(LATENCY_BUCKETS, _num(end_to_end_s))}")
        b.win("qw_sum", _num(queue_wait_s))
        b.win("item_cost", _num(cost))
        if outcome == "answered":
            b.win(f"ti:{tier_label}")
        bl_in, bl_out, bl_cost = self._baseline(outcome, tokens_in, tokens_out, baseline_tokens_in,
                                                baseline_tokens_out, baseline_cost)
        b.count("baseline_tokens_in", {"tenant": tenant}, bl_in)
        b.count("baseline_tokens_out", {"tenant": tenant}, bl_out)
        if bl_cost is not None:
            b.count("baseline_cost", {"tenant": tenant}, float(bl_cost))
            b.win("bl_cost", float(bl_cost))
        else:
            b.count("baseline_unpriced_tokens_in", {"tenant": tenant}, bl_in)
            b.count("baseline_unpriced_tokens_out", {"tenant": tenant}, bl_out)
            b.win("bl_tin", bl_in)
            b.win("bl_tout", bl_out)
        self._write("item", b, {
            "tenant": tenant, "tier": tier, "outcome": outcome, "cost": cost, "tokens_in": tokens_in,
            "tokens_out": tokens_out, "queue_wait_s": queue_wait_s, "model_call_s": model_call_s,
            "end_to_end_s": end_to_end_s, "coalesced": coalesced, "cached": cached, "error_code": error_code,
            "packed": packed, "baseline_tokens_in": bl_in, "baseline_tokens_out": bl_out,
            "baseline_cost": bl_cost,
        })

    def _baseline(self, outcome: str, tokens_in: int, tokens_out: int, given_in: int | None,
                  given_out: int | None, given_cost: float | None) -> tuple[int, int, float | None]:
        default_in, default_out = (tokens_in, tokens_out) if outcome == "answered" else (0, 0)
        bl_in = int(_num(default_in if given_in is None else given_in))
        bl_out = int(_num(default_out if given_out is None else given_out))
        if given_cost is not None:
            return bl_in, bl_out, _num(given_cost)
        if self._price_in is not None and self._price_out is not None:
            return bl_in, bl_out, (bl_in * self._price_in + bl_out * self._price_out) / 1000.0
        return bl_in, bl_out, None

    def upstream_call(self, *, tier: str, tenant: str, outcome: str, tokens_in: int, tokens_out: int,
                      cost: float, latency_s: float, items: int) -> None:
        """One HTTP call to a tier ended (``outcome``: ``ok`` or an error code)."""
        b = _Batch()
        b.legacy.update({"calls": 1, f"calls:{outcome}": 1, "tokens_in": tokens_in, "tokens_out": tokens_out,
                         "cost": cost})
        b.count("upstream_calls", {"tier": tier, "outcome": outcome})
        b.count("upstream_call_items", {"tier": tier}, int(_num(items)))
        b.count("tokens_in", {"tier": tier, "tenant": tenant}, int(_num(tokens_in)))
        b.count("tokens_out", {"tier": tier, "tenant": tenant}, int(_num(tokens_out)))
        b.count("cost", {"tier": tier, "tenant": tenant}, _num(cost))
        b.observe("model_call_seconds", _num(latency_s), {"tier": tier})
        b.win("calls")
        b.win("calls_failed", int(outcome != "ok"))
        b.win("cost", _num(cost))
        b.win("tokens_in", int(_num(tokens_in)))
        b.win("tokens_out", int(_num(tokens_out)))
        b.win(f"tc:{tier}")
        b.win(f"tf:{tier}", int(outcome != "ok"))
        b.win(f"tb:{tier}", _num(latency_s))
        b.win(f"tcost:{tier}", _num(cost))
        self._write("call", b, {
            "tier": tier, "tenant": tenant, "outcome": outcome, "tokens_in": tokens_in, "tokens_out": tokens_out,
            "cost": cost, "latency_s": latency_s, "items": items,
        })

    def retry(self, *, tier: str, reason: str) -> None:
        """A call is retried on the same tier."""
        b = _Batch()
        b.legacy[f"retries:{reason}"] = 1
        b.count("retries", {"tier": tier, "reason": reason})
        b.win("retries")
        self._write("retry", b, {"tier": tier, "reason": reason})

    def fallback(self, *, from_tier: str, to_tier: str | None, reason: str) -> None:
        """An item leaves a tier for the next one (``to_tier`` None: no tier left)."""
        b = _Batch()
        b.legacy[f"fallbacks:{reason}"] = 1
        b.count("fallbacks", {"from_tier": from_tier, "to_tier": to_tier or NO_TIER, "reason": reason})
        b.win("fallbacks")
        self._write("fallback", b, {"from_tier": from_tier, "to_tier": to_tier, "reason": reason})

    def circuit_changed(self, *, tier: str, state: str) -> None:
        """A tier's circuit changed state (``closed``, ``open``, ``half_open``)."""
        b = _Batch()
        b.count("circuit_transitions", {"tier": tier, "state": state})
        b.hsets.append((self._keys.circuit_transitions(), tier,
                        json.dumps({"state": state, "ts": float(self._clock())}, separators=(",", ":"))))
        self._write("circuit", b, {"tier": tier, "state": state})

    def batches_dispatched(self, batches: Sequence[DispatchedBatch]) -> None:
        """Batches left the grouper in one tick (one round trip)."""
        if not batches:
            return
        b = _Batch()
        for batch in batches:
            size = int(_num(batch.size))
            b.legacy["batches"] = b.legacy.get("batches", 0) + 1
            b.legacy["batched_items"] = b.legacy.get("batched_items", 0) + size
            b.count("batches", {"kind": batch.kind})
            b.count("batched_items", {"kind": batch.kind}, size)
            b.count("unembedded_items", None, int(_num(batch.unembedded)))
            b.observe("batch_size", size)
            b.win("batches")
            b.win("batched_items", size)
        self._write("batch", b, [{"size": x.size, "batch_kind": x.kind, "tenant": x.tenant} for x in batches])

    def grouping_tick(self, *, duration_s: float, claimed: int, dispatched: int, open_items: int) -> None:
        """One grouping tick ended; its duration is observed only when it claimed or dispatched work."""
        b = _Batch()
        b.legacy["ticks"] = 1
        b.count("grouping_ticks")
        b.gauges = {"open_items": str(int(_num(open_items))), "last_tick": repr(float(self._clock()))}
        busy = claimed != 0 or dispatched != 0
        if busy:
            b.observe("grouping_seconds", _num(duration_s))
        self._write("tick", b, None if not busy else {
            "duration_s": duration_s, "claimed": claimed, "dispatched": dispatched, "open_items": open_items})


# --- reading the windows back (alerts, dashboard, metrics) -----------------------------------
def read_counter(client: redis.Redis, keys: Keys, name: str, labels: Mapping[str, Any] | None = None) -> float:
    """The current value of one labelled counter (0 if never counted)."""
    raw = client.hget(keys.metric_counters(), counter_field(name, labels))
    return float(raw) if raw else 0.0


def window_totals(client: redis.Redis, keys: Keys, *, end: float, seconds: int) -> dict[str, float]:
    """Sum of the per-second telemetry windows of the ``seconds`` seconds ending at ``end``."""
    last = int(end)
    pipe = client.pipeline(transaction=False)
    for second in range(last - seconds + 1, last + 1):
        pipe.hgetall(keys.metric_window(second))
    totals: dict[str, float] = {}
    for row in pipe.execute():
        for k, v in row.items():
            name = _text(k)
            totals[name] = totals.get(name, 0.0) + float(v)
    return totals


def window_series(client: redis.Redis, keys: Keys, *, end: float, seconds: int,
                  fields: Sequence[str]) -> list[dict[str, float]]:
    """Per-second values of some window fields, oldest first (``ts`` added to each row)."""
    last = int(end)
    pipe = client.pipeline(transaction=False)
    seconds_list = list(range(last - seconds + 1, last + 1))
    for second in seconds_list:
        pipe.hmget(keys.metric_window(second), list(fields))
    rows = []
    for second, values in zip(seconds_list, pipe.execute(), strict=True):
        row = {"ts": float(second)}
        for name, value in zip(fields, values, strict=True):
            row[name] = float(value) if value is not None else 0.0
        rows.append(row)
    return rows


def latency_buckets(totals: Mapping[str, float]) -> list[float]:
    """Counts per ``LATENCY_BUCKETS`` bucket (last: +Inf) of the end-to-end latency in a window."""
    return [totals.get(f"e2e:{i}", 0.0) for i in range(len(LATENCY_BUCKETS) + 1)]


def estimate_quantile(counts: Sequence[float], bounds: Sequence[float], q: float) -> float | None:
    """A quantile from bucket counts, interpolating linearly inside the bucket (as Prometheus does).

    Values in the +Inf bucket are reported at the last finite bound. ``None`` without data.
    """
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    cumulative = 0.0
    for i, count in enumerate(counts):
        if cumulative + count >= rank and count > 0:
            if i >= len(bounds):
                return float(bounds[-1])
            lower = 0.0 if i == 0 else float(bounds[i - 1])
            upper = float(bounds[i])
            return lower + (upper - lower) * ((rank - cumulative) / count)
        cumulative += count
    return float(bounds[-1])
