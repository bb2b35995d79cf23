"""Celery-native submission (``cohort.submit``), run eagerly against a real Redis (db 10)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import pytest

import workers.submit_task as submit_task
from producers.client import CohortClient
from producers.errors import InvalidPrompt
from producers.results import decode_final
from producers.schema import PromptItem
from producers.settings import ProducerSettings, RedisSettings
from tests.unit.test_api_app import connect_or_skip, redis_url


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> Iterator[CohortClient]:
    connection = connect_or_skip(redis_url())
    connection.flushdb()
    cohort = CohortClient(ProducerSettings(redis=RedisSettings(url=redis_url())), redis_client=connection)
    monkeypatch.setattr(submit_task, "_client", lambda: cohort)
    yield cohort
    connection.close()


def run(task_id: str, *args: object, **kwargs: object) -> str:
    return submit_task.submit.apply(args=args, kwargs=kwargs, task_id=task_id).state


def test_enqueues_the_item_under_the_task_id_and_stores_no_result(client: CohortClient,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    task_id = str(uuid.uuid4())
    state = run(task_id, prompt="secret question text", tenant="acme", complexity="simple", max_tokens=40,
                params={"model": "secondary"}, metadata={"ticket": 3})
    assert state == "IGNORED"
    item = PromptItem.from_json(client.redis.get(client.keys.item(task_id)))
    assert (item.id, item.prompt, item.tenant, item.complexity) == (task_id, "secret question text", "acme", "simple")
    assert (item.params.max_tokens, item.params.model, item.metadata) == (40, "secondary", {"ticket": 3})
    assert client.redis.get(client.keys.result(task_id)) is None
    assert client.tenant_of(task_id) == "acme"
    assert client.redis.xlen(client.keys.pending_stream()) == 1
    assert "secret question text" not in caplog.text


def test_positional_prompt_and_redelivery_enqueue_once(client: CohortClient) -> None:
    task_id = str(uuid.uuid4())
    assert run(task_id, "what is a batch?") == "IGNORED"
    assert run(task_id, "what is a batch?") == "IGNORED"
    assert client.redis.xlen(client.keys.pending_stream()) == 1
    assert client.status(task_id) == "queued"


@pytest.mark.parametrize(("args", "kwargs", "field"), [
    ((), {"prompt": ""}, "prompt"),
    ((), {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ((), {"prompt": "x", "colour": "red"}, "colour"),
    (("a", "b"), {}, "args"),
    (("a",), {"prompt": "b"}, "prompt"),
    ((), {"tenant": "acme"}, "prompt"),
])
def test_a_refused_submission_becomes_the_items_final_error(client: CohortClient, args: tuple[object, ...],
                                                            kwargs: dict[str, object], field: str) -> None:
    task_id = str(uuid.uuid4())
    assert run(task_id, *args, **kwargs) == "IGNORED"
    final = decode_final(client.redis.get(client.keys.result(task_id)))
    assert isinstance(final, InvalidPrompt) and final.details.get("field") == field
    assert client.redis.xlen(client.keys.pending_stream()) == 0


def test_a_task_id_unusable_as_an_item_id_is_ignored(client: CohortClient) -> None:
    assert run("bad:id/with:colons", prompt="x") == "IGNORED"
    assert client.redis.dbsize() == 0
