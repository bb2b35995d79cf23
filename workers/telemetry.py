"""Recording what happens, for metrics, alerts and the savings report.

Every role records through one ``Telemetry`` object. Figures are kept in Redis (running
counters and histogram buckets, plus a bounded event stream), so that they are correct under
Celery's prefork pool and across hosts: the metrics endpoint reads them back.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from producers.keys import Keys

EVENTS_MAXLEN = 200_000


class Telemetry:
    """Writes counters and events to Redis. Never raises: telemetry must not fail a batch."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._redis = client
        self._keys = keys

    def _emit(self, kind: str, counters: dict[str, float], event: dict[str, Any] | None) -> None:
        try:
            pipe = self._redis.pipeline(transaction=False)
            for name, value in counters.items():
                pipe.hincrbyfloat(self._keys.counters(), name, value)
            if event is not None:
                payload = json.dumps({"kind": kind, "ts": time.time(), **event}, separators=(",", ":"))
                pipe.xadd(self._keys.events(), {"e": payload}, maxlen=EVENTS_MAXLEN, approximate=True)
            pipe.execute()
        except redis.RedisError:
            pass

    def item_finished(self, *, tenant: str, tier: str | None, outcome: str, cost: float, tokens_in: int,
                      tokens_out: int, queue_wait_s: float, model_call_s: float, end_to_end_s: float,
                      coalesced: bool = False, cached: bool = False, error_code: str | None = None) -> None:
        """One item reached its final result (``outcome``: ``answered`` or ``failed``)."""
        self._emit("item", {
            f"items:{outcome}": 1,
            "items:coalesced": int(coalesced),
            "items:cached": int(cached),
        }, {
            "tenant": tenant, "tier": tier, "outcome": outcome, "cost": cost, "tokens_in": tokens_in,
            "tokens_out": tokens_out, "queue_wait_s": queue_wait_s, "model_call_s": model_call_s,
            "end_to_end_s": end_to_end_s, "coalesced": coalesced, "cached": cached, "error_code": error_code,
        })

    def upstream_call(self, *, tier: str, tenant: str, outcome: str, tokens_in: int, tokens_out: int,
                      cost: float, latency_s: float, items: int) -> None:
        """One HTTP call to a tier ended (``outcome``: ``ok`` or an error code)."""
        self._emit("call", {
            "calls": 1, f"calls:{outcome}": 1, "tokens_in": tokens_in, "tokens_out": tokens_out, "cost": cost,
        }, {
            "tier": tier, "tenant": tenant, "outcome": outcome, "tokens_in": tokens_in, "tokens_out": tokens_out,
            "cost": cost, "latency_s": latency_s, "items": items,
        })

    def retry(self, *, tier: str, reason: str) -> None:
        self._emit("retry", {f"retries:{reason}": 1}, {"tier": tier, "reason": reason})

    def fallback(self, *, from_tier: str, to_tier: str | None, reason: str) -> None:
        self._emit("fallback", {f"fallbacks:{reason}": 1},
                   {"from_tier": from_tier, "to_tier": to_tier, "reason": reason})

    def circuit_changed(self, *, tier: str, state: str) -> None:
        self._emit("circuit", {}, {"tier": tier, "state": state})

    def batch_dispatched(self, *, size: int, kind: str, tenant: str) -> None:
        """A batch left the grouper (``kind``: ``cluster``, ``packed``...)."""
        self._emit("batch", {"batches": 1, "batched_items": size},
                   {"size": size, "batch_kind": kind, "tenant": tenant})

    def grouping_tick(self, *, duration_s: float, claimed: int, dispatched: int, open_items: int) -> None:
        self._emit("tick", {"ticks": 1}, None if claimed == 0 and dispatched == 0 else {
            "duration_s": duration_s, "claimed": claimed, "dispatched": dispatched, "open_items": open_items})
