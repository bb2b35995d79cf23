"""The inference batch: answer a batch's items through the tier router, one final result each.

A batch holds up to ``max_batch_size`` items of one partition (one tenant, one set of model
parameters). Its task carries only the batch id; items are read from Redis. The batch:

1. skips items that already have a final result (a redelivery never pays twice for them);
2. fails items whose deadline has passed;
3. answers identical prompts once (fanned out inside the batch);
4. sends the distinct questions in one packed call (the shared context once, numbered
   questions, JSON answers), or one plain call when there is a single question or the items
   carry their own ``max_cost``; answers missing from a packed reply are asked again one by one;
5. writes each item's result, shares it with coalesced followers, and forgets the batch.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import redis

from producers.errors import CohortError, ContextTooLong, DeadlineExceeded, ItemFailed, RedeliveryLimit
from producers.keys import Keys
from producers.schema import COMPLEXITIES, PromptItem
from workers.delivery import Finisher
from workers.locks import RELEASE_IF_OWNER
from workers.packing import (
    PACKED_SYSTEM,
    packed_user_content,
    packing_saves,
    parse_packed_answers,
    single_user_content,
    split_shared_prefix,
)
from workers.sameness import exact_digest
from workers.settings import WorkerSettings
from workers.telemetry import Telemetry
from workers.tiers.complexity import estimate_complexity
from workers.tiers.router import CallRequest, Completion, TierRouter

PACKED_ANSWER_OVERHEAD_TOKENS = 24
MAX_PARALLEL_CALLS = 8


@dataclass
class Question:
    """One distinct question of a batch and the items that asked it."""

    text: str
    items: list[PromptItem]

    @property
    def leader(self) -> PromptItem:
        return self.items[0]


@dataclass(frozen=True)
class BatchReport:
    batch_id: str
    items: int
    answered: int
    failed: int
    calls: int
    skipped: int
    busy_for_s: float | None = None
    """Set when the batch was locked by another delivery: seconds until the lock frees."""


class BatchRunner:
    """Runs inference batches in one worker process."""

    def __init__(self, settings: WorkerSettings, client: redis.Redis, router: TierRouter, *,
                 telemetry: Telemetry, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.keys: Keys = settings.producer.redis.keys
        self._redis = client
        self._router = router
        self._finisher = Finisher(settings, client, telemetry=telemetry)
        self._clock = clock
        self._price_ratio = settings.output_price_ratio
        self._release = client.register_script(RELEASE_IF_OWNER)

    def run(self, batch_id: str) -> BatchReport:
        """Run one delivery of a batch; a delivery that finds the batch running elsewhere does nothing."""
        token = uuid.uuid4().hex
        lock = self.keys.batch_lock(batch_id)
        if not self._redis.set(lock, token, nx=True, px=self.settings.delivery.task_time_limit_s * 1000):
            # Another delivery runs it, or a killed one still holds the lock: look again when it frees.
            remaining_ms = self._redis.pttl(lock)
            return BatchReport(batch_id, 0, 0, 0, 0, 0, busy_for_s=max(0.1, remaining_ms / 1000))
        try:
            return self._run(batch_id)
        finally:
            self._release(keys=[lock], args=[token])

    def ended_incomplete(self, batch_id: str) -> None:
        """A delivery ended without completing the batch: let the grouper's sweep send it again now."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.hset(self.keys.batch(batch_id), "ended_at", self._clock())
        pipe.zadd(self.keys.inflight(), {batch_id: self._clock()}, xx=True)
        pipe.execute()

    def _run(self, batch_id: str) -> BatchReport:
        record = self._redis.hgetall(self.keys.batch(batch_id))
        if not record:
            return BatchReport(batch_id, 0, 0, 0, 0, 0)
        item_ids: list[str] = json.loads(record[b"items"])
        deliveries = self._redis.hincrby(self.keys.batch(batch_id), "deliveries", 1)
        if deliveries > self.settings.delivery.max_redeliveries + 1:
            pending = [i for i in item_ids if i not in self._finisher.writer.finals(item_ids)]
            self._finisher.fail_ids(pending, RedeliveryLimit(
                f"batch was delivered {deliveries} times without completing", deliveries=deliveries))
            self._forget(batch_id)
            return BatchReport(batch_id, len(item_ids), 0, len(pending), 0, len(item_ids) - len(pending))

        finals = self._finisher.writer.finals(item_ids)
        todo = [i for i in item_ids if i not in finals]
        items = self._load(todo)
        started = self._clock()
        live: list[PromptItem] = []
        failed = 0
        for item in items:
            if item.deadline is not None and item.deadline <= started:
                self._finisher.failed(item, DeadlineExceeded(
                    "deadline passed before the item's batch ran",
                    waited_s=round(started - item.submitted_at, 3)))
                failed += 1
            else:
                live.append(item)
        pipe = self._redis.pipeline(transaction=False)
        for item in live:
            pipe.hset(self.keys.item_status(item.id), "status", "running")
        pipe.execute()

        outcome = self._answer(live, batch_id=batch_id, kind=record.get(b"kind", b"cluster").decode(),
                               started=started)
        self._forget(batch_id)
        return BatchReport(batch_id, len(item_ids), outcome[0], failed + outcome[1], outcome[2], len(finals))

    def _load(self, item_ids: list[str]) -> list[PromptItem]:
        if not item_ids:
            return []
        items: list[PromptItem] = []
        raws = self._redis.mget([self.keys.item(i) for i in item_ids])
        for item_id, raw in zip(item_ids, raws, strict=True):
            if raw is None:
                self._finisher.writer.fail(item_id, ItemFailed(
                    "the item's body expired from Redis before it was answered", item_id=item_id))
                continue
            try:
                items.append(PromptItem.from_json(raw))
            except CohortError as exc:
                self._finisher.writer.fail(item_id, exc)
        return items

    def _forget(self, batch_id: str) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.zrem(self.keys.inflight(), batch_id)
        pipe.delete(self.keys.batch(batch_id))
        pipe.execute()

    # --- calls ---------------------------------------------------------------------------
    def _answer(self, items: list[PromptItem], *, batch_id: str, kind: str, started: float
                ) -> tuple[int, int, int]:
        if not items:
            return 0, 0, 0
        context, questions = self._questions(items, packed_kind=(kind == "packed"))
        packable = [q for q in questions if q.leader.max_cost is None]
        alone = [q for q in questions if q.leader.max_cost is not None]
        calls = 0
        results: dict[int, tuple[Completion | CohortError, bool, int]] = {}
        system = packable[0].leader.system if packable else None
        if packing_saves([q.text for q in packable], context, system, output_price_ratio=self._price_ratio):
            calls += 1
            packed_outcome = self._call_packed(packable, context)
            if isinstance(packed_outcome, ContextTooLong):
                alone += packable  # too much for one call on any tier: ask one by one
            elif isinstance(packed_outcome, CohortError):
                for q in packable:
                    results[id(q)] = (packed_outcome, True, len(packable))
            else:
                completion, answers = packed_outcome
                for number, q in enumerate(packable, start=1):
                    if number in answers:
                        results[id(q)] = (_with_text(completion, answers[number]), True, len(packable))
                    else:
                        alone.append(q)
        else:
            alone = packable + alone
        if alone:
            calls += len(alone)
            with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_CALLS, len(alone))) as pool:
                singles = list(pool.map(lambda q: self._call_single(q, context), alone))
            for q, outcome in zip(alone, singles, strict=True):
                results[id(q)] = (outcome, False, 1)
        answered = failed = 0
        for q in questions:
            outcome, packed, shares = results[id(q)]
            if isinstance(outcome, CohortError):
                for item in q.items:
                    self._finisher.failed(item, outcome)
                    failed += 1
                continue
            for position, item in enumerate(q.items):
                answer = self._answer_record(item, outcome, batch_id=batch_id, started=started, packed=packed,
                                             shares=shares, duplicate=position > 0)
                self._finisher.answered(item, answer)
                answered += 1
        return answered, failed, calls

    def _questions(self, items: list[PromptItem], *, packed_kind: bool) -> tuple[str | None, list[Question]]:
        """Distinct questions of the batch, and the context they share (if any)."""
        context = items[0].context if all(i.context == items[0].context for i in items) else None
        texts = {item.id: item.prompt for item in items}
        if packed_kind and context is None:
            shared, rests = split_shared_prefix([item.prompt for item in items])
            if shared is not None:
                context = shared
                texts = {item.id: rest for item, rest in zip(items, rests, strict=True)}
        by_digest: dict[str, Question] = {}
        ordered: list[Question] = []
        for item in items:
            key = exact_digest(texts[item.id]) if item.coalesce else f"own:{item.id}"
            key += "|" + (item.system or "")
            if key in by_digest:
                by_digest[key].items.append(item)
                continue
            question = Question(texts[item.id], [item])
            by_digest[key] = question
            ordered.append(question)
        if context is None and any(item.context for item in items):
            # Mixed contexts (not expected within one batch): keep each item's own context inline.
            for q in ordered:
                if q.leader.context:
                    q.text = single_user_content(q.text, q.leader.context)
        return context, ordered

    def _request(self, messages: list[dict[str, str]], items: list[PromptItem], *, json_mode: bool,
                 max_tokens: int, call_id: str) -> CallRequest:
        first = items[0]
        deadlines = [i.deadline for i in items if i.deadline is not None]
        costs = [i.max_cost for i in items if i.max_cost is not None]
        return CallRequest(
            messages=messages, max_tokens=max_tokens, temperature=first.params.temperature,
            top_p=first.params.top_p, stop=first.params.stop, tenant=first.tenant,
            complexity=_strongest(items), max_cost=min(costs) if costs else None,
            pinned_tier=first.params.model, json_mode=json_mode, deadline=min(deadlines) if deadlines else None,
            items=len(items), call_id=call_id,
        )

    def _call_single(self, question: Question, context: str | None) -> Completion | CohortError:
        leader = question.leader
        messages = []
        if leader.system:
            messages.append({"role": "system", "content": leader.system})
        messages.append({"role": "user", "content": single_user_content(question.text, context)})
        try:
            return self._router.complete(self._request(messages, question.items, json_mode=False,
                                                       max_tokens=leader.params.max_tokens,
                                                       call_id=f"single:{leader.id}"))
        except CohortError as exc:
            return exc

    def _call_packed(self, questions: list[Question], context: str | None
                     ) -> tuple[Completion, dict[int, str]] | CohortError:
        system = PACKED_SYSTEM
        if questions[0].leader.system:
            system = questions[0].leader.system + "\n\n" + PACKED_SYSTEM
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": packed_user_content([q.text for q in questions], context)}]
        per_item = questions[0].leader.params.max_tokens
        max_tokens = min(self.settings.producer.max_tokens_limit,
                         len(questions) * (per_item + PACKED_ANSWER_OVERHEAD_TOKENS))
        items = [item for q in questions for item in q.items]
        try:
            completion = self._router.complete(self._request(messages, items, json_mode=True, max_tokens=max_tokens,
                                                             call_id=f"packed:{items[0].id}:{len(items)}"))
        except CohortError as exc:
            return exc
        parsed = parse_packed_answers(completion.text, len(questions))
        return completion, parsed.answers

    # --- results -------------------------------------------------------------------------
    def _answer_record(self, item: PromptItem, completion: Completion, *, batch_id: str, started: float,
                       packed: bool, shares: int, duplicate: bool) -> dict[str, Any]:
        now = self._clock()
        share = 0.0 if duplicate else 1.0 / max(1, shares)
        return {
            "id": item.id,
            "text": completion.text,
            "tier": completion.tier,
            "model": completion.model,
            "tokens_in": round(completion.tokens_in * share),
            "tokens_out": round(completion.tokens_out * share),
            "cost": completion.cost * share,
            "coalesced": duplicate,
            "cached": False,
            "packed": packed,
            "batch_id": batch_id,
            "attempts": len(completion.attempts),
            "metadata": item.metadata,
            "timings": {
                "queue_wait_s": max(0.0, started - item.submitted_at),
                "model_call_s": completion.latency_s,
                "end_to_end_s": max(0.0, now - item.submitted_at),
            },
        }


def _with_text(completion: Completion, text: str) -> Completion:
    return replace(completion, text=text)


def _strongest(items: Iterable[PromptItem]) -> str:
    """The strongest complexity among a call's items: each item's hint, or else its own estimate.

    Estimating each question alone (not the packed prompt, whose length and numbering would read
    as a harder task) keeps routing the same whether or not an item was packed.
    """
    ranked = [COMPLEXITIES.index(item.complexity or estimate_complexity([{"role": "user", "content": item.prompt}]))
              for item in items]
    return COMPLEXITIES[max(ranked)]
