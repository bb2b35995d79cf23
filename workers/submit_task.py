"""Celery-native submission: any Celery client submits a prompt by task name and reads the answer.

    r = app.send_task("cohort.submit", kwargs={"prompt": "...", "tenant": "acme"}, queue="inference")
    r.get(timeout=60)   # the answer record (dict), or raises the item's error

The task enqueues the prompt as an item whose id is the task's own id, then ends with ``Ignore``
so that Celery stores nothing under that id: the item's final result, written by the pipeline
under Celery's result key, is what ``AsyncResult(task_id)`` reads. A refused submission
(``InvalidPrompt``, ``UnknownTenant``) is stored as the item's final error, so ``get()`` raises it.

The keyword arguments are those of ``CohortClient.submit`` (``prompt``, ``tenant``, ``complexity``,
``max_tokens``, ``temperature``, ``params``, ``context``, ``system``, ``metadata``, ``deadline``,
``coalesce``, ``max_cost``); ``prompt`` may also be the one positional argument. The prompt travels
in the broker message by the caller's choice; this module logs ids and error codes only.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from functools import lru_cache
from typing import Any

from celery import Task
from celery.exceptions import Ignore

from producers.client import CohortClient
from producers.errors import InvalidPrompt, SubmitError
from workers.app import app
from workers.results import ResultWriter
from workers.settings import load_worker_settings

SUBMIT_TASK = "cohort.submit"
log = logging.getLogger("cohort.workers")
_TASK_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")


@lru_cache(maxsize=1)
def _client() -> CohortClient:
    """This process's producer client (built on first use, after the pool forks)."""
    return CohortClient(load_worker_settings().producer)


@app.task(name=SUBMIT_TASK, bind=True, ignore_result=True, typing=False)
def submit(self: Task, *args: Any, **fields: Any) -> None:
    """Enqueue one prompt under this task's id; never stores a result of its own (see module doc)."""
    item_id = self.request.id
    if not isinstance(item_id, str) or not _TASK_ID.match(item_id):
        log.warning("cohort.submit refused: the task id is not usable as an item id")
        raise Ignore()
    client = _client()
    writer = ResultWriter(client.redis, client.keys, ttl_s=client.settings.result_ttl_s)
    try:
        if len(args) > 1:
            raise InvalidPrompt("cohort.submit takes at most one positional argument (the prompt)", field="args")
        if args:
            if "prompt" in fields:
                raise InvalidPrompt("prompt given both positionally and by keyword", field="prompt")
            fields["prompt"] = args[0]
        # A redelivered message must not enqueue the item twice.
        if client.redis.exists(client.keys.item(item_id), client.keys.result(item_id)):
            log.info("cohort.submit: item %s already enqueued", item_id)
            raise Ignore()
        item = dataclasses.replace(client._build(fields, {}), id=item_id)
        client.enqueue([item])
    except SubmitError as exc:
        writer.fail(item_id, exc)
        log.info("cohort.submit: item %s refused (%s, field %s)", item_id, exc.code, exc.details.get("field"))
        raise Ignore() from None
    log.info("cohort.submit: item %s enqueued", item_id)
    raise Ignore()
