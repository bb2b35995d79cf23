"""Reading final results: the Celery result-backend format Cohort writes for every item.

A final result is stored where Celery's Redis backend keeps task results, so any Celery client
reads it with ``AsyncResult(item_id).get()``. On success ``result`` is the answer record
(see ``PromptResult``); on failure it is Celery's exception form with Cohort's class name, the
message and ``details``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from producers.errors import ERRORS_BY_CODE, CohortError, ItemFailed

SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
FINAL_STATES = (SUCCESS, FAILURE)


@dataclass(frozen=True)
class PromptResult:
    """The answer to one item."""

    id: str
    text: str
    tier: str | None
    model: str | None
    tokens_in: int
    tokens_out: int
    cost: float
    coalesced: bool = False
    """Answered by another item's call (an exact or strict near-duplicate)."""
    cached: bool = False
    """Served from an earlier answer without an upstream call."""
    packed: bool = False
    """Answered inside a call that carried several questions."""
    batch_id: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromptResult:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def encode_success(item_id: str, answer: dict[str, Any], date_done: str) -> str:
    """The Celery meta JSON of a successful item."""
    return json.dumps({"status": SUCCESS, "result": answer, "traceback": None, "children": [],
                       "date_done": date_done, "task_id": item_id}, separators=(",", ":"), ensure_ascii=False)


def encode_failure(item_id: str, error: CohortError, date_done: str) -> str:
    """The Celery meta JSON of a failed item; ``AsyncResult.get()`` re-raises the Cohort error."""
    payload = {
        "exc_type": type(error).__name__,
        "exc_module": "producers.errors",
        "exc_message": [error.message],
        "code": error.code,
        "details": error.to_dict(),
    }
    return json.dumps({"status": FAILURE, "result": payload, "traceback": None, "children": [],
                       "date_done": date_done, "task_id": item_id}, separators=(",", ":"), ensure_ascii=False)


def decode_final(raw: bytes | str | None) -> PromptResult | CohortError | None:
    """Decode a stored meta; ``None`` while the item has no final result."""
    if raw is None:
        return None
    meta = json.loads(raw)
    status = meta.get("status")
    if status == SUCCESS:
        return PromptResult.from_dict(meta["result"])
    if status == FAILURE:
        payload = meta.get("result") or {}
        details = dict(payload.get("details") or {})
        code = payload.get("code") or details.get("code") or "item_failed"
        message = details.pop("message", None) or " ".join(map(str, payload.get("exc_message") or []))
        details.pop("code", None)
        cls = ERRORS_BY_CODE.get(code, ItemFailed)
        error = cls(message or code, **details)
        return error
    return None
