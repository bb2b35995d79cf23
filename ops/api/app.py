"""Cohort's HTTP front door: native prompt endpoints, an OpenAI-compatible chat endpoint, probes.

    POST /v1/prompts               submit one or many prompts; answers 202 with their ids at once
    GET  /v1/prompts/{id}?wait=S   status and result (long-poll up to S seconds)
    POST /v1/prompts/status        status and results of many ids ({"ids": [...], "wait": S})
    POST /v1/chat/completions      OpenAI-compatible (see ``openai_compat``), streaming simulated
    GET  /v1/models                the tiers, plus "cohort" (route normally)
    GET  /healthz, /readyz         liveness, readiness (see ``health``)
    GET  /openapi.json, /docs      the OpenAPI document

Every request but the probes and the docs (when public) needs an API key (see ``auth``), and every
authenticated request takes from the tenant's rate limit (see ``ratelimit``). A prompt is visible
only to the tenant that submitted it: any other tenant gets 404, as for an unknown id. Errors share
one JSON shape (see ``errors``). Blocking Redis calls run in a bounded thread pool; waiting for
answers is done by one polling thread for all requests (see ``waiter``), so no request holds a
thread while it waits.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at run
# time, and they name dependencies local to ``create_app``.
import asyncio
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

import redis
from fastapi import Depends, FastAPI, Path, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ops.api import openai_compat
from ops.api.auth import KeyStore, Principal
from ops.api.errors import ApiError, from_item_error, from_submit_error, invalid, not_found
from ops.api.health import HealthProbe
from ops.api.openai_compat import ChatCompletionRequest
from ops.api.ratelimit import RateLimiter
from ops.api.schemas import (
    ITEM_ID_PATTERN,
    BatchStatusRequest,
    BatchStatusResponse,
    ErrorBody,
    PromptStatus,
    SubmitRequest,
    SubmitResponse,
)
from ops.api.settings import ApiSettings, load_api_settings
from ops.api.waiter import Outcome, ResultWatcher
from producers.client import CohortClient
from producers.errors import CohortError, ResultTimeout, SubmitError
from producers.results import PromptResult, decode_final
from producers.schema import ModelParams

logger = logging.getLogger("cohort.api")
T = TypeVar("T")
CHAT_PATH = "/v1/chat/completions"
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text} for code, text in (
        (400, "Bad input (chat) or malformed JSON"), (401, "Missing or unknown API key"),
        (422, "Bad input (native endpoints)"), (429, "Rate limit or budget exceeded"),
        (503, "Redis unreachable"),
    )
}


class ApiState:
    """The shared objects of one API process."""

    def __init__(self, settings: ApiSettings, redis_client: redis.Redis | None = None) -> None:
        self.settings = settings
        keys = settings.producer.redis.keys
        self.redis = redis_client or redis.Redis.from_url(
            settings.producer.redis.url, socket_timeout=10, socket_connect_timeout=3, health_check_interval=30)
        self.client = CohortClient(settings.producer, redis_client=self.redis)
        self.keys = keys
        self.auth = KeyStore(settings.key_digests, require_auth=settings.require_auth,
                             anonymous_tenant=settings.anonymous_tenant)
        self.limiter = RateLimiter(self.redis, keys, settings.rate_limit_for)
        self.watcher = ResultWatcher(self.redis, keys, poll_interval_s=settings.poll_interval_s)
        self.probe = HealthProbe(self.redis, keys, heartbeat_max_age_s=settings.heartbeat_max_age_s,
                                 min_workers=settings.min_workers, max_queue_depth=settings.max_queue_depth)
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    async def blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking call in the bounded pool (started on first use, again after ``close``)."""
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=self.settings.threads, thread_name_prefix="cohort-api")
            executor = self._executor
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        """Stop the threads (at lifespan shutdown); the state stays usable."""
        self.watcher.close()
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)


