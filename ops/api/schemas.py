"""Request and response bodies of Cohort's native endpoints (``/v1/prompts...``), for validation and
the OpenAPI document. Unknown fields are refused, and values are not coerced (``"5"`` is not 5)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ITEM_ID_PATTERN = r"^[A-Za-z0-9-]{1,64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PromptParams(_Strict):
    """Model parameters; items with different params never share a call."""

    max_tokens: int | None = Field(default=None, description="Most output tokens (default 256).")
    temperature: float | None = Field(default=None, description="Sampling temperature, 0 to 2 (default 0).")
    top_p: float | None = None
    stop: str | list[str] | None = Field(default=None, description="A stop string or at most 4 of them.")
    model: str | None = Field(default=None, description="A tier name to pin; absent to let Cohort route.")


class PromptOptions(_Strict):
    """What may be set per prompt (or, on a many-prompt request, as defaults for each)."""

    complexity: Literal["simple", "medium", "complex"] | None = Field(
        None, description="Skip Cohort's estimate and route as this complexity.")
    max_tokens: int | None = Field(default=None, description="Shortcut for params.max_tokens.")
    temperature: float | None = Field(default=None, description="Shortcut for params.temperature.")
    params: PromptParams | None = None
    context: str | None = Field(default=None, description="A shared document the prompt asks about.")
    system: str | None = Field(default=None, description="A system message.")
    metadata: dict[str, Any] | None = Field(default=None, description="Small JSON object returned with the result.")
    deadline: float | None = Field(default=None, description="Seconds from now after which the item fails.")
    coalesce: bool | None = Field(default=None, description="false to never share an answer with another item.")
    max_cost: float | None = Field(default=None, description="Most this item may cost.")


class PromptEntry(PromptOptions):
    """One prompt of a many-prompt request."""

    prompt: str


class SubmitRequest(PromptOptions):
    """Either ``prompt`` (one) or ``prompts`` (many: strings or objects; the other fields are defaults)."""

    prompt: str | None = Field(default=None, description="The prompt, for a one-prompt request.")
    prompts: list[str | PromptEntry] | None = Field(default=None, description="The prompts of a many-prompt request.")


class SubmitResponse(BaseModel):
    id: str | None = Field(default=None, description="The id of the prompt (one-prompt requests).")
    ids: list[str] = Field(..., description="The ids, in request order.")


class ErrorInfo(BaseModel):
    """A final error of an item."""

    model_config = ConfigDict(extra="allow")

    code: str
    message: str


class PromptStatus(BaseModel):
    id: str
    status: Literal["queued", "grouped", "running", "answered", "failed", "not_found"] | str
    result: dict[str, Any] | None = Field(default=None, description="The answer record, once answered.")
    error: ErrorInfo | None = Field(default=None, description="The final error, once failed.")


class BatchStatusRequest(_Strict):
    ids: list[str] = Field(..., min_length=1, description="Prompt ids (at most [api] max_items_per_request).")
    wait: float = Field(default=0.0, ge=0, allow_inf_nan=False,
                        description="Seconds to wait for every prompt to finish (cut to [api] max_wait_s).")


class BatchStatusResponse(BaseModel):
    data: list[PromptStatus]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """Every error answer, in OpenAI's shape."""

    error: ErrorDetail
