"""The producer client: submit prompts, get ids, wait for results.

    client = CohortClient.from_env()
    handle = client.submit("How do I reset my card PIN?", tenant="acme", complexity="simple")
    result = handle.result(timeout=30)          # PromptResult, or raises the item's CohortError

Items are written to Redis (body + a stream entry holding only the id); the grouping beat task
claims them from the stream through a consumer group, so a grouper crash loses nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from producers.errors import CohortError, InvalidPrompt, ResultTimeout, UnknownTenant
from producers.results import PromptResult, decode_final
from producers.schema import PromptItem, build_item
from producers.settings import ProducerSettings, load_producer_settings

GROUP_TASK = "cohort.group"
GROUPER_QUEUE = "grouper"
STREAM_MAXLEN = 10_000_000


@dataclass(frozen=True)
class PromptHandle:
    """What ``submit`` returns: the item id (also its Celery task id) and a way to wait for it."""

    id: str
    tenant: str
    client: CohortClient

    def result(self, timeout: float | None = 60.0) -> PromptResult:
        """Wait for the answer; raises the item's ``CohortError`` or ``ResultTimeout``."""
        return self.client.result(self.id, timeout=timeout)

    def status(self) -> str:
        return self.client.status(self.id)


class CohortClient:
    """Submit prompts to Cohort and read their results. Thread-safe; one per process is enough."""

    def __init__(self, settings: ProducerSettings, *, redis_client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.keys = settings.redis.keys
        self.redis = redis_client or redis.Redis.from_url(settings.redis.url)
        self._celery: Any = None

    @classmethod
    def from_env(cls, config_path: str | None = None) -> CohortClient:
        """A client configured from ``COHORT_CONFIG`` / ``COHORT_REDIS_URL``."""
        return cls(load_producer_settings(config_path))

    def close(self) -> None:
        self.redis.close()

    # --- submit --------------------------------------------------------------------------
    def submit(self, prompt: str, *, tenant: str = "default", complexity: str | None = None,
               max_tokens: int | None = None, temperature: float | None = None,
               params: Mapping[str, Any] | None = None, context: str | None = None,
               system: str | None = None, metadata: Mapping[str, Any] | None = None,
               deadline: float | None = None, coalesce: bool = True,
               max_cost: float | None = None) -> PromptHandle:
        """Submit one prompt. Raises ``InvalidPrompt`` / ``UnknownTenant`` before anything is enqueued.

        Args:
            prompt: the question or instruction.
            tenant: who submits it; tenants never share batches, answers or cache entries.
            complexity: ``simple``, ``medium``, ``complex``, or ``None`` to let Cohort estimate it.
            max_tokens: most output tokens (shortcut for ``params["max_tokens"]``).
            temperature: sampling temperature (shortcut for ``params["temperature"]``).
            params: model parameters (``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``model``).
            context: a shared document the prompt asks about (items sharing it are packed in one call).
            system: an optional system message.
            metadata: small JSON object returned with the result.
            deadline: seconds from now after which the item fails instead of waiting longer.
            coalesce: ``False`` to never share an answer with another item.
            max_cost: most this item may cost.

        Returns:
            A ``PromptHandle`` whose ``id`` is also a Celery task id.
        """
        entry = {"prompt": prompt, "tenant": tenant, "complexity": complexity, "context": context,
                 "system": system, "metadata": metadata, "deadline": deadline, "coalesce": coalesce,
                 "max_cost": max_cost, "params": _merge_params(params, max_tokens, temperature)}
        return self.submit_many([entry])[0]

    def submit_many(self, prompts: Iterable[str | Mapping[str, Any]], **common: Any) -> list[PromptHandle]:
        """Submit many prompts in one round trip; all are validated before any is enqueued.

        Each entry is a prompt string or a mapping with the keyword arguments of ``submit``;
        ``common`` gives defaults for every entry (e.g. ``tenant="acme"``).
        """
        items = [self._build(entry, common) for entry in prompts]
        self.enqueue(items)
        return [PromptHandle(id=item.id, tenant=item.tenant, client=self) for item in items]

    def _build(self, entry: str | Mapping[str, Any], common: Mapping[str, Any]) -> PromptItem:
        fields: dict[str, Any] = dict(common)
        if isinstance(entry, str | bytes):
            fields["prompt"] = entry
        elif isinstance(entry, Mapping):
            fields.update(entry)
        else:
            raise InvalidPrompt(f"each prompt must be a string or an object, got {type(entry).__name__}")
        unknown = set(fields) - _SUBMIT_FIELDS
        if unknown:
            raise InvalidPrompt(f"unknown field(s): {sorted(unknown)}", field=sorted(unknown)[0])
        params = _merge_params(fields.pop("params", None), fields.pop("max_tokens", None),
                               fields.pop("temperature", None))
        tenant = fields.pop("tenant", "default")
        if self.settings.tenants is not None and isinstance(tenant, str) and tenant not in self.settings.tenants:
            raise UnknownTenant(f"unknown tenant {tenant!r}", field="tenant")
        if "prompt" not in fields:
            raise InvalidPrompt("prompt is required", field="prompt")
        if fields.get("coalesce", True) is True and isinstance(tenant, str):
            fields["coalesce"] = self.settings.tenant_policy(tenant).coalesce
        item = build_item(
            fields.pop("prompt"), tenant=tenant, params=params,
            max_prompt_chars=self.settings.max_prompt_chars,
            max_tokens_limit=self.settings.max_tokens_limit, **fields,
        )
        pinned = item.params.model
        if pinned is not None and self.settings.tier_names and pinned not in self.settings.tier_names:
            raise InvalidPrompt(f"unknown tier {pinned!r} in params.model; configured tiers: "
                                f"{', '.join(sorted(self.settings.tier_names))}", field="model")
        return item

    def enqueue(self, items: Sequence[PromptItem]) -> None:
        """Write validated items to Redis: body, status, stream entry (id only)."""
        if not items:
            return
        ttl = self.settings.result_ttl_s
        pipe = self.redis.pipeline(transaction=False)
        for item in items:
            pipe.set(self.keys.item(item.id), item.to_json(), ex=ttl)
            pipe.hset(self.keys.item_status(item.id), mapping={"status": "queued", "tenant": item.tenant})
            pipe.expire(self.keys.item_status(item.id), ttl)
        for item in items:
            pipe.xadd(self.keys.pending_stream(), {"id": item.id}, maxlen=STREAM_MAXLEN, approximate=True)
        partitions: dict[str, int] = {}
        for item in items:
            partitions[item.partition] = partitions.get(item.partition, 0) + 1
        for partition, count in partitions.items():
            pipe.incrby(self.keys.partition_count(partition), count)
            pipe.expire(self.keys.partition_count(partition), 3600)
        replies = pipe.execute()
        counts = replies[len(replies) - 2 * len(partitions)::2]
        if any(int(c) >= self.settings.max_batch_size for c in counts):
            self._request_flush()

    def _request_flush(self) -> None:
        """A partition holds a full batch: ask for a grouping tick now rather than at the next beat."""
        if self.redis.set(self.keys.flush_trigger(), "1", nx=True, px=100):
            self._celery_app().send_task(GROUP_TASK, kwargs={"reason": "partition_full"}, queue=GROUPER_QUEUE,
                                         expires=5)

    def _celery_app(self) -> Any:
        if self._celery is None:
            from celery import Celery

            app = Celery("cohort-producer", set_as_current=False)
            app.conf.update(broker_url=self.settings.redis.url, result_backend=self.settings.redis.url,
                            task_serializer="json", accept_content=["json"], result_serializer="json",
                            broker_connection_retry_on_startup=True)
            self._celery = app
        return self._celery

    # --- results -------------------------------------------------------------------------
    def result(self, item_id: str, *, timeout: float | None = 60.0) -> PromptResult:
        """Wait for one item; returns its ``PromptResult`` or raises its final ``CohortError``."""
        outcome = self.wait([item_id], timeout=timeout)[0]
        if isinstance(outcome, CohortError):
            raise outcome
        return outcome

    def wait(self, item_ids: Sequence[str], *, timeout: float | None = 60.0,
             raise_on_timeout: bool = True) -> list[PromptResult | CohortError]:
        """Wait for many items; failures are returned in place, not raised.

        Raises ``ResultTimeout`` (naming how many are still pending) when the timeout passes,
        unless ``raise_on_timeout=False``, in which case pending items are returned as
        ``ResultTimeout`` errors.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        outcomes: dict[str, PromptResult | CohortError] = {}
        pending = list(dict.fromkeys(item_ids))
        pause = 0.005
        while pending:
            for start in range(0, len(pending), 1000):
                chunk = pending[start:start + 1000]
                for item_id, raw in zip(chunk, self.redis.mget([self.keys.result(i) for i in chunk]), strict=True):
                    decoded = decode_final(raw)
                    if decoded is not None:
                        outcomes[item_id] = decoded
            pending = [i for i in pending if i not in outcomes]
            if not pending:
                break
            if deadline is not None and time.monotonic() >= deadline:
                if raise_on_timeout:
                    raise ResultTimeout(f"{len(pending)} of {len(set(item_ids))} item(s) still pending after "
                                        f"{timeout} s", pending=len(pending))
                for item_id in pending:
                    outcomes[item_id] = ResultTimeout(f"item {item_id} still pending after {timeout} s")
                break
            time.sleep(pause if deadline is None else min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 1.5, 0.1)
        return [outcomes[i] for i in item_ids]

    def get(self, item_id: str) -> PromptResult | CohortError | None:
        """The final result of an item, or ``None`` if it has none yet (no waiting)."""
        return decode_final(self.redis.get(self.keys.result(item_id)))

    def status(self, item_id: str) -> str:
        """``queued``, ``grouped``, ``running``, ``answered``, ``failed`` or ``unknown``."""
        final = self.get(item_id)
        if isinstance(final, PromptResult):
            return "answered"
        if isinstance(final, CohortError):
            return "failed"
        status = self.redis.hget(self.keys.item_status(item_id), "status")
        return status.decode() if status else "unknown"

    def tenant_of(self, item_id: str) -> str | None:
        """The tenant that submitted an item (``None`` if unknown), for access checks."""
        tenant = self.redis.hget(self.keys.item_status(item_id), "tenant")
        return tenant.decode() if tenant else None


_SUBMIT_FIELDS = {"prompt", "tenant", "complexity", "max_tokens", "temperature", "params", "context",
                  "system", "metadata", "deadline", "coalesce", "max_cost"}


def _merge_params(params: Mapping[str, Any] | None, max_tokens: Any, temperature: Any) -> dict[str, Any]:
    if params is not None and not isinstance(params, Mapping):
        raise InvalidPrompt("params must be an object", field="params")
    merged = dict(params or {})
    if max_tokens is not None:
        merged["max_tokens"] = max_tokens
    if temperature is not None:
        merged["temperature"] = temperature
    return merged