def create_app(settings: ApiSettings, *, redis_client: redis.Redis | None = None) -> FastAPI:
    """Build the ASGI app. Nothing connects until the first request.

    Args:
        settings: the API settings (``load_api_settings()``).
        redis_client: a Redis client to use instead of one built from ``settings``.
    """
    state = ApiState(settings, redis_client)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state.close()

    app = FastAPI(
        title="Cohort", version="1.0",
        summary="Batches, coalesces and routes LLM prompts. OpenAI-compatible chat completions.",
        openapi_url="/openapi.json" if settings.public_docs else None,
        docs_url="/docs" if settings.public_docs else None, redoc_url=None, lifespan=lifespan,
    )
    app.state.cohort = state
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    _install_error_handlers(app)

    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
    header_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="The API key, alternatively")

    async def caller(request: Request, _bearer: Annotated[Any, Security(bearer)],
                     _key: Annotated[Any, Security(header_key)]) -> Principal:
        return state.auth.authenticate(request.headers.get("authorization"), request.headers.get("x-api-key"))

    Caller = Annotated[Principal, Depends(caller)]

    async def charge(principal: Principal, response: Response, cost: int = 1) -> None:
        limit = settings.rate_limit_for(principal.tenant)
        if 0 < limit < cost:
            raise ApiError(429, f"this request counts {cost} against a limit of {limit} per minute: split it",
                           type="requests", code="rate_limit_exceeded", headers={"x-should-retry": "false"})
        decision = await state.blocking(state.limiter.take, principal.tenant, cost)
        if not decision.allowed:
            raise ApiError(429, f"Rate limit reached for tenant {principal.tenant}: {limit} requests per minute. "
                           f"Retry in {decision.retry_after_s} s.", type="requests", code="rate_limit_exceeded",
                           headers=decision.headers())
        response.headers.update(decision.headers())

    async def limited(response: Response, principal: Caller) -> Principal:
        await charge(principal, response)
        return principal

    Limited = Annotated[Principal, Depends(limited)]

    # --- native endpoints -------------------------------------------------------------------
    @app.post("/v1/prompts", status_code=202, response_model=SubmitResponse, tags=["prompts"],
              responses=ERRORS)
    async def submit(body: SubmitRequest, response: Response, principal: Caller) -> dict[str, Any]:
        """Submit one prompt (``prompt``) or many (``prompts``); answers at once with the ids."""
        common = body.model_dump(exclude_none=True, exclude={"prompt", "prompts"})
        if (body.prompt is None) == (body.prompts is None):
            raise invalid("give exactly one of 'prompt' or 'prompts'", param="prompt", status=422)
        if body.prompts is not None:
            if not body.prompts:
                raise invalid("prompts is empty", param="prompts", status=422)
            if len(body.prompts) > settings.max_items_per_request:
                raise invalid(f"at most {settings.max_items_per_request} prompts per request",
                              param="prompts", status=422)
            entries: list[Any] = [p if isinstance(p, str) else p.model_dump(exclude_none=True)
                                  for p in body.prompts]
        else:
            entries = [body.prompt]
        await charge(principal, response, len(entries))
        try:
            handles = await state.blocking(state.client.submit_many, entries, **common, tenant=principal.tenant)
        except SubmitError as exc:
            raise from_submit_error(exc, status=422) from None
        ids = [h.id for h in handles]
        return {"id": ids[0] if body.prompt is not None else None, "ids": ids}

    @app.get("/v1/prompts/{item_id}", response_model=PromptStatus, tags=["prompts"],
             responses={**ERRORS, 404: {"model": ErrorBody, "description": "Unknown id, or another tenant's"}})
    async def get_prompt(
        item_id: Annotated[str, Path(pattern=ITEM_ID_PATTERN, description="A prompt id.")],
        principal: Limited,
        wait: Annotated[float, Query(ge=0, allow_inf_nan=False,
                                     description="Seconds to wait for the result (cut to [api] max_wait_s).")] = 0.0,
    ) -> dict[str, Any]:
        """Status and result of one prompt, waiting up to ``wait`` seconds for it to finish."""
        statuses = await _statuses(state, [item_id], principal.tenant, min(wait, settings.max_wait_s))
        if statuses[0]["status"] == "not_found":
            raise not_found()
        return statuses[0]

    @app.post("/v1/prompts/status", response_model=BatchStatusResponse, tags=["prompts"], responses=ERRORS)
    async def batch_status(body: BatchStatusRequest, principal: Limited) -> dict[str, Any]:
        """Status and results of many prompts; ids unknown to this tenant are ``not_found``."""
        if len(body.ids) > settings.max_items_per_request:
            raise invalid(f"at most {settings.max_items_per_request} ids per request", param="ids", status=422)
        bad = next((i for i, v in enumerate(body.ids) if not _valid_id(v)), None)
        if bad is not None:
            raise invalid(f"ids[{bad}] is not a prompt id", param=f"ids[{bad}]", status=422)
        return {"data": await _statuses(state, body.ids, principal.tenant, min(body.wait, settings.max_wait_s))}

    # --- OpenAI-compatible ------------------------------------------------------------------
    @app.post(CHAT_PATH, tags=["openai"], responses={
        200: {"description": "A chat.completion object, or an SSE stream of chat.completion.chunk events",
              "content": {"application/json": {}, "text/event-stream": {}}},
        **ERRORS, 502: {"model": ErrorBody, "description": "Every tier failed"},
        504: {"model": ErrorBody, "description": "No answer within [api] chat_timeout_s"}})
    async def chat_completions(body: ChatCompletionRequest, response: Response, principal: Limited) -> Response:
        """OpenAI's chat completions, answered through Cohort's grouping, coalescing, packing and tiers."""
        created = int(time.time())
        submission = openai_compat.to_submission(body, settings.tiers)
        try:
            handles = await state.blocking(state.client.submit_many, [submission], tenant=principal.tenant)
        except SubmitError as exc:
            raise from_submit_error(exc, status=400) from None
        item_id = handles[0].id
        outcome = (await state.watcher.wait([item_id], settings.chat_timeout_s)).get(item_id)
        if outcome is None:
            outcome = ResultTimeout(f"no answer within {settings.chat_timeout_s} s; collect it later with "
                                    f"GET /v1/prompts/{item_id}")
        if isinstance(outcome, CohortError):
            raise from_item_error(outcome, item_id=item_id)
        max_tokens = submission["params"].get("max_tokens", ModelParams().max_tokens)
        headers = dict(response.headers)
        if body.stream:
            events = openai_compat.stream_events(
                outcome, item_id=item_id, created=created, max_tokens=max_tokens,
                include_usage=bool(body.stream_options and body.stream_options.include_usage),
                chunk_chars=settings.stream_chunk_chars)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={**headers, "Cache-Control": "no-cache"})
        return JSONResponse(openai_compat.completion(outcome, item_id=item_id, created=created,
                                                     max_tokens=max_tokens), headers=headers)

    @app.get("/v1/models", tags=["openai"], responses=ERRORS)
    async def models(_: Limited) -> dict[str, Any]:
        """The tier names (a chat ``model`` naming one pins it) and ``cohort`` (route as usual)."""
        names = [*openai_compat.ROUTING_MODELS[:1], *settings.tiers]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "cohort"}
                                           for n in names]}

    # --- probes -----------------------------------------------------------------------------
    probe_deps = [] if settings.public_health else [Depends(caller)]

    @app.get("/healthz", tags=["health"], dependencies=probe_deps)
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers (no Redis call)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], dependencies=probe_deps,
             responses={503: {"description": "Not ready: the body says why"}})
    async def readyz() -> JSONResponse:
        """Readiness: Redis answers, workers are alive, the queue is not over its limit."""
        ready, body = await state.blocking(state.probe.readiness)
        return JSONResponse(body, status_code=200 if ready else 503)

    if not settings.public_docs:
        @app.get("/openapi.json", include_in_schema=False)
        async def openapi(_: Caller) -> dict[str, Any]:
            return app.openapi()

    return app


