"""Liveness and readiness, for docker-compose healthchecks and Kubernetes probes.

- ``/healthz`` (liveness): the process answers. No Redis call, so a Redis outage never restarts the API.
- ``/readyz`` (readiness): Redis answers ``PING``; at least ``[api] min_workers`` workers have a
  heartbeat younger than ``heartbeat_max_age_s`` (workers write ``Keys.heartbeats()``, a sorted set
  node -> last beat, and ``Keys.heartbeat(node)``); and, if ``max_queue_depth`` is set, no more items
  than that wait. The body gives the counts either way; 503 when not ready. It names no node, tenant
  or item, so it can be public for probes.

Queue depth = items submitted and not yet claimed by the grouper (the consumer group's lag on the
pending stream, ``XLEN`` when no group exists yet) + items claimed and not delivered (its pending
entries) + the open pool + tasks waiting in the Celery queues (``LLEN`` of ``inference``, ``gpu``,
``grouper`` in the broker db).
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from producers.keys import GROUPER_CONSUMER_GROUP, Keys

BROKER_QUEUES = ("inference", "gpu", "grouper")


class HealthProbe:
    """Reads what readiness needs from Redis (blocking calls: run it in a thread)."""

    def __init__(self, client: redis.Redis, keys: Keys, *, heartbeat_max_age_s: float, min_workers: int,
                 max_queue_depth: int) -> None:
        self._redis = client
        self._keys = keys
        self._max_age = heartbeat_max_age_s
        self._min_workers = min_workers
        self._max_depth = max_queue_depth

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """``(ready, body)``; never raises on a Redis failure (it makes the service not ready)."""
        reasons: list[str] = []
        started = time.perf_counter()
        try:
            self._redis.ping()
        except redis.RedisError as exc:
            return False, {"status": "not_ready", "reasons": ["redis unreachable"],
                           "redis": {"ok": False, "error": type(exc).__name__}}
        body: dict[str, Any] = {"redis": {"ok": True, "ping_ms": round((time.perf_counter() - started) * 1000, 2)}}
        try:
            body["workers"] = self._workers()
            body["queue"] = self._queue_depth()
        except redis.RedisError as exc:
            return False, {"status": "not_ready", "reasons": ["redis error"],
                           "redis": {"ok": False, "error": type(exc).__name__}}
        if body["workers"]["alive"] < self._min_workers:
            reasons.append(f"{body['workers']['alive']} live worker(s), {self._min_workers} needed")
        if self._max_depth and body["queue"]["total"] > self._max_depth:
            reasons.append(f"{body['queue']['total']} items waiting, above {self._max_depth}")
        ready = not reasons
        return ready, {"status": "ready" if ready else "not_ready", "reasons": reasons, **body}

    def _workers(self) -> dict[str, Any]:
        now = time.time()
        nodes = [n.decode() if isinstance(n, bytes) else str(n)
                 for n in self._redis.zrangebyscore(self._keys.heartbeats(), now - self._max_age, "+inf")]
        queues: set[str] = set()
        if nodes:
            for raw in self._redis.mget([self._keys.heartbeat(n) for n in nodes]):
                queues.update(_queues_of(raw))
        return {"alive": len(nodes), "queues_served": sorted(queues), "max_age_s": self._max_age}

    def _queue_depth(self) -> dict[str, Any]:
        stream = self._keys.pending_stream()
        unclaimed, claimed = self._stream_depth(stream)
        pipe = self._redis.pipeline(transaction=False)
        pipe.zcard(self._keys.open_pool())
        for name in BROKER_QUEUES:
            pipe.llen(self._keys.broker_queue(name))
        open_pool, *lengths = pipe.execute()
        tasks = dict(zip(BROKER_QUEUES, (int(n) for n in lengths), strict=True))
        total = unclaimed + claimed + int(open_pool) + sum(tasks.values())
        return {"unclaimed": unclaimed, "claimed": claimed, "open_pool": int(open_pool), "tasks": tasks,
                "total": total}

    def _stream_depth(self, stream: str) -> tuple[int, int]:
        """(entries not yet read by the grouper, entries read and not acknowledged)."""
        try:
            groups = self._redis.xinfo_groups(stream)
        except redis.ResponseError:  # no stream yet
            return 0, 0
        for group in groups:
            name = group.get("name")
            if (name.decode() if isinstance(name, bytes) else name) == GROUPER_CONSUMER_GROUP:
                lag = group.get("lag")
                if lag is None:  # Redis cannot tell (entries deleted): fall back to the whole stream
                    lag = self._redis.xlen(stream)
                return int(lag), int(group.get("pending") or 0)
        return int(self._redis.xlen(stream)), 0


def _queues_of(raw: bytes | None) -> list[str]:
    if not raw:
        return []
    try:
        data = json.loads(raw)
    except ValueError:
        return []
    queues = data.get("queues") if isinstance(data, dict) else None
    return [q for q in queues.split(",") if q] if isinstance(queues, str) else []
