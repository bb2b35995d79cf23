"""Every Redis key Cohort uses, built here and nowhere else, under one prefix.

Results are the one exception to the prefix: they live where Celery's Redis result backend
keeps them (``celery-task-meta-<id>``) so that ``AsyncResult(id).get()`` works from any client.
"""

from __future__ import annotations

from dataclasses import dataclass

CELERY_RESULT_PREFIX = "celery-task-meta-"
GROUPER_CONSUMER_GROUP = "groupers"


@dataclass(frozen=True)
class Keys:
    """Key builders for one deployment (one prefix)."""

    prefix: str = "cohort"

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # --- submission and grouping -------------------------------------------------------
    def item(self, item_id: str) -> str:
        """JSON body of one item (``PromptItem.to_json``)."""
        return self._k("item", item_id)

    def pending_stream(self) -> str:
        """Stream of submitted item ids, read by the grouper through a consumer group."""
        return self._k("pending")

    def open_pool(self) -> str:
        """Sorted set of item ids claimed by the grouper and not yet in a batch (score: submit time)."""
        return self._k("open")

    def open_meta(self) -> str:
        """Hash item id -> partition, for the items of the open pool."""
        return self._k("open", "meta")

    def partition_count(self, partition: str) -> str:
        """Counter of pending items per partition, to flush a full partition before the next tick."""
        return self._k("pcount", partition)

    def flush_trigger(self) -> str:
        """Short-lived flag: a grouping tick has been requested because a partition filled up."""
        return self._k("flush", "trigger")

    def due_trigger(self) -> str:
        """Short-lived flag: a tick has been scheduled for the moment the oldest open item falls due."""
        return self._k("flush", "due")

    def open_generation(self) -> str:
        """Counter bumped by every change of the open pool, so a grouper process knows when to reload it."""
        return self._k("open", "gen")

    def follower_deadlines(self) -> str:
        """Sorted set of coalesced followers that have a deadline (score: the deadline)."""
        return self._k("co", "deadlines")

    def grouper_lock(self) -> str:
        return self._k("lock", "grouper")

    def embedding(self, text_hash: str, encoder: str) -> str:
        """Cached embedding (float32 bytes) of a text under one encoder."""
        return self._k("emb", encoder, text_hash)

    # --- batches and delivery ----------------------------------------------------------
    def batch(self, batch_id: str) -> str:
        """JSON record of one batch: item ids, kind, dispatch count."""
        return self._k("batch", batch_id)

    def batch_lock(self, batch_id: str) -> str:
        """Held while a delivery of the batch runs, so a duplicate delivery does not run it twice at once."""
        return self._k("batch", batch_id, "running")

    def inflight(self) -> str:
        """Sorted set of batch ids dispatched and not completed (score: last dispatch time)."""
        return self._k("inflight")

    def result(self, item_id: str) -> str:
        """Celery's result key of the item (final answer or error)."""
        return f"{CELERY_RESULT_PREFIX}{item_id}"

    def item_status(self, item_id: str) -> str:
        """Hash of an item's progress (status, batch, attempts) for status queries."""
        return self._k("status", item_id)

    def answer_claim(self, item_id: str) -> str:
        """Set once an upstream answer for the item is being produced (for duplicate-call counting)."""
        return self._k("claim", item_id)

    # --- coalescing and cache ----------------------------------------------------------
    def coalesce(self, partition: str, kind: str, digest: str) -> str:
        """Marker of one request's answer: ``kind`` is ``exact`` (normalized text) or ``near`` (strict signature)."""
        return self._k("co", kind, partition, digest)

    def coalesce_followers(self, partition: str, kind: str, digest: str) -> str:
        """List of item ids waiting for the answer of a coalescing leader."""
        return self._k("co", kind, partition, digest, "followers")

    def semantic_cache_index(self, tenant: str, partition: str) -> str:
        return self._k("cache", tenant, partition, "index")

    def semantic_cache_entry(self, tenant: str, partition: str, entry_id: str) -> str:
        return self._k("cache", tenant, partition, "entry", entry_id)

    # --- tiers, circuits, budgets, rate limits ------------------------------------------
    def circuit(self, tier: str) -> str:
        return self._k("circuit", tier)

    def circuit_probe(self, tier: str) -> str:
        """Held (SET NX, with expiry) by the one worker probing a half-open circuit."""
        return self._k("circuit", tier, "probe")

    def tier_disabled(self, tier: str) -> str:
        return self._k("tier", tier, "disabled")

    def rate_window(self, tier: str, kind: str, window: int) -> str:
        return self._k("rate", tier, kind, str(window))

    def budget(self, scope: str, period: str) -> str:
        """Spend of a scope (``global`` or ``tenant:<name>``) in a period (``day:YYYY-MM-DD``...)."""
        return self._k("budget", scope, period)

    def budget_holds(self, scope: str, period: str) -> str:
        """Sorted set of the open reservations on a budget (score: expiry), so crashed calls release."""
        return self._k("budget", scope, period, "holds")

    def attempts(self, item_id: str) -> str:
        return self._k("attempts", item_id)

    # --- observability -----------------------------------------------------------------
    def events(self) -> str:
        """Stream of item outcome and upstream call events (bounded), read by reports and metrics."""
        return self._k("events")

    def counters(self) -> str:
        """Hash of running totals (items, calls, tokens, cost)."""
        return self._k("counters")

    def alerts(self) -> str:
        """Hash of the active alerts: alert id -> JSON record (one entry while active: deduplicated)."""
        return self._k("alerts")

    def alert_history(self) -> str:
        """Capped list of alert transitions (fired, resolved), newest first."""
        return self._k("alerts", "history")

    def alert_state(self) -> str:
        """Hash of the alert evaluator's own memory between runs (e.g. when pending depth began to grow)."""
        return self._k("alerts", "state")

    def alert_lock(self) -> str:
        """Short-lived lock so that one alert evaluation runs at a time across processes."""
        return self._k("alerts", "lock")

    def metric_counters(self) -> str:
        """Hash of labelled running counters: ``name|{"label":"value"}`` -> number."""
        return self._k("obs", "counters")

    def metric_histograms(self) -> str:
        """Hash of histogram buckets: ``name|{labels}|<upper bound>``, ``...|sum``, ``...|count``."""
        return self._k("obs", "hist")

    def metric_gauges(self) -> str:
        """Hash of last-known values written by roles (e.g. the grouper's open items)."""
        return self._k("obs", "gauges")

    def metric_window(self, second: int) -> str:
        """Hash of the figures of one wall-clock second (expires): live rates and alert windows."""
        return self._k("obs", "win", str(second))

    def circuit_transitions(self) -> str:
        """Hash tier -> JSON of the last circuit transition recorded by telemetry."""
        return self._k("obs", "circuits")

    def heartbeat(self, node: str) -> str:
        return self._k("heartbeat", node)

    def heartbeats(self) -> str:
        return self._k("heartbeats")

    def api_rate(self, tenant: str, window: int) -> str:
        """Requests of a tenant to the HTTP API in one rate-limit window (a minute index)."""
        return self._k("api", "rate", tenant, str(window))

    def broker_queue(self, queue: str) -> str:
        """Celery's Redis list of the tasks waiting in ``queue`` (Celery's own key: no prefix)."""
        return queue
