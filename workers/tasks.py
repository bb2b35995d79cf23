"""Celery tasks of the grouper and the inference workers.

Task arguments carry ids and counts only, never prompt text or keys (they are visible in
Flower and in broker messages): ``cohort.group(reason)`` and ``cohort.run_batch(batch_id, items)``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from functools import lru_cache
from typing import Any

import redis
from celery.signals import worker_ready, worker_shutting_down

from producers.errors import ConfigError, GrouperLockLost
from workers.app import GROUPER_QUEUE, INFERENCE_QUEUE, app
from workers.settings import load_worker_settings
from workers.telemetry import Telemetry

log = logging.getLogger("cohort.workers")
HEARTBEAT_PERIOD_S = 5.0
HEARTBEAT_TTL_S = 20


@lru_cache(maxsize=1)
def _redis() -> redis.Redis:
    return redis.Redis.from_url(load_worker_settings().producer.redis.url)


@lru_cache(maxsize=1)
def _telemetry() -> Telemetry:
    return Telemetry(_redis(), load_worker_settings().producer.redis.keys)


@lru_cache(maxsize=1)
def grouper() -> Any:
    """The grouper of this process (built on first tick: it loads the encoder)."""
    from workers.encoder import CachedEncoder, Encoder
    from workers.grouper import Grouper

    settings = load_worker_settings()
    encoder = CachedEncoder(Encoder.for_grouping(settings.grouping), _redis(),
                            settings.producer.redis.keys)
    return Grouper(settings, _redis(), encoder=encoder, dispatch=dispatch_batch, telemetry=_telemetry())


@lru_cache(maxsize=1)
def runner() -> Any:
    """The batch runner of this process, with its own HTTP client (built after fork)."""
    from workers.inference import BatchRunner
    from workers.tiers.router import TierRouter

    settings = load_worker_settings()
    if settings.routing is None:
        raise ConfigError("the config has no [[tiers]]: inference workers need at least one tier", key="tiers")
    router = TierRouter(settings.routing, settings.budgets, _redis(), settings.producer.redis.keys,
                        telemetry=_telemetry())
    return BatchRunner(settings, _redis(), router, telemetry=_telemetry())


def dispatch_batch(batch_id: str, size: int) -> None:
    run_batch.apply_async(args=[batch_id], kwargs={"items": size}, queue=INFERENCE_QUEUE)


@app.task(name="cohort.group", ignore_result=True, acks_late=False, queue=GROUPER_QUEUE)
def group(reason: str = "beat") -> dict[str, Any]:
    """One grouping tick (beat every ``interval_s``; at once when a producer fills a partition)."""
    try:
        report = grouper().tick()
    except GrouperLockLost as exc:
        log.warning("grouping tick stopped: %s", exc)
        return {"ran": False}
    interval = load_worker_settings().grouping.interval_s
    if report.next_due_s is not None and report.next_due_s < interval:
        # The oldest open item falls due before the next beat: run a tick exactly then.
        settings = load_worker_settings()
        if _redis().set(settings.producer.redis.keys.due_trigger(), "1", nx=True,
                        px=max(1, int(report.next_due_s * 1000))):
            group.apply_async(kwargs={"reason": "due"}, countdown=report.next_due_s, expires=interval * 4)
    if report.batches:
        log.info("grouping tick: claimed=%d coalesced=%d batches=%d items=%d open=%d in %.1f ms (%s)",
                 report.claimed, report.coalesced, report.batches, report.dispatched_items,
                 report.open_items, report.duration_s * 1000, reason)
    return {"ran": report.ran, "claimed": report.claimed, "batches": report.batches}


@app.task(name="cohort.run_batch", bind=True, ignore_result=True, queue=INFERENCE_QUEUE)
def run_batch(self: Any, batch_id: str, items: int = 0) -> dict[str, Any]:
    """Answer one batch (``items`` is informational, for Flower).

    Provider failures end items inside the batch; what escapes is infrastructure (Redis away):
    the batch is retried with backoff, and the grouper's sweep resends it if even that fails.
    """
    max_retries = load_worker_settings().delivery.max_redeliveries
    try:
        report = runner().run(batch_id)
    except redis.RedisError as exc:
        retries = self.request.retries
        if retries < max_retries:
            log.warning("batch %s: Redis error (%s), retry %d", batch_id, type(exc).__name__, retries + 1)
            raise self.retry(exc=exc, countdown=min(30, 2 ** retries), max_retries=max_retries) from None
        _report_incomplete(batch_id)
        raise
    except Exception:
        _report_incomplete(batch_id)
        raise
    if report.busy_for_s is not None:
        raise self.retry(countdown=report.busy_for_s, max_retries=max_retries + 1)
    log.info("batch %s: items=%d answered=%d failed=%d calls=%d skipped=%d", batch_id, report.items,
             report.answered, report.failed, report.calls, report.skipped)
    return {"answered": report.answered, "failed": report.failed, "calls": report.calls}


def _report_incomplete(batch_id: str) -> None:
    with contextlib.suppress(redis.RedisError):  # else the sweep finds it after ``lost_batch_after_s``
        runner().ended_incomplete(batch_id)


# --- worker heartbeat (read by health checks) -----------------------------------------------
_stop_heartbeat = threading.Event()


@worker_ready.connect
def _start_heartbeat(sender: Any = None, **_: Any) -> None:
    node = getattr(sender, "hostname", None) or f"worker@{socket.gethostname()}"
    task_consumer = getattr(sender, "task_consumer", None)  # the sender is the worker's Consumer
    queues = sorted(q.name for q in getattr(task_consumer, "queues", []))
    if GROUPER_QUEUE in queues:
        # Load the encoder before announcing the worker alive: the first tick must not stall on it.
        grouper().warm_up()
    _stop_heartbeat.clear()
    threading.Thread(target=_beat, args=(node, ",".join(queues)), name="cohort-heartbeat", daemon=True).start()


@worker_shutting_down.connect
def _stop(**_: Any) -> None:
    _stop_heartbeat.set()


def _beat(node: str, queues: str) -> None:
    keys = load_worker_settings().producer.redis.keys
    client = redis.Redis.from_url(load_worker_settings().producer.redis.url)
    while not _stop_heartbeat.is_set():
        try:
            now = time.time()
            pipe = client.pipeline(transaction=False)
            pipe.set(keys.heartbeat(node), f'{{"node":"{node}","queues":"{queues}","ts":{now}}}', ex=HEARTBEAT_TTL_S)
            pipe.zadd(keys.heartbeats(), {node: now})
            pipe.execute()
        except redis.RedisError:
            pass
        _stop_heartbeat.wait(HEARTBEAT_PERIOD_S)
