"""The message schema: what a producer submits and what a worker reads back.

An item is stored once in Redis as JSON (``PromptItem.to_json``) under its own key; task
arguments and stream entries carry only its id, never the prompt.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import unicodedata
import uuid
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, Literal

from producers.errors import InvalidPrompt

SCHEMA_VERSION = 1
Complexity = Literal["simple", "medium", "complex"]
COMPLEXITIES: tuple[str, ...] = ("simple", "medium", "complex")
MAX_METADATA_BYTES = 4096
MAX_TENANT_CHARS = 64


@dataclass(frozen=True)
class ModelParams:
    """Parameters of the model call; items with different params never share a batch."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float | None = None
    stop: tuple[str, ...] | None = None
    model: str | None = None  # a tier name to pin, or None for routing

    def partition_key(self) -> str:
        """A short stable digest of the params, used to partition pending items."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "stop": None if self.stop is None else list(self.stop), "model": self.model}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, *, max_tokens_limit: int = 32768) -> ModelParams:
        """Validate and build params; raises ``InvalidPrompt`` naming the bad field."""
        data = dict(data or {})
        unknown = set(data) - {"max_tokens", "temperature", "top_p", "stop", "model"}
        if unknown:
            raise InvalidPrompt(f"unknown model parameter(s): {sorted(unknown)}", field="params")
        max_tokens = data.get("max_tokens", 256)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            raise InvalidPrompt("max_tokens must be an integer", field="max_tokens")
        if max_tokens < 1 or max_tokens > max_tokens_limit:
            raise InvalidPrompt(
                f"max_tokens must be between 1 and {max_tokens_limit}, got {max_tokens}", field="max_tokens"
            )
        temperature = data.get("temperature", 0.0)
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not (
            math.isfinite(temperature) and 0.0 <= temperature <= 2.0
        ):
            raise InvalidPrompt("temperature must be a number between 0 and 2", field="temperature")
        top_p = data.get("top_p")
        if top_p is not None and (
            isinstance(top_p, bool) or not isinstance(top_p, int | float) or not (0.0 < top_p <= 1.0)
        ):
            raise InvalidPrompt("top_p must be a number in (0, 1]", field="top_p")
        stop = data.get("stop")
        if stop is not None:
            if isinstance(stop, str):
                stop = [stop]
            if not isinstance(stop, list | tuple) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
                raise InvalidPrompt("stop must be a string or a list of at most 4 strings", field="stop")
            stop = tuple(stop)
        model = data.get("model")
        if model is not None and (not isinstance(model, str) or not model.strip()):
            raise InvalidPrompt("model must be a non-empty string (a tier name)", field="model")
        return cls(
            max_tokens=max_tokens,
            temperature=float(temperature),
            top_p=None if top_p is None else float(top_p),
            stop=stop,
            model=model,
        )


@dataclass(frozen=True)
class PromptItem:
    """One submitted prompt, as stored in Redis."""

    id: str
    tenant: str
    prompt: str
    params: ModelParams = field(default_factory=ModelParams)
    complexity: Complexity | None = None
    context: str | None = None
    system: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    submitted_at: float = 0.0
    deadline: float | None = None  # absolute epoch seconds
    coalesce: bool = True
    max_cost: float | None = None
    version: int = SCHEMA_VERSION

    @cached_property
    def partition(self) -> str:
        """Items share a batch (and an answer) only within one partition: same tenant, params and system."""
        partition = f"{self.tenant}/{self.params.partition_key()}"
        if self.system is not None:
            partition += "/" + hashlib.sha1(self.system.encode()).hexdigest()[:12]
        return partition

    def to_json(self) -> str:
        data = asdict(self)
        data["params"] = self.params.to_dict()
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: str | bytes) -> PromptItem:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidPrompt(f"stored item is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidPrompt("stored item is not a JSON object")
        if data.get("version") != SCHEMA_VERSION:
            raise InvalidPrompt(f"stored item has unsupported schema version {data.get('version')!r}")
        fields = set(cls.__dataclass_fields__)
        if set(data) - fields or not {"id", "tenant", "prompt"} <= set(data):
            raise InvalidPrompt("stored item has missing or unknown fields")
        params = data.get("params")
        if params is not None and not isinstance(params, dict):
            raise InvalidPrompt("stored item params must be an object")
        data["params"] = ModelParams.from_dict(params)
        item = cls(**data)
        if not (isinstance(item.id, str) and isinstance(item.tenant, str) and isinstance(item.prompt, str)
                and item.prompt.strip() and isinstance(item.metadata, dict)
                and isinstance(item.submitted_at, int | float) and not isinstance(item.submitted_at, bool)):
            raise InvalidPrompt("stored item has fields of the wrong type")
        return item


def new_item_id() -> str:
    """A fresh item id; it is also the Celery task id of the item's result."""
    return str(uuid.uuid4())


def normalize_text(text: str) -> str:
    """Canonical form for exact-duplicate detection: NFC, casefold, single spaces, no trailing punctuation."""
    text = unicodedata.normalize("NFC", text).casefold()
    text = " ".join(text.split())
    return text.rstrip(" .!?;:,。！？")


