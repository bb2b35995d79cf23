"""Waiting for results without blocking the event loop.

One background thread polls Redis for the results every waiting request needs (one ``MGET`` per
period for all of them) and resolves their asyncio futures; the thread sleeps while nobody waits.
Reading Celery's result keys directly keeps the API independent of how results are written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterable

import redis

from producers.errors import CohortError
from producers.keys import Keys
from producers.results import PromptResult, decode_final

logger = logging.getLogger("cohort.api")

Outcome = PromptResult | CohortError
MGET_CHUNK = 1000


class ResultWatcher:
    """Resolves futures when items get their final result."""

    def __init__(self, client: redis.Redis, keys: Keys, *, poll_interval_s: float = 0.01) -> None:
        self._redis = client
        self._keys = keys
        self._interval = poll_interval_s
        self._lock = threading.Lock()
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future[Outcome]]]] = {}
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    async def wait(self, item_ids: Iterable[str], timeout: float) -> dict[str, Outcome]:
        """Wait until every item has a final result or ``timeout`` passes; returns those that have one."""
        ids = list(dict.fromkeys(item_ids))
        if not ids:
            return {}
        loop = asyncio.get_running_loop()
        futures: dict[str, asyncio.Future[Outcome]] = {i: loop.create_future() for i in ids}
        self._register(loop, futures)
        try:
            await asyncio.wait(futures.values(), timeout=max(0.0, timeout))
        finally:
            self._unregister(futures)
        return {i: f.result() for i, f in futures.items() if f.done() and not f.cancelled()}

    def close(self) -> None:
        """Stop the polling thread; a later ``wait`` starts a new one."""
        with self._lock:
            self._stopped.set()
            self._thread = None
        self._wake.set()

    def _register(self, loop: asyncio.AbstractEventLoop, futures: dict[str, asyncio.Future[Outcome]]) -> None:
        with self._lock:
            for item_id, future in futures.items():
                self._waiters.setdefault(item_id, []).append((loop, future))
            if self._thread is None or not self._thread.is_alive():
                # Each thread has its own stop flag, so one stopping never blocks its successor.
                self._stopped = threading.Event()
                self._thread = threading.Thread(target=self._run, args=(self._stopped,),
                                                name="cohort-api-results", daemon=True)
                self._thread.start()
        self._wake.set()

    def _unregister(self, futures: dict[str, asyncio.Future[Outcome]]) -> None:
        with self._lock:
            for item_id, future in futures.items():
                entries = [e for e in self._waiters.get(item_id, []) if e[1] is not future]
                if entries:
                    self._waiters[item_id] = entries
                else:
                    self._waiters.pop(item_id, None)

    def _run(self, stopped: threading.Event) -> None:
        while not stopped.is_set():
            with self._lock:
                ids = list(self._waiters)
                if not ids:
                    self._wake.clear()
            if not ids:
                self._wake.wait()
                continue
            try:
                self._poll(ids)
            except redis.RedisError as exc:
                logger.warning("result polling failed: %s", type(exc).__name__)
                stopped.wait(0.5)
                continue
            stopped.wait(self._interval)

    def _poll(self, ids: list[str]) -> None:
        for start in range(0, len(ids), MGET_CHUNK):
            chunk = ids[start:start + MGET_CHUNK]
            raws = self._redis.mget([self._keys.result(i) for i in chunk])
            for item_id, raw in zip(chunk, raws, strict=True):
                if raw is None:
                    continue
                try:
                    outcome = decode_final(raw)
                except (ValueError, TypeError, KeyError):
                    logger.warning("unreadable result of item %s", item_id)
                    continue
                if outcome is not None:
                    self._resolve(item_id, outcome)

    def _resolve(self, item_id: str, outcome: Outcome) -> None:
        with self._lock:
            entries = self._waiters.pop(item_id, [])
        for loop, future in entries:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
                loop.call_soon_threadsafe(_set_result, future, outcome)


def _set_result(future: asyncio.Future[Outcome], outcome: Outcome) -> None:
    if not future.done():
        future.set_result(outcome)
