"""Alerts evaluated inside Cohort: rules, deduplication, resolution and an optional webhook.

One evaluation (``run_once``, called by the ``cohort.evaluate_alerts`` beat task) does::

    collect_snapshot()  reads the last ``window_s`` seconds of telemetry windows, circuit and
                        tier-disabled keys, budget ledgers and the pending depth from Redis
    evaluate()          pure: turns the snapshot into one ``Condition`` per rule and subject
                        (firing or not); the pending-growth rule also updates its small state
    AlertStore.apply()  dedup and resolve: a firing condition whose id is already active only
                        refreshes it; a new one is stored in ``Keys.alerts()`` and logged as
                        ``fired`` in ``Keys.alert_history()``; an active alert whose condition no
                        longer fires is removed and logged as ``resolved``
    notify()            POSTs each transition to the webhook (short timeout, failures logged only)

Rules (thresholds from ``[alerts]``; the first three are the article's):

============================  =====================================================================
``cost_per_request``          upstream cost / finished items in the window above ``cost_per_request``
``latency``                   end-to-end latency (``latency_stat``: avg, or p50/p95/p99 estimated
                              from histogram buckets) above ``latency_s``
``error_rate``                failed / finished items in the window above ``error_rate``
``budget_warning``            a cap's settled spend at ``budget_warn_ratio`` (80%) or more
``budget_exhausted``          at ``budget_critical_ratio`` (100%), or above the warning ratio while
                              items fail with ``budget_exceeded`` in the window
``circuit_open``              a tier's shared circuit is open or half-open
``tier_disabled``             a tier was taken out of service (its key was refused)
``pending_growing``           pending items (unclaimed + open pool) rising, never below where the
                              rise began, for longer than ``pending_growth_s``
============================  =====================================================================

The three rate rules wait for ``min_requests`` finished items in the window; with fewer they do
not fire (and an active one resolves). Nothing here raises on a Redis or webhook failure during
notification; a failed snapshot skips the evaluation rather than resolving on missing data.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from producers.errors import ConfigError
from producers.keys import GROUPER_CONSUMER_GROUP, Keys
from producers.settings import check_keys, section, typed
from workers.telemetry import LATENCY_BUCKETS, estimate_quantile, latency_buckets, window_totals
from workers.tiers.budget import from_nanos, periods
from workers.tiers.config import parse_budgets

log = logging.getLogger("cohort.alerts")

CELERY_QUEUES = ("inference", "grouper", "gpu")
"""Broker lists whose lengths are reported as queue depth (the Redis transport keeps a list per queue)."""
PRIORITY_SEPARATOR = "\x06\x16"
LATENCY_STATS = ("avg", "p50", "p95", "p99")
WEBHOOK_ENV = "COHORT_ALERT_WEBHOOK_URL"


# --- settings ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class AlertSettings:
    """The ``[alerts]`` section: what fires, and when."""

    enabled: bool = True
    """Evaluate alerts at all (default on)."""
    interval_s: float = 5.0
    """Period of the ``cohort.evaluate_alerts`` beat entry (default 5 s)."""
    window_s: int = 300
    """The rate rules look at the last this-many seconds (default 300, at most 3600)."""
    min_requests: int = 20
    """Rate rules stay quiet until the window holds this many finished items (default 20)."""
    cost_per_request: float = 0.01
    """Fire when upstream cost per finished item exceeds this (default 0.01; 0 disables)."""
    latency_s: float = 2.0
    """Fire when end-to-end latency exceeds this many seconds (default 2.0; 0 disables)."""
    latency_stat: str = "avg"
    """Which latency: ``avg`` (default, the article's), ``p50``, ``p95`` or ``p99``."""
    error_rate: float = 0.05
    """Fire when the share of failed items exceeds this (default 0.05; 0 disables)."""
    budget_warn_ratio: float = 0.8
    """Warn when a spend cap is this much used (default 0.8; 0 disables budget alerts)."""
    budget_critical_ratio: float = 1.0
    """Critical when a spend cap is this much used (default 1.0)."""
    circuit_open: bool = True
    """Alert while a tier's circuit is open or half-open (default on)."""
    tier_disabled: bool = True
    """Alert while a tier is out of service after an authentication error (default on)."""
    pending_growth_s: float = 120.0
    """Alert when pending depth keeps rising for longer than this (default 120 s; 0 disables)."""
    pending_min_depth: int = 1
    """Pending depth below this never counts as growing (default 1)."""
    history_max: int = 1000
    """Alert transitions kept in the history list (default 1,000)."""
    webhook_url: str = ""
    """POST each transition here (``COHORT_ALERT_WEBHOOK_URL`` overrides; empty: no webhook)."""
    webhook_timeout_s: float = 2.0
    """Timeout of one webhook POST (default 2 s)."""


def alert_settings(config: Mapping[str, Any], env: Mapping[str, str] | None = None) -> AlertSettings:
    """Build ``AlertSettings`` from the parsed config; raises ``ConfigError`` naming the bad key."""
    env = os.environ if env is None else env
    t = section(config, "alerts")
    check_keys(t, set(AlertSettings.__dataclass_fields__), where="alerts")
    w = "alerts"
    stat = typed(t, "latency_stat", str, "avg", where=w)
    if stat not in LATENCY_STATS:
        raise ConfigError(f"alerts.latency_stat must be one of {', '.join(LATENCY_STATS)}, got {stat!r}",
                          key="alerts.latency_stat")
    url = env.get(WEBHOOK_ENV) or typed(t, "webhook_url", str, "", where=w)
    if url and not url.startswith(("http://", "https://")):
        raise ConfigError("alerts.webhook_url must be an http:// or https:// URL", key="alerts.webhook_url")
    warn = typed(t, "budget_warn_ratio", float, 0.8, where=w, minimum=0, maximum=10)
    critical = typed(t, "budget_critical_ratio", float, 1.0, where=w, minimum=0, maximum=10)
    if warn and critical < warn:
        raise ConfigError("alerts.budget_critical_ratio must be at least alerts.budget_warn_ratio",
                          key="alerts.budget_critical_ratio")
    return AlertSettings(
        enabled=typed(t, "enabled", bool, True, where=w),
        interval_s=typed(t, "interval_s", float, 5.0, where=w, minimum=0.1, maximum=3600),
        window_s=typed(t, "window_s", int, 300, where=w, minimum=1, maximum=3600),
        min_requests=typed(t, "min_requests", int, 20, where=w, minimum=1),
        cost_per_request=typed(t, "cost_per_request", float, 0.01, where=w, minimum=0),
        latency_s=typed(t, "latency_s", float, 2.0, where=w, minimum=0),
        latency_stat=stat,
        error_rate=typed(t, "error_rate", float, 0.05, where=w, minimum=0, maximum=1),
        budget_warn_ratio=warn,
        budget_critical_ratio=critical,
        circuit_open=typed(t, "circuit_open", bool, True, where=w),
        tier_disabled=typed(t, "tier_disabled", bool, True, where=w),
        pending_growth_s=typed(t, "pending_growth_s", float, 120.0, where=w, minimum=0),
        pending_min_depth=typed(t, "pending_min_depth", int, 1, where=w, minimum=1),
        history_max=typed(t, "history_max", int, 1000, where=w, minimum=1, maximum=1_000_000),
        webhook_url=url,
        webhook_timeout_s=typed(t, "webhook_timeout_s", float, 2.0, where=w, minimum=0.05, maximum=60),
    )


# --- reading Redis ----------------------------------------------------------------------------
def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def queue_depths(client: redis.Redis, keys: Keys) -> dict[str, int]:
    """What waits where: the pending stream, the open pool, the Celery queues, batches in flight.

    ``pending`` (items not yet in a batch) = ``pending_unclaimed`` (stream entries not yet read by
    the grouper) + ``pending_unacked`` (read, not yet moved to the pool) + ``open_pool``.
    """
    stream = keys.pending_stream()
    pipe = client.pipeline(transaction=False)
    pipe.xlen(stream)
    pipe.zcard(keys.open_pool())
    pipe.zcard(keys.inflight())
    for queue in CELERY_QUEUES:
        pipe.llen(queue)
        for priority in (3, 6, 9):
            pipe.llen(f"{queue}{PRIORITY_SEPARATOR}{priority}")
    replies = pipe.execute()
    xlen, open_pool, inflight = (int(x or 0) for x in replies[:3])
    depths: dict[str, int] = {"pending_stream": xlen, "open_pool": open_pool, "inflight_batches": inflight}
    for i, queue in enumerate(CELERY_QUEUES):
        depths[queue] = sum(int(x or 0) for x in replies[3 + 4 * i: 7 + 4 * i])
    unclaimed, unacked = xlen, 0
    try:
        groups = client.xinfo_groups(stream) if xlen else []
    except redis.ResponseError:
        groups = []
    for group in groups:
        if _text(group.get("name", "")) == GROUPER_CONSUMER_GROUP:
            unacked = int(group.get("pending") or 0)
            lag = group.get("lag")
            if lag is None:
                added, read = group.get("entries-added"), group.get("entries-read")
                lag = (int(added) - int(read)) if added is not None and read is not None else xlen - unacked
            unclaimed = max(0, int(lag))
            break
    depths["pending_unclaimed"] = unclaimed
    depths["pending_unacked"] = unacked
    depths["pending"] = unclaimed + unacked + open_pool
    return depths


@dataclass(frozen=True)
class BudgetStatus:
    """One spend cap and how much of it is used."""

    scope: str
    """``global`` or ``tenant:<name>``."""
    period: str
    """``day`` or ``month``."""
    period_name: str
    """The ledger's period, e.g. ``day:2025-01-31``."""
    limit: float
    spent: float
    reserved: float

    @property
    def remaining(self) -> float:
        return max(0.0, self.limit - self.spent - self.reserved)

    @property
    def used_ratio(self) -> float:
        return self.spent / self.limit if self.limit > 0 else (1.0 if self.spent > 0 else 0.0)


def budget_statuses(client: redis.Redis, keys: Keys, config: Mapping[str, Any], *,
                    now: float) -> list[BudgetStatus]:
    """Every configured cap with its ledger for the current UTC day and month.

    A ``[budgets.tenants."*"]`` cap applies to each tenant that has a ledger in the period.
    """
    budgets = parse_budgets(config)
    day, month = periods(now)
    wanted: list[tuple[str, str, str, float]] = []
    for kind, name, cap in (("day", day, budgets.global_daily), ("month", month, budgets.global_monthly)):
        if cap is not None:
            wanted.append(("global", kind, name, cap))
    wildcard = budgets.tenants.get("*")
    for kind, name in (("day", day), ("month", month)):
        tenants = {t: b for t, b in budgets.tenants.items() if t != "*"}
        if wildcard is not None and (wildcard.daily if kind == "day" else wildcard.monthly) is not None:
            for tenant in _tenants_with_ledgers(client, keys, name):
                tenants.setdefault(tenant, wildcard)
        for tenant, tb in sorted(tenants.items()):
            cap = tb.daily if kind == "day" else tb.monthly
            if cap is not None:
                wanted.append((f"tenant:{tenant}", kind, name, cap))
    pipe = client.pipeline(transaction=False)
    for scope, _, name, _ in wanted:
        pipe.hmget(keys.budget(scope, name), ["spent", "reserved"])
    statuses = []
    for (scope, kind, name, cap), (spent, reserved) in zip(wanted, pipe.execute(), strict=True):
        statuses.append(BudgetStatus(scope=scope, period=kind, period_name=name, limit=float(cap),
                                     spent=from_nanos(int(spent or 0)), reserved=from_nanos(int(reserved or 0))))
    return statuses


def _tenants_with_ledgers(client: redis.Redis, keys: Keys, period_name: str, limit: int = 1000) -> list[str]:
    head, _, tail = keys.budget("tenant:\x00", period_name).partition("\x00")
    pattern = keys.budget("tenant:*", period_name)
    found = []
    for raw in client.scan_iter(match=pattern, count=500):
        key = _text(raw)
        if key.startswith(head) and key.endswith(tail):
            found.append(key[len(head):len(key) - len(tail)])
            if len(found) >= limit:
                break
    return found


def circuit_states(client: redis.Redis, keys: Keys, tiers: Sequence[str]) -> dict[str, str]:
    """Each tier's shared circuit state (``closed`` when none is stored or it cannot be read)."""
    pipe = client.pipeline(transaction=False)
    for tier in tiers:
        pipe.hget(keys.circuit(tier), "state")
    states = {}
    for tier, value in zip(tiers, pipe.execute(raise_on_error=False), strict=True):
        states[tier] = "closed" if value is None or isinstance(value, Exception) else _text(value)
    return states


def disabled_tiers(client: redis.Redis, keys: Keys, tiers: Sequence[str]) -> dict[str, bool]:
    pipe = client.pipeline(transaction=False)
    for tier in tiers:
        pipe.exists(keys.tier_disabled(tier))
    return {tier: bool(n) for tier, n in zip(tiers, pipe.execute(), strict=True)}


def tier_names(config: Mapping[str, Any]) -> list[str]:
    """Names of the ``[[tiers]]`` entries, in chain order (the first is the primary)."""
    raw = config.get("tiers")
    if not isinstance(raw, list):
        return []
    return [str(t["name"]) for t in raw if isinstance(t, dict) and isinstance(t.get("name"), str)]


# --- snapshot and rules -----------------------------------------------------------------------
@dataclass(frozen=True)
class Snapshot:
    """What the rules look at, read from Redis at one instant."""

    now: float
    window: Mapping[str, float]
    circuits: Mapping[str, str] = field(default_factory=dict)
    disabled: Mapping[str, bool] = field(default_factory=dict)
    budgets: Sequence[BudgetStatus] = ()
    pending: int = 0


def collect_snapshot(client: redis.Redis, keys: Keys, settings: AlertSettings, config: Mapping[str, Any], *,
                     now: float) -> Snapshot:
    """Read everything the rules need (raises ``redis.RedisError`` if Redis cannot be read)."""
    tiers = tier_names(config)
    budgets = budget_statuses(client, keys, config, now=now) if settings.budget_warn_ratio > 0 else []
    return Snapshot(
        now=now,
        window=window_totals(client, keys, end=now, seconds=settings.window_s),
        circuits=circuit_states(client, keys, tiers),
        disabled=disabled_tiers(client, keys, tiers),
        budgets=budgets,
        pending=queue_depths(client, keys)["pending"],
    )


@dataclass(frozen=True)
class Condition:
    """The verdict of one rule on one subject."""

    id: str
    """Deduplication key: at most one active alert per id."""
    rule: str
    severity: str
    firing: bool
    message: str
    value: float | None = None
    threshold: float | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


def window_latency(window: Mapping[str, float], stat: str) -> float | None:
    """The window's end-to-end latency by ``stat`` (``avg`` exact; percentiles from buckets)."""
    items = window.get("items", 0.0)
    if items <= 0:
        return None
    if stat == "avg":
        return window.get("e2e_sum", 0.0) / items
    return estimate_quantile(latency_buckets(window), LATENCY_BUCKETS, int(stat[1:]) / 100.0)


def evaluate(snapshot: Snapshot, settings: AlertSettings,
             state: Mapping[str, Any]) -> tuple[list[Condition], dict[str, Any]]:
    """Apply every rule to a snapshot. Pure: returns the conditions and the evaluator's new state."""
    conditions: list[Condition] = []
    w = snapshot.window
    items = w.get("items", 0.0)
    enough = items >= settings.min_requests
    span = f"last {settings.window_s}s"
    if settings.cost_per_request > 0:
        value = w.get("cost", 0.0) / items if items else None
        firing = enough and value is not None and value > settings.cost_per_request
        conditions.append(Condition(
            id="cost_per_request", rule="cost_per_request", severity="warning", firing=firing,
            value=value, threshold=settings.cost_per_request,
            message=(f"cost per request {value:.4f} above {settings.cost_per_request:.4f} ({span}, {items:.0f} items)"
                     if value is not None else "no finished items")))
    if settings.latency_s > 0:
        value = window_latency(w, settings.latency_stat)
        firing = enough and value is not None and value > settings.latency_s
        conditions.append(Condition(
            id="latency", rule="latency", severity="warning", firing=firing, value=value,
            threshold=settings.latency_s, labels={"stat": settings.latency_stat},
            message=(f"{settings.latency_stat} end-to-end latency {value:.2f}s above {settings.latency_s:.2f}s ({span})"
                     if value is not None else "no finished items")))
    if settings.error_rate > 0:
        failed = w.get("o:failed", 0.0)
        value = failed / items if items else None
        firing = enough and value is not None and value > settings.error_rate
        conditions.append(Condition(
            id="error_rate", rule="error_rate", severity="critical", firing=firing, value=value,
            threshold=settings.error_rate,
            message=(f"error rate {value:.1%} above {settings.error_rate:.1%}"
                     f" ({failed:.0f} of {items:.0f} items, {span})" if value is not None else "no finished items")))
    if settings.budget_warn_ratio > 0:
        refused = w.get("err:budget_exceeded", 0.0) > 0
        for b in snapshot.budgets:
            labels = {"scope": b.scope, "period": b.period}
            ratio = b.used_ratio
            used = f"{b.scope} {b.period} budget {ratio:.0%} used ({b.spent:.4f} of {b.limit:.4f})"
            conditions.append(Condition(
                id=f"budget_warning:{b.scope}:{b.period}", rule="budget_warning", severity="warning",
                firing=ratio >= settings.budget_warn_ratio, value=ratio, threshold=settings.budget_warn_ratio,
                labels=labels, message=used))
            exhausted = ratio >= settings.budget_critical_ratio or (refused and ratio >= settings.budget_warn_ratio)
            conditions.append(Condition(
                id=f"budget_exhausted:{b.scope}:{b.period}", rule="budget_exhausted", severity="critical",
                firing=exhausted, value=ratio, threshold=settings.budget_critical_ratio, labels=labels,
                message=used + ("; items refused for budget" if refused else "")))
    if settings.circuit_open:
        for tier, st in snapshot.circuits.items():
            conditions.append(Condition(
                id=f"circuit_open:{tier}", rule="circuit_open", severity="critical",
                firing=st in ("open", "half_open"), value=1.0 if st in ("open", "half_open") else 0.0,
                labels={"tier": tier, "state": st}, message=f"tier {tier} circuit is {st}"))
    if settings.tier_disabled:
        for tier, off in snapshot.disabled.items():
            conditions.append(Condition(
                id=f"tier_disabled:{tier}", rule="tier_disabled", severity="critical", firing=off,
                value=1.0 if off else 0.0, labels={"tier": tier},
                message=f"tier {tier} is out of service (its key was refused)" if off else f"tier {tier} in service"))
    new_state = dict(state)
    if settings.pending_growth_s > 0:
        growth = _pending_growth(state.get("pending"), snapshot.pending, snapshot.now, settings.pending_min_depth)
        new_state["pending"] = growth
        firing, message = False, f"pending depth {snapshot.pending}"
        if growth is not None:
            duration = snapshot.now - float(growth["since"])
            firing = duration >= settings.pending_growth_s and snapshot.pending > int(growth["floor"])
            message = f"pending depth rising for {duration:.0f}s: {growth['floor']} -> {snapshot.pending}"
        conditions.append(Condition(
            id="pending_growing", rule="pending_growing", severity="warning", firing=firing,
            value=float(snapshot.pending), threshold=settings.pending_growth_s, message=message))
    return conditions, new_state


def _pending_growth(previous: Any, depth: int, now: float, min_depth: int) -> dict[str, Any] | None:
    """Track since when the depth has stayed at or above the level where its rise began."""
    if depth < min_depth:
        return None
    if not isinstance(previous, dict) or "since" not in previous or depth < previous.get("floor", 0):
        return {"since": now, "floor": depth}
    return {"since": float(previous["since"]), "floor": int(previous["floor"])}


# --- storing: dedup, resolve, history ----------------------------------------------------------
@dataclass(frozen=True)
class Transition:
    """An alert that fired or resolved in this evaluation."""

    event: str
    """``fired`` or ``resolved``."""
    alert: dict[str, Any]


class AlertStore:
    """Active alerts (``Keys.alerts()``) and their history (``Keys.alert_history()``)."""

    def __init__(self, client: redis.Redis, keys: Keys, *, history_max: int = 1000) -> None:
        self._redis = client
        self._keys = keys
        self._history_max = history_max

    def active(self) -> list[dict[str, Any]]:
        """The active alerts, oldest first."""
        raw = self._redis.hgetall(self._keys.alerts())
        alerts = [json.loads(v) for v in raw.values()]
        return sorted(alerts, key=lambda a: (a.get("fired_at", 0), a.get("id", "")))

    def history(self, limit: int = 100) -> list[dict[str, Any]]:
        """The latest transitions, newest first."""
        return [json.loads(v) for v in self._redis.lrange(self._keys.alert_history(), 0, max(0, limit - 1))]

    def load_state(self) -> dict[str, Any]:
        raw = self._redis.hgetall(self._keys.alert_state())
        state: dict[str, Any] = {}
        for k, v in raw.items():
            try:
                state[_text(k)] = json.loads(v)
            except ValueError:
                continue
        return state

    def apply(self, conditions: Iterable[Condition], *, now: float,
              state: Mapping[str, Any] | None = None) -> list[Transition]:
        """Store firing conditions once, resolve the ones that cleared; returns the transitions."""
        active = {_text(k): json.loads(v) for k, v in self._redis.hgetall(self._keys.alerts()).items()}
        seen: set[str] = set()
        transitions: list[Transition] = []
        pipe = self._redis.pipeline(transaction=True)
        for c in conditions:
            seen.add(c.id)
            record = active.get(c.id)
            if c.firing and record is None:
                record = {"id": c.id, "rule": c.rule, "severity": c.severity, "status": "active",
                          "message": c.message, "value": c.value, "threshold": c.threshold,
                          "labels": dict(c.labels), "fired_at": now, "last_seen": now}
                pipe.hset(self._keys.alerts(), c.id, json.dumps(record))
                transitions.append(Transition("fired", record))
            elif c.firing and record is not None:
                record.update(message=c.message, value=c.value, last_seen=now, labels=dict(c.labels))
                pipe.hset(self._keys.alerts(), c.id, json.dumps(record))
            elif record is not None:
                transitions.append(Transition("resolved", self._resolved(record, c.message, now)))
                pipe.hdel(self._keys.alerts(), c.id)
        for alert_id, record in active.items():
            if alert_id not in seen:  # its subject is gone (tier removed, budget period over...)
                transitions.append(Transition("resolved", self._resolved(record, "no longer evaluated", now)))
                pipe.hdel(self._keys.alerts(), alert_id)
        for t in transitions:
            pipe.lpush(self._keys.alert_history(), json.dumps({"event": t.event, "at": now, **t.alert}))
        if transitions:
            pipe.ltrim(self._keys.alert_history(), 0, self._history_max - 1)
        if state is not None:
            pipe.delete(self._keys.alert_state())
            if state:
                pipe.hset(self._keys.alert_state(), mapping={k: json.dumps(v) for k, v in state.items()})
        pipe.execute()
        return transitions

    @staticmethod
    def _resolved(record: dict[str, Any], message: str, now: float) -> dict[str, Any]:
        resolved = dict(record)
        resolved.update(status="resolved", resolved_at=now, resolved_message=message,
                        duration_s=round(now - float(record.get("fired_at", now)), 3))
        return resolved


# --- webhook ----------------------------------------------------------------------------------
def notify(url: str, transitions: Sequence[Transition], *, timeout_s: float, source: str = "cohort") -> int:
    """POST each transition as JSON; returns how many were accepted (2xx). Never raises.

    After the first connection failure the rest of this evaluation's transitions are skipped,
    so a dead receiver costs one timeout per evaluation at most; they stay in the history.
    """
    if not url or not transitions:
        return 0
    import httpx

    sent = 0
    try:
        with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as http:
            for t in transitions:
                body = {"source": source, "event": t.event, "alert": t.alert}
                try:
                    response = http.post(url, json=body)
                except httpx.HTTPError as exc:
                    log.warning("alert webhook unreachable (%s); %d transition(s) not posted",
                                type(exc).__name__, len(transitions) - sent)
                    break
                if 200 <= response.status_code < 300:
                    sent += 1
                else:
                    log.warning("alert webhook answered %d for %s", response.status_code, t.alert.get("id"))
    except Exception:  # noqa: BLE001 - a webhook must never break the evaluator
        log.exception("alert webhook failed")
    return sent


# --- one evaluation ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Evaluation:
    """What one ``run_once`` did."""

    conditions: list[Condition]
    fired: list[dict[str, Any]]
    resolved: list[dict[str, Any]]
    skipped: str = ""
    """Why nothing was evaluated (``disabled``, ``locked``, ``redis error``), else empty."""

    def summary(self) -> dict[str, Any]:
        return {"fired": [a["id"] for a in self.fired], "resolved": [a["id"] for a in self.resolved],
                "firing": sum(c.firing for c in self.conditions), "skipped": self.skipped}

    def to_dict(self) -> dict[str, Any]:
        return {"conditions": [asdict(c) for c in self.conditions], "fired": self.fired,
                "resolved": self.resolved, "skipped": self.skipped}


_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def run_once(client: redis.Redis, keys: Keys, settings: AlertSettings, config: Mapping[str, Any], *,
             now: float | None = None) -> Evaluation:
    """Evaluate every rule once, store the transitions and post them to the webhook.

    Only one evaluation runs at a time across processes (a short Redis lock); a concurrent call
    returns at once with ``skipped="locked"``.
    """
    if not settings.enabled:
        return Evaluation([], [], [], skipped="disabled")
    now = time.time() if now is None else now
    token = uuid.uuid4().hex
    try:
        if not client.set(keys.alert_lock(), token, nx=True, px=int(max(10.0, 4 * settings.interval_s) * 1000)):
            return Evaluation([], [], [], skipped="locked")
    except redis.RedisError as exc:
        log.warning("alert evaluation skipped: %s", exc)
        return Evaluation([], [], [], skipped="redis error")
    try:
        store = AlertStore(client, keys, history_max=settings.history_max)
        snapshot = collect_snapshot(client, keys, settings, config, now=now)
        conditions, state = evaluate(snapshot, settings, store.load_state())
        transitions = store.apply(conditions, now=now, state=state)
    except redis.RedisError as exc:
        log.warning("alert evaluation skipped: %s", exc)
        return Evaluation([], [], [], skipped="redis error")
    finally:
        with contextlib.suppress(redis.RedisError):
            client.eval(_RELEASE, 1, keys.alert_lock(), token)
    for t in transitions:
        level = logging.WARNING if t.event == "fired" else logging.INFO
        log.log(level, "alert %s %s: %s", t.alert["id"], t.event, t.alert.get("message"))
    notify(settings.webhook_url, transitions, timeout_s=settings.webhook_timeout_s)
    return Evaluation(conditions, [t.alert for t in transitions if t.event == "fired"],
                      [t.alert for t in transitions if t.event == "resolved"])
