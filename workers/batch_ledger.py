"""The grouper's ledger of batches: recorded before their task is sent, watched until they end.

A batch is a Redis hash (its item ids, kind, tenant, dispatch count) plus an entry in the
inflight set whose score is the time of its next check: shortly after it is recorded (was its
task really sent?), at once when a delivery ended without completing it, and
``lost_batch_after_s`` after its last dispatch (did the broker lose the task?). The inference
worker that completes a batch removes both.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import redis

from producers.errors import CohortError, RedeliveryLimit
from producers.keys import Keys
from workers.delivery import Finisher
from workers.settings import WorkerSettings

Dispatch = Callable[[str, int], None]
"""Sends the task of a recorded batch: ``dispatch(batch_id, item_count)``."""

MARK_SENT = """
-- KEYS: batch record, inflight set. ARGV: sent at, next check, batch id.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end  -- completed and forgotten meanwhile
redis.call('HINCRBY', KEYS[1], 'dispatches', 1)
local ended = tonumber(redis.call('HGET', KEYS[1], 'ended_at') or '0') or 0
if ended >= tonumber(ARGV[1]) then  -- a delivery of this task already ended incomplete
  redis.call('HSET', KEYS[1], 'dispatched_at', ARGV[1])
  return 1
end
redis.call('HSET', KEYS[1], 'dispatched_at', ARGV[1], 'ended_at', 0)
redis.call('ZADD', KEYS[2], 'XX', ARGV[2], ARGV[3])
return 1
"""

SWEEP_LIMIT = 100
"""Most batches looked at per sweep."""


class BatchLedger:
    """Records batches, sends their tasks, and sends again those that need it."""

    def __init__(self, settings: WorkerSettings, client: redis.Redis, *, dispatch: Dispatch, finisher: Finisher,
                 clock: Callable[[], float]) -> None:
        self._delivery = settings.delivery
        self._ttl_s = settings.producer.result_ttl_s
        self._keys: Keys = settings.producer.redis.keys
        self._redis = client
        self._dispatch = dispatch
        self._finisher = finisher
        self._clock = clock
        self._mark_sent_script = client.register_script(MARK_SENT)

    def record(self, pipe: redis.client.Pipeline, batch_id: str, item_ids: list[str], *, kind: str,
               tenant: str, now: float) -> None:
        """Add a new batch's record to ``pipe`` (the caller's transaction)."""
        record = {"items": json.dumps(item_ids), "kind": kind, "tenant": tenant, "created": now,
                  "dispatched_at": 0, "dispatches": 0}
        pipe.hset(self._keys.batch(batch_id), mapping=record)
        pipe.expire(self._keys.batch(batch_id), self._ttl_s)
        pipe.zadd(self._keys.inflight(), {batch_id: now + self._delivery.redispatch_after_s})

    def send(self, batches: list[tuple[str, int]]) -> None:
        """Send the tasks of recorded batches (``(batch id, item count)``), then note them sent;
        those sent before a failure are noted all the same."""
        sent: list[tuple[str, float]] = []
        try:
            for batch_id, size in batches:
                sent_at = self._clock()
                self._dispatch(batch_id, size)
                sent.append((batch_id, sent_at))
        finally:
            self._mark_sent(sent)

    def _mark_sent(self, sent: list[tuple[str, float]]) -> None:
        """Note batches' tasks sent (``(batch id, time just before sending)``): their next check is
        then only for a broker that lost them. A batch already completed and forgotten is left
        alone, and so is the early check of a delivery that already ended incomplete."""
        if not sent:
            return
        pipe = self._redis.pipeline(transaction=False)
        for batch_id, sent_at in sent:
            self._mark_sent_script(keys=[self._keys.batch(batch_id), self._keys.inflight()],
                                   args=[sent_at, sent_at + self._delivery.lost_batch_after_s, batch_id], client=pipe)
        pipe.execute()

    def sweep(self) -> None:
        """Send again the batches whose next check is due; fail those dispatched too often."""
        now = self._clock()
        for raw_id in self._redis.zrangebyscore(self._keys.inflight(), "-inf", now, start=0, num=SWEEP_LIMIT):
            batch_id = raw_id.decode()
            record = self._redis.hgetall(self._keys.batch(batch_id))
            if not record:
                self._redis.zrem(self._keys.inflight(), batch_id)
                continue
            dispatches = int(record.get(b"dispatches", 0) or 0)
            if dispatches > self._delivery.max_redeliveries:
                self._fail(batch_id, json.loads(record[b"items"]), RedeliveryLimit(
                    f"batch was dispatched {dispatches} times without completing", dispatches=dispatches))
                continue
            self.send([(batch_id, len(json.loads(record[b"items"])))])

    def _fail(self, batch_id: str, item_ids: list[str], error: CohortError) -> None:
        self._finisher.fail_ids(item_ids, error)
        pipe = self._redis.pipeline(transaction=False)
        pipe.zrem(self._keys.inflight(), batch_id)
        pipe.delete(self._keys.batch(batch_id))
        pipe.execute()
