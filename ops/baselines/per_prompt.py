"""Baseline 1: one Celery task per prompt, one upstream call each (what a team writes first).

``celery -A ops.baselines.per_prompt worker -Q baseline -P threads -c 16``. The producer sends
``baseline.answer(prompt)``; the task's return value (answer, usage, cost, finish time) is the
Celery result, stored by the result backend under the task id.
"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery

from ops.baselines.settings import load_baseline_settings
from ops.baselines.upstream import UpstreamError, upstream

QUEUE = "baseline"
TASK = "baseline.answer"

app = Celery("baseline-per-prompt", set_as_current=False)


def celery_config(redis_url: str, result_ttl_s: int) -> dict[str, Any]:
    """A plain Celery setup: JSON, Redis broker and backend, Celery's defaults otherwise."""
    return {
        "broker_url": redis_url,
        "result_backend": redis_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "result_expires": result_ttl_s,
        # One backend shared by the pool's threads (what Cohort's workers use too).
        "result_backend_thread_safe": True,
        "broker_connection_retry_on_startup": True,
        "task_default_queue": QUEUE,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
    }


@app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    settings = load_baseline_settings()
    sender.conf.update(celery_config(settings.redis_url, settings.result_ttl_s))


@app.task(name=TASK, bind=True, max_retries=2, acks_late=False)
def answer(self: Any, prompt: str) -> dict[str, Any]:
    """Answer one prompt with one call; 429/5xx and transport errors are retried twice."""
    settings = load_baseline_settings()
    try:
        reply = upstream().complete([{"role": "user", "content": prompt}], max_tokens=settings.max_tokens)
    except UpstreamError as exc:
        if exc.retryable:
            raise self.retry(exc=exc, countdown=0.5 * (self.request.retries + 1)) from None
        raise
    return {"text": reply.text, "model": reply.model, "tokens_in": reply.tokens_in,
            "tokens_out": reply.tokens_out, "cost": reply.cost, "packed": False, "calls": 1,
            "finished_at": time.time()}
