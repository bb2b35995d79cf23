"""The tier router: one retry loop over the tier chain, with budgets checked on every hop.

``TierRouter.complete`` answers one call (one item, or one packed call answering several):

1. estimate the complexity if none was given, plan the chain (``policy.plan_chain``), dropping
   tiers whose context window cannot hold the prompt;
2. for each tier of the chain, skip it at once if it is out of service (key refused, or no key),
   its circuit is open, it is rate-limited past a short wait, or the budget cannot cover it;
3. otherwise reserve the worst-case cost, call, settle the cost (or release it), record the
   outcome on the circuit, and follow ``policy.decide``: retry here after a backoff, move on, or fail.

Every call counts against ``max_attempts_per_item`` whatever tier it went to, so retries never
multiply across fallbacks: an item causes at most that many upstream calls. Skipping a tier costs
no attempt. The HTTP client never retries by itself.

Errors raised (all ``CohortError``; ``details`` carry ``attempts`` and ``skipped``):
``ProviderRejected`` (a 4xx that retrying cannot fix), ``BudgetExceeded`` (a cap left no tier
affordable: names the cap, the spend and the estimate), ``ContextTooLong`` (no tier is large
enough), ``ProviderAuthError`` (every tier is out of service), ``DeadlineExceeded``,
``FallbackExhausted`` (attempt cap reached or chain run through; ``retry_after_s`` when every
tier was only temporarily unavailable: open circuits, rate limits).

Calls that end without a usage report (timeouts, malformed bodies) release their reservation:
providers do not bill failed calls, and when one does Cohort cannot know by how much.
A 200 without usage is billed at the reserved worst case.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import redis

from producers.errors import (
    BudgetExceeded,
    ContextTooLong,
    DeadlineExceeded,
    FallbackExhausted,
    InvalidPrompt,
    ProviderAuthError,
    ProviderError,
    ProviderRejected,
)
from producers.keys import Keys
from workers.telemetry import Telemetry
from workers.tiers.adapters import ProviderResult, adapter_for, transport_error
from workers.tiers.budget import BudgetLedger, Refusal, Reservation, from_nanos
from workers.tiers.circuit import CircuitBreaker, Permit
from workers.tiers.complexity import estimate_complexity
from workers.tiers.config import BudgetConfig, RoutingConfig, TierConfig, resolve_keys
from workers.tiers.policy import call_estimate, decide, error_reason, plan_chain
from workers.tiers.ratelimit import RateLimiter
from workers.tiers.tokens import estimate_tokens, upper_bound_tokens

ROLES = ("system", "user", "assistant")
ATTEMPTS_TTL_S = 86400
HOLD_MARGIN_S = 60.0
"""Reservations outlive the call's timeout by this much before they expire on their own."""


@dataclass(frozen=True)
class CallRequest:
    """One upstream call to make, whatever tier answers it."""

    messages: list[dict[str, str]]
    """OpenAI-style ``{"role", "content"}`` messages; ``system`` allowed."""
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float | None = None
    stop: tuple[str, ...] | None = None
    tenant: str = "default"
    complexity: str | None = None
    """``simple``, ``medium``, ``complex``, or ``None`` to estimate it."""
    max_cost: float | None = None
    """The most this call may cost (worst case), in the tiers' currency."""
    pinned_tier: str | None = None
    """Only this tier (no fallback)."""
    json_mode: bool = False
    deadline: float | None = None
    """Epoch seconds after which no call is started and no wait is made."""
    items: int = 1
    """Items this call answers (telemetry)."""
    call_id: str | None = None
    """When set, attempts are counted in Redis (``Keys.attempts``) so a redelivered call keeps its cap."""


@dataclass(frozen=True)
class Attempt:
    """One upstream HTTP call."""

    tier: str
    outcome: str
    """``ok`` or the error's reason (``timeout``, ``http_5xx``, ``http_429``, ``malformed``...)."""
    status: int | None
    latency_s: float
    retry_after_s: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Completion:
    """The answer of a call and how it was obtained."""

    text: str
    tier: str
    model: str
    tokens_in: int
    tokens_out: int
    cost: float
    attempts: tuple[Attempt, ...]
    latency_s: float
    finish_reason: str
    complexity: str = "medium"
    """The complexity used for routing (given or estimated)."""


