"""Ending items: one final result each, shared with coalesced followers, recorded once.

Every path that ends an item (answered by a call, served from a coalesced answer, failed by a
provider, a budget, a deadline or too many redeliveries) goes through ``Finisher``, so that:
the result is written at most once; followers of a leader get the leader's answer (or are
submitted again if the leader failed); telemetry counts each item exactly once.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

import redis

from producers.errors import CohortError, RedeliveryLimit
from producers.keys import Keys
from producers.schema import PromptItem
from workers.coalescing import CoalescingStore, coalescing_scope
from workers.packing import single_user_content
from workers.pending import requeue
from workers.results import ResultWriter
from workers.settings import WorkerSettings
from workers.telemetry import Telemetry
from workers.tiers.tokens import CHARS_PER_TOKEN, PER_MESSAGE_TOKENS, REPLY_PRIMER_TOKENS


@dataclass(frozen=True)
class Baseline:
    """What one call per prompt on the primary tier would have cost for an item."""

    tokens_in: int
    tokens_out: int
    cost: float


def baseline_for(item: PromptItem, answer_text: str, prices: tuple[float, float]) -> Baseline:
    """The item sent alone to the primary tier: its own prompt (and context) in, this answer out."""
    messages = [single_user_content(item.prompt, item.context)]
    if item.system:
        messages.append(item.system)
    tokens_in = sum(math.ceil(len(m) / CHARS_PER_TOKEN) + PER_MESSAGE_TOKENS for m in messages) + REPLY_PRIMER_TOKENS
    tokens_out = math.ceil(len(answer_text) / CHARS_PER_TOKEN)
    return Baseline(tokens_in, tokens_out, (tokens_in * prices[0] + tokens_out * prices[1]) / 1000)


class Finisher:
    """Writes final results and fans them out to followers.

    The coalescing markers an item leads are kept in its status hash (``leads``), so whichever
    path ends the item, and whichever process it runs in, resolves them: followers of an answered
    leader get its answer (and, if they lead markers themselves, pass it on); followers of a
    failed leader are submitted again.
    """

    def __init__(self, settings: WorkerSettings, client: redis.Redis, *, telemetry: Telemetry) -> None:
        self.settings = settings
        self.keys: Keys = settings.producer.redis.keys
        self._redis = client
        self.writer = ResultWriter(client, self.keys, ttl_s=settings.producer.result_ttl_s)
        self.coalescing = CoalescingStore(client, self.keys, inflight_ttl_s=settings.producer.result_ttl_s)
        self._telemetry = telemetry

    # --- leads (recorded by ``CoalescingStore.attach`` when an item takes the lead) ----------
    def _leads_of(self, item_id: str) -> list[list[str]]:
        raw = self._redis.hget(self.keys.item_status(item_id), "leads")
        return json.loads(raw) if raw else []

    def _keep_s(self, kind: str, tenant: str) -> int:
        if kind == "exact":
            return self.settings.grouping.coalesce_window_s
        return int(self.settings.producer.tenant_policy(tenant).cache_ttl_s)

    # --- ending items ----------------------------------------------------------------------
    def answered(self, item: PromptItem, answer: dict[str, Any]) -> None:
        """Store an item's answer, then answer every follower waiting on it."""
        if self.writer.answer(item.id, answer):
            self._record(item, answer)
        self._fan_out(item, _shared(answer))

    def served(self, item: PromptItem, shared: dict[str, Any]) -> None:
        """Answer an item from a stored answer (coalescing window or semantic cache)."""
        self._answer_shared(item, shared, cached=True)
        self._fan_out(item, shared)

    def _fan_out(self, leader: PromptItem, shared: dict[str, Any]) -> None:
        pending = [leader]
        while pending:
            item = pending.pop()
            for kind, digest in self._leads_of(item.id):
                followers = self.coalescing.complete(
                    partition=coalescing_scope(item), kind=kind, digest=digest, leader=item.id, answer=shared,
                    keep_s=self._keep_s(kind, item.tenant))
                for follower in self._load(followers):
                    self._answer_shared(follower, shared, cached=False)
                    pending.append(follower)

    def _answer_shared(self, item: PromptItem, shared: dict[str, Any], *, cached: bool) -> None:
        waited = time.time() - item.submitted_at
        answer = dict(shared, id=item.id, coalesced=True, cached=cached, tokens_in=0, tokens_out=0, cost=0.0,
                      metadata=item.metadata,
                      timings={"queue_wait_s": waited, "model_call_s": 0.0, "end_to_end_s": waited})
        if self.writer.answer(item.id, answer):
            self._record(item, answer)

    def failed(self, item: PromptItem, error: CohortError) -> None:
        """Store an item's final error; its followers are submitted again, not failed with it."""
        if self.writer.fail(item.id, error):
            waited = time.time() - item.submitted_at
            self._telemetry.item_finished(tenant=item.tenant, tier=None, outcome="failed", cost=0.0, tokens_in=0,
                                          tokens_out=0, queue_wait_s=waited, model_call_s=0.0,
                                          end_to_end_s=waited, error_code=error.code)
        for kind, digest in self._leads_of(item.id):
            followers = self.coalescing.complete(partition=coalescing_scope(item), kind=kind, digest=digest,
                                                 leader=item.id, answer=None, keep_s=0)
            if not followers:
                continue
            over = requeue(self._redis, self.keys, followers, partition=item.partition,
                           max_requeues=self.settings.delivery.max_redeliveries)
            # A follower may lead requests of its own: ending it through ``failed`` resolves them too.
            loaded = {f.id: f for f in self._load(list(over))}
            for follower_id, times in over.items():
                error = RedeliveryLimit(f"item was submitted again {times} times (its leader failed); giving up",
                                        requeues=times)
                follower = loaded.get(follower_id)
                if follower is None:
                    self.writer.fail(follower_id, error)
                else:
                    self.failed(follower, error)

    def fail_ids(self, item_ids: list[str], error: CohortError) -> None:
        """Fail items known by id only (their bodies are loaded when still present)."""
        loaded = {item.id: item for item in self._load(item_ids)}
        for item_id in item_ids:
            item = loaded.get(item_id)
            if item is None:
                self.writer.fail(item_id, error)
            else:
                self.failed(item, error)

    def _record(self, item: PromptItem, answer: dict[str, Any]) -> None:
        timings = answer.get("timings") or {}
        prices = self.settings.primary_prices
        baseline = baseline_for(item, str(answer.get("text", "")), prices) if prices else None
        self._telemetry.item_finished(
            tenant=item.tenant, tier=answer.get("tier"), outcome="answered", cost=float(answer.get("cost", 0.0)),
            tokens_in=int(answer.get("tokens_in", 0)), tokens_out=int(answer.get("tokens_out", 0)),
            queue_wait_s=float(timings.get("queue_wait_s", 0.0)),
            model_call_s=float(timings.get("model_call_s", 0.0)),
            end_to_end_s=float(timings.get("end_to_end_s", 0.0)), coalesced=bool(answer.get("coalesced")),
            cached=bool(answer.get("cached")), packed=bool(answer.get("packed")),
            baseline_tokens_in=baseline.tokens_in if baseline else None,
            baseline_tokens_out=baseline.tokens_out if baseline else None,
            baseline_cost=baseline.cost if baseline else None)

    def _load(self, item_ids: list[str]) -> list[PromptItem]:
        if not item_ids:
            return []
        items = []
        for raw in self._redis.mget([self.keys.item(i) for i in item_ids]):
            if raw is not None:
                try:
                    items.append(PromptItem.from_json(raw))
                except CohortError:
                    continue
        return items


def _shared(answer: dict[str, Any]) -> dict[str, Any]:
    """The part of an answer that followers share (not the leader's id, metadata or timings)."""
    return {k: v for k, v in answer.items() if k not in ("id", "metadata", "timings")}