def build_item(
    prompt: Any,
    *,
    tenant: Any = "default",
    params: dict[str, Any] | ModelParams | None = None,
    complexity: Any = None,
    context: Any = None,
    system: Any = None,
    metadata: Any = None,
    deadline: Any = None,
    coalesce: Any = True,
    max_cost: Any = None,
    max_prompt_chars: int = 32000,
    max_tokens_limit: int = 32768,
    item_id: str | None = None,
    now: float | None = None,
) -> PromptItem:
    """Validate a submission and build its item. Raises ``InvalidPrompt`` naming the problem.

    Args:
        prompt: the prompt text (``str``; ``bytes`` must be valid UTF-8).
        tenant: tenant name; items of different tenants never share a batch, answer or cache entry.
        params: model parameters (``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``model``).
        complexity: ``simple``, ``medium``, ``complex`` or ``None`` (Cohort estimates it).
        context: shared context (a document) the prompt asks about; items sharing it are packed.
        system: an optional system message.
        metadata: a small JSON-serializable dict returned with the result.
        deadline: seconds from now (``float``) after which the item fails rather than waits.
        coalesce: ``False`` to never share an answer with another item.
        max_cost: the most this item may cost, in the tiers' currency.
    """
    now = time.time() if now is None else now
    text = _text_field(prompt, "prompt", max_prompt_chars, required=True)
    assert text is not None
    if not isinstance(tenant, str) or not tenant.strip() or len(tenant) > MAX_TENANT_CHARS:
        raise InvalidPrompt(f"tenant must be a non-empty string of at most {MAX_TENANT_CHARS} characters",
                            field="tenant")
    if any(c in tenant for c in "/:{} \t\n"):
        raise InvalidPrompt("tenant may not contain '/', ':', braces or whitespace", field="tenant")
    if isinstance(params, ModelParams):
        model_params = params
    elif params is None or isinstance(params, dict):
        model_params = ModelParams.from_dict(params, max_tokens_limit=max_tokens_limit)
    else:
        raise InvalidPrompt("params must be a dict", field="params")
    if complexity is not None and complexity not in COMPLEXITIES:
        raise InvalidPrompt(f"complexity must be one of {COMPLEXITIES} or null, got {complexity!r}",
                            field="complexity")
    context_text = _text_field(context, "context", max_prompt_chars, required=False)
    system_text = _text_field(system, "system", max_prompt_chars, required=False)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise InvalidPrompt("metadata must be a JSON object", field="metadata")
    try:
        encoded = json.dumps(metadata)
    except (TypeError, ValueError):
        raise InvalidPrompt("metadata must be JSON-serializable", field="metadata") from None
    if len(encoded) > MAX_METADATA_BYTES:
        raise InvalidPrompt(f"metadata must be at most {MAX_METADATA_BYTES} bytes of JSON", field="metadata")
    absolute_deadline = None
    if deadline is not None:
        if isinstance(deadline, bool) or not isinstance(deadline, int | float) or not (
            math.isfinite(deadline) and 0 < deadline <= 7 * 86400
        ):
            raise InvalidPrompt("deadline must be a number of seconds between 0 and 7 days", field="deadline")
        absolute_deadline = now + float(deadline)
    if not isinstance(coalesce, bool):
        raise InvalidPrompt("coalesce must be a boolean", field="coalesce")
    if max_cost is not None and (
        isinstance(max_cost, bool) or not isinstance(max_cost, int | float) or not (
            math.isfinite(max_cost) and max_cost > 0
        )
    ):
        raise InvalidPrompt("max_cost must be a positive number", field="max_cost")
    return PromptItem(
        id=item_id or new_item_id(),
        tenant=tenant,
        prompt=text,
        params=model_params,
        complexity=complexity,
        context=context_text,
        system=system_text,
        metadata=metadata,
        submitted_at=now,
        deadline=absolute_deadline,
        coalesce=coalesce,
        max_cost=None if max_cost is None else float(max_cost),
    )


def _text_field(value: Any, name: str, max_chars: int, *, required: bool) -> str | None:
    if value is None:
        if required:
            raise InvalidPrompt(f"{name} is required", field=name)
        return None
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidPrompt(f"{name} is not valid UTF-8 (byte {exc.start})", field=name) from None
    if not isinstance(value, str):
        raise InvalidPrompt(f"{name} must be a string, got {type(value).__name__}", field=name)
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise InvalidPrompt(f"{name} contains unpaired surrogates (invalid UTF-8)", field=name)
    if "\x00" in value:
        raise InvalidPrompt(f"{name} contains a NUL character", field=name)
    if not value.strip():
        if required:
            raise InvalidPrompt(f"{name} is empty or whitespace only", field=name)
        return None
    if len(value) > max_chars:
        raise InvalidPrompt(f"{name} has {len(value)} characters, above the maximum of {max_chars}", field=name)
    return value