@dataclass
class _Run:
    """Bookkeeping of one ``complete`` call."""

    request: CallRequest
    started: float
    attempts: list[Attempt] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    used: int = 0
    refusal: tuple[str, Refusal] | None = None
    left: tuple[str, str] | None = None
    """(tier, reason) of the last tier left, until the next call shows where the item went."""
    chain: tuple[str, ...] = ()
    out_of_service: set[str] = field(default_factory=set)
    """Tiers of the chain whose key was refused or is missing."""
    too_small: set[str] = field(default_factory=set)
    """Tiers of the chain left because the prompt does not fit (pre-call estimate or provider error)."""
    last_error: ProviderError | None = None

    def skip(self, tier: TierConfig, reason: str, **extra: Any) -> None:
        self.skipped.append({"tier": tier.name, "reason": reason, **extra})
        if self.left is None:
            self.left = (tier.name, reason)

    def details(self, **extra: Any) -> dict[str, Any]:
        return {"attempts": [a.to_dict() for a in self.attempts], "skipped": list(self.skipped), **extra}


def raise_alert(client: redis.Redis, keys: Keys, name: str, payload: Mapping[str, Any]) -> None:
    """Record an alert for operators (the alerting module reads ``Keys.alerts``)."""
    client.hset(keys.alerts(), name, json.dumps({"name": name, "ts": time.time(), **payload}))


