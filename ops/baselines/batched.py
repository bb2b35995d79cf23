"""Baseline 2: celery-batches with fixed-size batches, each batch packed into one upstream call.

``celery -A ops.baselines.batched worker -Q baseline -P threads -c 16``. The producer sends one
``baseline.answer_batch(prompt)`` message per prompt; the worker buffers them and flushes every
``flush_every`` messages (Cohort's ``max_batch_size``) or every ``flush_interval`` seconds
(Cohort's ``max_wait_s``), whichever comes first. A flushed batch is sent as one call in Cohort's
packed format (``workers.packing``); answers missing from the reply are asked again one by one.
Each prompt's result is written under its own task id with ``backend.mark_as_done``.

``worker_prefetch_multiplier=0`` (no prefetch limit): with the default limit (4 x concurrency
messages) a worker never holds a full batch when concurrency is low, and every batch waits for
the flush interval.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from celery import Celery
from celery.signals import worker_init
from celery_batches import Batches, SimpleRequest

from ops.baselines.per_prompt import celery_config
from ops.baselines.settings import load_baseline_settings
from ops.baselines.upstream import UpstreamError, upstream
from workers.packing import PACKED_SYSTEM, packed_user_content, parse_packed_answers

QUEUE = "baseline"
TASK = "baseline.answer_batch"
PACKED_ANSWER_OVERHEAD_TOKENS = 24
"""Output tokens allowed per packed answer on top of ``max_tokens`` (its JSON wrapping), as Cohort does."""

app = Celery("baseline-batched", set_as_current=False)


@app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    settings = load_baseline_settings()
    sender.conf.update({**celery_config(settings.redis_url, settings.result_ttl_s),
                        "worker_prefetch_multiplier": 0})


@app.task(name=TASK, base=Batches, flush_every=16, flush_interval=0.5, acks_late=False)
def answer_batch(requests: Sequence[SimpleRequest]) -> int:
    """Answer a flushed buffer: one packed call per ``flush_every`` prompts."""
    size = max(1, answer_batch.flush_every)
    for start in range(0, len(requests), size):
        _answer_chunk(list(requests[start:start + size]))
    return len(requests)


@worker_init.connect
def _batch_limits(**_: Any) -> None:
    """Flush size and interval from the Cohort config (the task reads them per message)."""
    settings = load_baseline_settings()
    answer_batch.flush_every = settings.batch_size
    answer_batch.flush_interval = settings.flush_interval_s


def _prompt(request: SimpleRequest) -> str:
    return str(request.args[0] if request.args else request.kwargs["prompt"])


def _answer_chunk(requests: list[SimpleRequest]) -> None:
    settings = load_baseline_settings()
    client = upstream()
    backend = app.backend
    prompts = [_prompt(r) for r in requests]
    answers: dict[int, str] = {}
    share = {"tokens_in": 0.0, "tokens_out": 0.0, "cost": 0.0}
    packed = len(requests) > 1
    if packed:
        messages = [{"role": "system", "content": PACKED_SYSTEM},
                    {"role": "user", "content": packed_user_content(prompts, None)}]
        max_tokens = min(settings.max_tokens_limit,
                         len(prompts) * (settings.max_tokens + PACKED_ANSWER_OVERHEAD_TOKENS))
        try:
            reply = client.complete(messages, max_tokens=max_tokens, json_mode=True)
        except UpstreamError:
            reply = None
        if reply is not None:
            answers = parse_packed_answers(reply.text, len(prompts)).answers
            n = len(prompts)
            share = {"tokens_in": reply.tokens_in / n, "tokens_out": reply.tokens_out / n, "cost": reply.cost / n}
    for number, request in enumerate(requests, start=1):
        if number in answers:
            backend.mark_as_done(request.id, _record(answers[number], share, packed=True, calls=1 / len(requests)),
                                 request=request)
            continue
        # Missing from the packed reply (or a batch of one): ask this prompt alone.
        try:
            alone = client.complete([{"role": "user", "content": prompts[number - 1]}],
                                    max_tokens=settings.max_tokens)
        except UpstreamError as exc:
            backend.mark_as_failure(request.id, exc, request=request)
            continue
        extra = {"tokens_in": share["tokens_in"] + alone.tokens_in,
                 "tokens_out": share["tokens_out"] + alone.tokens_out, "cost": share["cost"] + alone.cost}
        backend.mark_as_done(request.id, _record(alone.text, extra, packed=False, calls=1), request=request)


def _record(text: str, usage: dict[str, float], *, packed: bool, calls: float) -> dict[str, Any]:
    return {"text": text, "model": load_baseline_settings().tier.model, "tokens_in": usage["tokens_in"],
            "tokens_out": usage["tokens_out"], "cost": usage["cost"], "packed": packed, "calls": calls,
            "finished_at": time.time()}