def create_app_from_env() -> FastAPI:
    """Factory for ``uvicorn ops.api.app:create_app_from_env --factory`` (reads ``COHORT_CONFIG``)."""
    return create_app(load_api_settings())


# --- statuses -------------------------------------------------------------------------------
def _valid_id(value: str) -> bool:
    return 0 < len(value) <= 64 and all(c.isascii() and (c.isalnum() or c == "-") for c in value)


def _read_statuses(state: ApiState, ids: Sequence[str], tenant: str) -> dict[str, dict[str, Any]]:
    """Status records of the ids that belong to ``tenant`` (others are left out)."""
    pipe = state.redis.pipeline(transaction=False)
    for item_id in ids:
        pipe.hmget(state.keys.item_status(item_id), ["status", "tenant"])
    pipe.mget([state.keys.result(i) for i in ids])
    *rows, finals = pipe.execute()
    found: dict[str, dict[str, Any]] = {}
    for item_id, (status, owner), raw in zip(ids, rows, finals, strict=True):
        if owner is None or owner.decode() != tenant:
            continue
        try:
            outcome = decode_final(raw)
        except (ValueError, TypeError, KeyError):
            outcome = None
        found[item_id] = _status_record(item_id, status.decode() if status else "queued", outcome)
    return found


def _status_record(item_id: str, status: str, outcome: Outcome | None) -> dict[str, Any]:
    if isinstance(outcome, PromptResult):
        return {"id": item_id, "status": "answered", "result": dataclasses.asdict(outcome), "error": None}
    if isinstance(outcome, CohortError):
        return {"id": item_id, "status": "failed", "result": None, "error": outcome.to_dict()}
    return {"id": item_id, "status": status, "result": None, "error": None}