class TierRouter:
    """Routes calls over the tier chain. Thread-safe: one instance serves a worker's threads."""

    def __init__(self, routing: RoutingConfig, budgets: BudgetConfig, client: redis.Redis, keys: Keys, *,
                 telemetry: Telemetry | None = None, env: Mapping[str, str] | None = None,
                 http: httpx.Client | None = None, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None) -> None:
        """Build the router; reads the tiers' keys once from ``env`` (default: the environment).

        Args:
            routing, budgets: from ``parse_routing`` and ``parse_budgets``.
            client, keys: Redis, shared by every worker, and its key builders.
            telemetry: where calls, retries, fallbacks and circuit changes are recorded.
            env: environment holding the tiers' keys (and ``COHORT_SECRETS_FILE``).
            http: an ``httpx.Client`` to reuse (it must not retry); by default one is made and owned.
            sleep, clock, rng: injectable for tests.
        """
        self._routing = routing
        self._redis = client
        self._keys = keys
        self._telemetry = telemetry
        self._api_keys = resolve_keys(routing, os.environ if env is None else env)
        self._own_http = http is None
        self._http = http or httpx.Client(
            transport=httpx.HTTPTransport(retries=0),
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=128),
            follow_redirects=False,
        )
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()
        self._breaker = CircuitBreaker(client, keys, failure_threshold=routing.circuit_failure_threshold,
                                       failure_ratio=routing.circuit_failure_ratio,
                                       window_s=routing.circuit_window_s, cooldown_s=routing.circuit_cooldown_s)
        self._limiter = RateLimiter(client, keys)
        self._ledger = BudgetLedger(client, keys, budgets)
        self._alerted_missing: set[str] = set()

    # --- public ------------------------------------------------------------------------
    def complete(self, request: CallRequest) -> Completion:
        """Answer ``request`` from the first tier that can, within the attempt cap and budgets.

        Raises:
            ProviderRejected, BudgetExceeded, ContextTooLong, ProviderAuthError, DeadlineExceeded,
            FallbackExhausted: see the module docstring. ``InvalidPrompt`` for a malformed request.
        """
        _validate(request, self._routing)
        run = _Run(request=request, started=time.perf_counter())
        complexity = request.complexity or estimate_complexity(request.messages)
        prompt_tokens = estimate_tokens(request.messages)
        chain, too_small = plan_chain(self._routing, complexity=complexity, prompt_tokens=prompt_tokens,
                                      max_tokens=request.max_tokens, pinned=request.pinned_tier)
        for tier in too_small:
            run.skipped.append({"tier": tier.name, "reason": "context_too_small"})
        if not chain:
            largest = max((t.context_window for t in too_small), default=0)
            raise ContextTooLong(
                f"the prompt (about {prompt_tokens} tokens) plus max_tokens {request.max_tokens} fits no tier; "
                f"the largest context window is {largest} tokens", prompt_tokens=prompt_tokens,
                max_tokens=request.max_tokens, largest_window=largest, **run.details())
        run.chain = tuple(t.name for t in chain)
        if request.call_id:
            run.used = int(self._redis.get(self._keys.attempts(request.call_id)) or 0)
        bound = upper_bound_tokens(request.messages)
        min_window = 0
        budget_ceiling: int | None = None
        for tier in chain:
            if tier.context_window <= min_window:
                run.skip(tier, "context_too_small")
                run.too_small.add(tier.name)
                continue
            if not self._in_service(tier, run):
                continue
            estimate = call_estimate(tier, bound, request.max_tokens)
            if budget_ceiling is not None and estimate >= budget_ceiling:
                run.skip(tier, "budget")
                continue
            outcome = self._run_tier(run, tier, complexity=complexity, prompt_tokens=prompt_tokens,
                                     estimate=estimate)
            if isinstance(outcome, Completion):
                return outcome
            if outcome == "budget":
                budget_ceiling = estimate
            elif outcome == "context_too_long":
                min_window = tier.context_window
                run.too_small.add(tier.name)
        raise self._exhausted(run)

    def close(self) -> None:
        """Close the HTTP client if the router made it."""
        if self._own_http:
            self._http.close()

    # --- one tier ----------------------------------------------------------------------
    def _run_tier(self, run: _Run, tier: TierConfig, *, complexity: str, prompt_tokens: int,
                  estimate: int) -> Completion | str:
        """Calls and retries on ``tier``; the answer, or why the item leaves the tier."""
        request = run.request
        tier_attempts = 0
        while True:
            if run.used >= self._routing.max_attempts_per_item:
                raise self._cap_reached(run)
            now = self._clock()
            if request.deadline is not None and now >= request.deadline:
                raise DeadlineExceeded(f"the deadline passed after {len(run.attempts)} attempt(s)",
                                       **run.details())
            permit = self._breaker.acquire(tier.name, now=now, probe_ttl_s=tier.timeout_s + 5.0)
            if permit.changed:
                self._emit("circuit_changed", tier=tier.name, state="half_open")
            if not permit.allowed:
                run.skip(tier, "circuit_open", retry_at=permit.retry_at)
                return "circuit_open"
            if not self._admit(run, tier, prompt_tokens):
                self._breaker.release(tier.name, permit)
                return "rate_limited"
            hold_s = tier.timeout_s * 3 + HOLD_MARGIN_S
            reservation = self._ledger.reserve(tenant=request.tenant, estimate=estimate,
                                               max_cost=request.max_cost, now=now, hold_s=hold_s)
            if isinstance(reservation, Refusal):
                self._breaker.release(tier.name, permit)
                best = run.refusal
                if best is None or reservation.estimate <= best[1].estimate:
                    run.refusal = (tier.name, reservation)
                run.skip(tier, "budget", cap_name=reservation.cap_name)
                return "budget"
            if run.left is not None:
                if run.left[0] != tier.name:
                    self._emit("fallback", from_tier=run.left[0], to_tier=tier.name, reason=run.left[1])
                run.left = None
            run.used += 1
            tier_attempts += 1
            if request.call_id:
                self._count_attempt(request.call_id)
            try:
                result = self._call(run, tier, reservation, permit, complexity=complexity)
            except BaseException:
                # A time limit or a shutdown mid-call: give the hold and the probe back at once
                # rather than when they expire (a no-op if the call had already settled).
                with contextlib.suppress(redis.RedisError):
                    self._ledger.release(reservation)
                    self._breaker.release(tier.name, permit)
                raise
            if isinstance(result, Completion):
                return result
            error = result
            opened = self._record_circuit(tier, ok=not error.retryable, permit=permit)
            step = decide(error, tier=tier, tier_attempts=tier_attempts, total_attempts=run.used,
                          routing=self._routing, now=self._clock(), deadline=request.deadline,
                          circuit_opened=opened, rng=self._rng)
            if step.kind == "fail":
                raise ProviderRejected(error.message, **{**error.details, **run.details()}) from error
            if step.kind == "stop":
                raise self._cap_reached(run)
            if step.kind == "retry":
                self._emit("retry", tier=tier.name, reason=step.reason)
                self._sleep(step.delay_s)
                continue
            run.left = (tier.name, step.reason)
            if isinstance(error, ProviderAuthError):
                self._take_out_of_service(tier, error)
                run.out_of_service.add(tier.name)
            return error_reason(error)

    def _call(self, run: _Run, tier: TierConfig, reservation: Reservation, permit: Permit, *,
              complexity: str) -> Completion | ProviderError:
        """One HTTP call; settles the budget and records telemetry. Returns the answer or the error."""
        request = run.request
        key = self._api_keys.get(tier.name)
        timeout = tier.timeout_s
        if request.deadline is not None:
            timeout = max(0.001, min(timeout, request.deadline - self._clock()))
        adapter = adapter_for(tier)
        url, headers, body = adapter.build_request(tier, request, key)
        started = time.perf_counter()
        result: ProviderResult | None = None
        error: ProviderError | None = None
        status: int | None = None
        try:
            response = self._http.post(url, headers=headers, json=body, timeout=httpx.Timeout(timeout))
            status = response.status_code
            result = adapter.parse_response(tier, status, response.headers, response.content, api_key=key)
        except ProviderError as exc:
            error = exc
        except httpx.HTTPError as exc:
            error = transport_error(tier, exc, timeout_s=timeout)
        latency = time.perf_counter() - started
        if result is None:
            assert error is not None
            self._ledger.release(reservation)
            run.last_error = error
            retry_after = error.details.get("retry_after_s")
            run.attempts.append(Attempt(tier.name, error_reason(error), status, latency, retry_after))
            self._emit("upstream_call", tier=tier.name, tenant=request.tenant, outcome=error_reason(error),
                       tokens_in=0, tokens_out=0, cost=0.0, latency_s=latency, items=request.items)
            return error
        if result.usage_reported:
            tokens_in, tokens_out = result.tokens_in, result.tokens_out
            cost = tier.cost_nanos(tokens_in, tokens_out)
        else:
            tokens_in, tokens_out = estimate_tokens(request.messages), request.max_tokens
            cost = reservation.estimate
        self._ledger.settle(reservation, cost)
        self._record_circuit(tier, ok=True, permit=permit)
        run.attempts.append(Attempt(tier.name, "ok", status, latency, None))
        self._emit("upstream_call", tier=tier.name, tenant=request.tenant, outcome="ok", tokens_in=tokens_in,
                   tokens_out=tokens_out, cost=from_nanos(cost), latency_s=latency, items=request.items)
        if run.left is not None:
            run.left = None
        return Completion(text=result.text, tier=tier.name, model=result.model, tokens_in=tokens_in,
                          tokens_out=tokens_out, cost=from_nanos(cost), attempts=tuple(run.attempts),
                          latency_s=time.perf_counter() - run.started, finish_reason=result.finish_reason,
                          complexity=complexity)

    # --- tier state ----------------------------------------------------------------------
    def _in_service(self, tier: TierConfig, run: _Run) -> bool:
        """False (and the skip recorded) when the tier's key was refused or is missing."""
        if tier.api_key_env is not None and not self._api_keys.get(tier.name):
            run.skip(tier, "missing_key")
            run.out_of_service.add(tier.name)
            if tier.name not in self._alerted_missing:
                self._alerted_missing.add(tier.name)
                raise_alert(self._redis, self._keys, f"tier_key_missing:{tier.name}",
                            {"tier": tier.name, "variable": tier.api_key_env,
                             "message": f"tier {tier.name}: variable {tier.api_key_env} is not set"})
            return False
        if self._redis.exists(self._keys.tier_disabled(tier.name)):
            run.skip(tier, "disabled")
            run.out_of_service.add(tier.name)
            return False
        return True

    def _take_out_of_service(self, tier: TierConfig, error: ProviderAuthError) -> None:
        """Every worker skips the tier for ``auth_disable_s``; operators are alerted."""
        record = {"tier": tier.name, "reason": "auth_error", "status": error.details.get("status"),
                  "message": error.message, "until": self._clock() + self._routing.auth_disable_s}
        self._redis.set(self._keys.tier_disabled(tier.name), json.dumps(record),
                        ex=max(1, int(self._routing.auth_disable_s)))
        raise_alert(self._redis, self._keys, f"tier_auth:{tier.name}", record)
        self._emit("circuit_changed", tier=tier.name, state="disabled")

    def _record_circuit(self, tier: TierConfig, *, ok: bool, permit: Permit) -> bool:
        """Count the outcome; True when this failure opened the circuit."""
        changed = self._breaker.record(tier.name, ok=ok, permit=permit, now=self._clock())
        if changed:
            self._emit("circuit_changed", tier=tier.name, state=changed)
        return changed == "open"

    def _admit(self, run: _Run, tier: TierConfig, prompt_tokens: int) -> bool:
        """Rate limits: wait briefly if the window is about to free, else skip the tier."""
        tokens = prompt_tokens + run.request.max_tokens
        now = self._clock()
        decision = self._limiter.acquire(tier, tokens=tokens, now=now)
        if decision.allowed:
            return True
        deadline = run.request.deadline
        if decision.wait_s <= self._routing.rate_limit_max_wait_s and (
                deadline is None or now + decision.wait_s < deadline):
            self._sleep(decision.wait_s)
            decision = self._limiter.acquire(tier, tokens=tokens, now=self._clock())
            if decision.allowed:
                return True
        run.skip(tier, "rate_limited", limit=decision.limit, retry_at=now + decision.wait_s)
        return False

    def _count_attempt(self, call_id: str) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.incr(self._keys.attempts(call_id))
        pipe.expire(self._keys.attempts(call_id), ATTEMPTS_TTL_S)
        pipe.execute()

    # --- endings -----------------------------------------------------------------------
    def _cap_reached(self, run: _Run) -> FallbackExhausted:
        self._leave(run)
        cap = self._routing.max_attempts_per_item
        return FallbackExhausted(f"no answer after {run.used} attempt(s): the cap of {cap} per item is reached"
                                 + _last(run), cap=cap, **run.details())

    def _exhausted(self, run: _Run) -> Exception:
        """The error that ends an item whose chain ran out."""
        self._leave(run)
        reasons = {s["reason"] for s in run.skipped}
        if run.refusal is not None:
            tier, refusal = run.refusal
            return BudgetExceeded(refusal.message(tier), **refusal.details(tier), **run.details())
        if set(run.chain) <= run.out_of_service:
            return ProviderAuthError("every tier that could answer is out of service (key refused or missing)",
                                     **run.details())
        if set(run.chain) <= run.too_small:
            return ContextTooLong("the prompt does not fit the context window of any tier" + _last(run),
                                  **run.details())
        transient = {"circuit_open", "rate_limited"}
        extra: dict[str, Any] = {}
        if not run.attempts and reasons and reasons <= transient | {"context_too_small"} and reasons & transient:
            waits = [s["retry_at"] for s in run.skipped if s.get("retry_at")]
            if waits:
                extra["retry_after_s"] = max(0.0, min(waits) - self._clock())
        return FallbackExhausted(f"no tier could answer after {run.used} attempt(s); skipped: "
                                 + (", ".join(f"{s['tier']} ({s['reason']})" for s in run.skipped) or "none")
                                 + _last(run), **run.details(), **extra)

    def _leave(self, run: _Run) -> None:
        if run.left is not None:
            self._emit("fallback", from_tier=run.left[0], to_tier=None, reason=run.left[1])
            run.left = None

    def _emit(self, event: str, **fields: Any) -> None:
        if self._telemetry is not None:
            getattr(self._telemetry, event)(**fields)


def _last(run: _Run) -> str:
    return f"; last error: {run.last_error.message}" if run.last_error is not None else ""


def _validate(request: CallRequest, routing: RoutingConfig) -> None:
    if not request.messages or not isinstance(request.messages, list):
        raise InvalidPrompt("messages must be a non-empty list", field="messages")
    for i, message in enumerate(request.messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(
                message.get("content"), str):
            raise InvalidPrompt(f"messages[{i}] must have a role in {ROLES} and string content",
                                field=f"messages[{i}]")
    if isinstance(request.max_tokens, bool) or not isinstance(request.max_tokens, int) or request.max_tokens < 1:
        raise InvalidPrompt("max_tokens must be a positive integer", field="max_tokens")
    if request.complexity is not None and request.complexity not in ("simple", "medium", "complex"):
        raise InvalidPrompt(f"complexity must be simple, medium, complex or None, got {request.complexity!r}",
                            field="complexity")
    if request.pinned_tier is not None and request.pinned_tier not in routing.names:
        raise InvalidPrompt(f"unknown tier {request.pinned_tier!r}; tiers are {list(routing.names)}",
                            field="pinned_tier")