async def _statuses(state: ApiState, ids: Sequence[str], tenant: str, wait: float) -> list[dict[str, Any]]:
    unique = list(dict.fromkeys(ids))
    found = await state.blocking(_read_statuses, state, unique, tenant)
    pending = [i for i, record in found.items() if record["status"] not in ("answered", "failed")]
    if pending and wait > 0:
        for item_id, outcome in (await state.watcher.wait(pending, wait)).items():
            found[item_id] = _status_record(item_id, found[item_id]["status"], outcome)
    missing = {"status": "not_found", "result": None, "error": None}
    return [found.get(i) or {"id": i, **missing} for i in ids]


# --- errors ---------------------------------------------------------------------------------
def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(request.url.path, exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        return ApiError(exc.status_code, message, code=codes.get(exc.status_code),
                        headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(redis.RedisError)
    async def redis_error(_: Request, exc: redis.RedisError) -> JSONResponse:
        logger.error("redis error: %s", type(exc).__name__)
        return ApiError(503, "Cohort's Redis is unreachable; try again shortly", type="service_unavailable",
                        code="redis_unavailable").response()

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error")
        return ApiError(500, "internal error", type="api_error", code="internal_error").response()


def _validation_response(path: str, errors: Sequence[Any]) -> ApiError:
    """One clear message naming the problem: 400 on the chat endpoint (as OpenAI), 422 elsewhere."""
    status = 400 if path == CHAT_PATH else 422
    if any(e.get("type") == "json_invalid" for e in errors):
        return invalid("the request body is not valid JSON", status=400, code="invalid_json")
    # The deepest location is the most specific (a union's branch that got furthest).
    first: dict[str, Any] = max(errors, key=lambda e: len(e.get("loc", ())), default={})
    loc = [p for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    # A union reports one error per branch (``str``, ``PromptEntry``): drop the branch names.
    loc = [p for p in loc if not (isinstance(p, str) and (p[:1].isupper() or p in ("str", "list[str]")))]
    param = _dotted(loc)
    if first.get("type") == "extra_forbidden":
        if path == CHAT_PATH and len(loc) == 1:
            return openai_compat.unsupported_field(str(loc[0]))
        return invalid(f"unknown field: {param}", param=param, status=status, code="unknown_parameter")
    if first.get("type") == "missing" and not loc:
        return invalid("a JSON object body is required", status=status)
    message = f"{param}: {first.get('msg', 'invalid value')}" if param else str(first.get("msg", "invalid"))
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return invalid(message, param=param or None, status=status)


def _dotted(loc: Sequence[Any]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


# --- middleware -----------------------------------------------------------------------------
class BodyLimit:
    """Refuses bodies above ``max_bytes`` with 413, whether or not ``Content-Length`` is sent."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        response = ApiError(413, f"the request body is larger than {self.max_bytes} bytes",
                            code="request_too_large").response()
        await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})
