"""The grouping tick: claim pending items, coalesce duplicates, cluster, flush batches.

One tick, run by Celery beat every ``interval_s`` (and at once when a producer fills a
partition), under a Redis lock so that one grouper runs at a time however many nodes exist:

1. claim new item ids from the pending stream, move them into the open pool and coalesce exact
   duplicates onto leaders (no embedding needed);
2. embed the open items (cached by text hash), oldest first, as far as the time left before the
   oldest item falls due allows (see ``ENCODER_GRACE_S``), and coalesce strict near-duplicates;
   the encoder never holds a flush back longer: an item still without an embedding when it falls
   due is flushed without one (``embed_late`` reverses that choice);
3. cluster each partition's embedded open items by cosine similarity (``workers.clustering``);
4. flush a batch when a cluster is full, when a partition holds a full batch, when the oldest
   item has waited ``max_wait_s``, or when an item's deadline is near; items sharing a context
   (explicit, or a long common prompt prefix) are flushed together as one packed batch. Items that
   no packed call could make cheaper (no shared context, a short system message) are not held
   at all (``wait_for_packing_only``): they go at the next tick;
5. record each batch in Redis before sending its task, and send again any batch whose task was
   never confirmed sent or has outlived the broker's redelivery window (``workers.batch_ledger``).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import redis

from producers.errors import (
    CohortError,
    DeadlineExceeded,
    GrouperLockLost,
    InvalidPrompt,
    ItemFailed,
)
from producers.keys import Keys
from producers.schema import PromptItem
from workers.batch_ledger import BatchLedger, Dispatch
from workers.clustering import cluster, cpu_threads
from workers.coalescing import Attach, Marker, coalescing_scope
from workers.delivery import Finisher
from workers.encoder import CachedEncoder, text_hash
from workers.locks import EXTEND_IF_OWNER, RELEASE_IF_OWNER
from workers.packing import packing_saves, prefix_key
from workers.pending import PendingStream
from workers.sameness import exact_digest, strict_signature
from workers.settings import WorkerSettings
from workers.telemetry import DispatchedBatch, Telemetry

log = logging.getLogger("cohort.grouper")

LOCK_TTL_MS = 30_000
DEADLINE_MARGIN_S = 0.25
ENCODER_GRACE_S = 0.1
"""How long the encoder may keep an item waiting past its due time. An item that is not held
(nothing to pack) counts as due one beat interval after its submission: it cannot go sooner
anyway. Under overload, items claimed later than that are not embedded, which keeps ticks short."""


@dataclass
class OpenItem:
    item: PromptItem
    group: str
    """Partition, plus the context key when the item shares a context with others."""
    context_key: str | None
    needs_vector: bool
    """False for items packed by a shared prompt prefix: their (long) text is never embedded."""
    near_pending: bool
    """Still to be tested against near duplicates once embedded."""
    wait_s: float
    """How long the item may be held for others to share its call (``max_wait_s``, or 0 where
    holding it cannot save anything)."""
    vector: np.ndarray | None = None


@dataclass(frozen=True)
class TickReport:
    ran: bool
    claimed: int = 0
    coalesced: int = 0
    batches: int = 0
    dispatched_items: int = 0
    open_items: int = 0
    duration_s: float = 0.0
    next_due_s: float | None = None
    """Seconds until the earliest open item is due to be flushed (``None``: nothing open)."""


class Grouper:
    """Forms batches from pending items. One per grouper process; state is rebuilt from Redis."""

    def __init__(self, settings: WorkerSettings, client: redis.Redis, *, encoder: CachedEncoder,
                 dispatch: Dispatch, telemetry: Telemetry | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.grouping = settings.grouping
        self.keys: Keys = settings.producer.redis.keys
        self._redis = client
        self._encoder = encoder
        self._telemetry = telemetry or Telemetry(client, self.keys)
        self._clock = clock
        self._stream = PendingStream(client, self.keys)
        self._finisher = Finisher(settings, client, telemetry=self._telemetry)
        self._writer = self._finisher.writer
        self._coalescing = self._finisher.coalescing
        self._release = client.register_script(RELEASE_IF_OWNER)
        self._ledger = BatchLedger(settings, client, dispatch=dispatch, finisher=self._finisher, clock=clock)
        self._extend = client.register_script(EXTEND_IF_OWNER)
        self._open: dict[str, OpenItem] = {}
        self._generation: int | None = None

    def warm_up(self) -> None:
        """Load the encoder now rather than on the first tick."""
        self._encoder.encoder.encode(["warm up"])

    # --- the tick ----------------------------------------------------------------------
    def tick(self) -> TickReport:
        """Run one grouping tick if this process can take the grouper lock."""
        token = uuid.uuid4().hex
        if not self._redis.set(self.keys.grouper_lock(), token, nx=True, px=LOCK_TTL_MS):
            return TickReport(ran=False)
        started = time.perf_counter()
        try:
            self._reconcile()
            claimed, coalesced = self._claim()
            self._keep_lock(token)
            coalesced += self._embed_open()
            self._keep_lock(token)
            batches, items = self._flush()
            self._fail_overdue_followers()
            self._ledger.sweep()
        except BaseException:
            self._generation = None  # the pool in memory may disagree with Redis: reload it next tick
            raise
        finally:
            self._release(keys=[self.keys.grouper_lock()], args=[token])
        duration = time.perf_counter() - started
        self._telemetry.grouping_tick(duration_s=duration, claimed=claimed, dispatched=items,
                                      open_items=len(self._open))
        return TickReport(True, claimed, coalesced, batches, items, len(self._open), duration, self._next_due())

    def _keep_lock(self, token: str) -> None:
        """Extend the lock after a long stage; stop the tick if another grouper holds it now."""
        if not self._extend(keys=[self.keys.grouper_lock()], args=[token, LOCK_TTL_MS]):
            raise GrouperLockLost("the grouper lock expired during a tick; another grouper took over")

    def _next_due(self) -> float | None:
        """When the next flush by wait or deadline falls due, so that it can be run on time."""
        if not self._open:
            return None
        return max(0.0, self._earliest_due() - self._clock())

    def _earliest_due(self) -> float:
        return min(self._due_at(e) for e in self._open.values())

    def _due_at(self, entry: OpenItem) -> float:
        """When the item must be flushed: its wait is up, or its deadline leaves no more time."""
        due = entry.item.submitted_at + entry.wait_s
        if entry.item.deadline is not None:
            due = min(due, entry.item.deadline - self.grouping.max_wait_s - DEADLINE_MARGIN_S)
        return due

    # --- open pool bookkeeping ---------------------------------------------------------
    def _reconcile(self) -> None:
        """Reload the open pool if another grouper process changed it since our last tick."""
        raw = self._redis.get(self._generation_key())
        current = int(raw) if raw else 0
        if self._generation == current:
            return
        ids = [i.decode() for i in self._redis.zrange(self.keys.open_pool(), 0, -1)]
        known = {i: self._open[i] for i in ids if i in self._open}
        missing = [i for i in ids if i not in known]
        self._open = known
        if missing:
            items, gone = self._load_items(missing)
            if gone:
                self._redis.zrem(self.keys.open_pool(), *gone)
            self._admit(items, coalesce=False)  # their leads live in Redis
        self._generation = current

    def _generation_key(self) -> str:
        return self.keys.open_generation()

    def _bump_generation(self, pipe: redis.client.Pipeline) -> None:
        pipe.incr(self._generation_key())

    def _load_items(self, item_ids: list[str]) -> tuple[list[PromptItem], list[str]]:
        """Bodies of items still waiting, and the ids that are not (already final, or failed here)."""
        finals = self._writer.finals(item_ids)
        items: list[PromptItem] = []
        gone: list[str] = []
        for start in range(0, len(item_ids), 1000):
            chunk = item_ids[start:start + 1000]
            for item_id, raw in zip(chunk, self._redis.mget([self.keys.item(i) for i in chunk]), strict=True):
                if item_id in finals:
                    gone.append(item_id)
                    continue
                if raw is None:
                    self._writer.fail(item_id, ItemFailed(
                        "the item's body expired from Redis before it was grouped", item_id=item_id))
                    gone.append(item_id)
                    continue
                try:
                    items.append(PromptItem.from_json(raw))
                except InvalidPrompt as exc:
                    self._writer.fail(item_id, exc)
                    gone.append(item_id)
        return items, gone

    # --- 1 and 2: claim, embed, coalesce ----------------------------------------------
    def _claim(self) -> tuple[int, int]:
        entries = self._stream.claim(self.grouping.claim_count)
        if not entries:
            return 0, 0
        items, _gone = self._load_items([e.item_id for e in entries])
        pipe = self._redis.pipeline(transaction=True)
        if items:
            pipe.zadd(self.keys.open_pool(), {item.id: item.submitted_at for item in items})
        for item in items:
            pipe.hset(self.keys.item_status(item.id), "status", "grouping")
        counts: dict[str, int] = defaultdict(int)
        for item in items:
            counts[item.partition] += 1
        for partition, count in counts.items():
            pipe.decrby(self.keys.partition_count(partition), count)
        self._stream.ack(pipe, [e.entry_id for e in entries])
        self._bump_generation(pipe)
        pipe.execute()
        self._generation = (self._generation or 0) + 1
        coalesced = self._admit(items, coalesce=True)
        return len(entries), coalesced

    def _admit(self, items: list[PromptItem], *, coalesce: bool) -> int:
        """Add items to the open pool; with ``coalesce``, join exact duplicates onto their leaders.

        Exact duplicates need no embedding: each item joins the leader of its exact digest (or is
        served its kept answer) or becomes that leader itself, all in one round trip. Near
        duplicates are tested once an item is embedded (``_embed_open``).
        """
        if not items:
            return 0
        coalescing = [item for item in items if coalesce and item.coalesce]
        markers = self._coalescing.attach_many([self._request(item, "exact", exact_digest(item.prompt))
                                                for item in coalescing])
        taken = {item.id for item, marker in zip(coalescing, markers, strict=True) if self._settle(item, marker)}
        near = self.grouping.coalesce_near_duplicates
        for item in items:
            if item.id in taken:
                continue
            context_key = self._context_key(item)
            prefix = _is_prefix(context_key)
            group = item.partition if context_key is None else f"{item.partition}#{context_key}"
            self._open[item.id] = OpenItem(item, group, context_key, needs_vector=not prefix,
                                           near_pending=coalesce and item.coalesce and near and not prefix,
                                           wait_s=self._wait_for(item, context_key))
        self._close(list(taken))
        return len(taken)

    def _request(self, item: PromptItem, kind: str, digest: str, *, join: bool = True,
                 may_lead: bool = True, leader: str | None = None) -> Attach:
        return Attach(partition=coalescing_scope(item), kind=kind, digest=digest, item_id=item.id,
                      text_hash=text_hash(item.prompt), status_key=self.keys.item_status(item.id),
                      may_lead=may_lead, join=join, expected_leader=leader)

    def _close(self, item_ids: list[str]) -> None:
        """Take coalesced items out of the open pool (they need no call of their own)."""
        if not item_ids:
            return
        for item_id in item_ids:
            self._open.pop(item_id, None)
        pipe = self._redis.pipeline(transaction=True)
        pipe.zrem(self.keys.open_pool(), *item_ids)
        self._bump_generation(pipe)
        pipe.execute()
        self._generation = (self._generation or 0) + 1

    def _wait_for(self, item: PromptItem, context_key: str | None) -> float:
        """``max_wait_s`` where items may be packed into one cheaper call; 0 where they never can."""
        if context_key is not None or not self.grouping.wait_for_packing_only:
            return self.grouping.max_wait_s
        full = [""] * self.grouping.max_batch_size
        packable = packing_saves(full, None, item.system, output_price_ratio=self.settings.output_price_ratio)
        return self.grouping.max_wait_s if packable else 0.0

    def _context_key(self, item: PromptItem) -> str | None:
        if not self.grouping.pack_contexts:
            return None
        if item.context:
            return "ctx:" + text_hash(item.context)[:16]
        key = prefix_key(item.prompt)
        return None if key is None else PREFIX_KEY + key

    # --- 2: embed within the time left, coalesce near duplicates ---------------------------
    def _embed_open(self) -> int:
        """Embed open items, oldest first, while the encoder can finish before the oldest item falls
        due (all of them with ``embed_late``); then test the newly embedded ones as near duplicates.
        Returns how many were coalesced."""
        waiting = sorted((e for e in self._open.values() if e.needs_vector and e.vector is None),
                         key=lambda e: e.item.submitted_at)
        if not waiting:
            return 0
        for entry, vector in zip(waiting, self._encoder.lookup([e.item.prompt for e in waiting]), strict=True):
            entry.vector = vector
        missing = [e for e in waiting if e.vector is None]
        # One encoder call: it sorts its texts by length, so fewer, larger calls pad less.
        chunk = missing if self.grouping.embed_late else missing[:self._affordable()]
        if chunk:
            try:
                vectors = self._encoder.compute([e.item.prompt for e in chunk])
            except Exception:  # the encoder failing must not stop grouping: items go without embeddings
                log.exception("the grouper's encoder failed on %d texts; they are grouped without embeddings",
                              len(chunk))
            else:
                for entry, vector in zip(chunk, vectors, strict=True):
                    entry.vector = vector
        taken = self._coalesce_near([e for e in waiting if e.vector is not None and e.near_pending])
        for entry in waiting:
            if entry.vector is not None:
                entry.near_pending = False
        self._close(taken)
        return len(taken)

    def _affordable(self) -> int:
        """How many texts the encoder can embed before an open item has waited too long for it."""
        embed_by = min(self._embed_by(e) for e in self._open.values())
        return self._encoder.pace.affordable(embed_by - self._clock())

    def _embed_by(self, entry: OpenItem) -> float:
        """Until when the encoder may keep the item waiting (see ``ENCODER_GRACE_S``)."""
        until = max(self._due_at(entry), entry.item.submitted_at + self.grouping.interval_s) + ENCODER_GRACE_S
        if entry.item.deadline is not None:
            until = min(until, entry.item.deadline - DEADLINE_MARGIN_S)
        return until

    def _coalesce_near(self, entries: list[OpenItem]) -> list[str]:
        """Near-duplicate coalescing of newly embedded items; returns the ids that need no call.

        An item joins a near duplicate only when the strict signatures are equal and the cosine of
        the embeddings reaches the threshold. Each item first leads its signature if no request
        holds it (without joining anyone); an item that finds another leader is compared with it,
        and joins it only if close enough; otherwise it neither joins nor leads. Three round trips
        for all the items, in order: a later item in the list can find an earlier one as leader.
        """
        signed = [(e, sig) for e in entries if (sig := strict_signature(e.item.prompt)) is not None]
        leads = self._coalescing.attach_many([self._request(e.item, "near", sig, join=False) for e, sig in signed])
        contested = [(e, sig, m) for (e, sig), m in zip(signed, leads, strict=True) if m.role == "other"]
        leader_vectors = self._encoder.cached_vectors([m.text_hash or "" for _, _, m in contested])
        close = [(e, sig, m.leader) for (e, sig, m), v in zip(contested, leader_vectors, strict=True)
                 if v is not None and e.vector is not None
                 and float(v @ e.vector) >= self.grouping.near_duplicate_threshold]
        joined = self._coalescing.attach_many([self._request(e.item, "near", sig, may_lead=False, leader=leader)
                                               for e, sig, leader in close])
        return [e.item.id for (e, _, _), m in zip(close, joined, strict=True) if self._settle(e.item, m)]

    def _settle(self, item: PromptItem, marker: Marker) -> bool:
        if marker.role == "follower":
            pipe = self._redis.pipeline(transaction=False)
            pipe.hset(self.keys.item_status(item.id), "status", "coalesced")
            if item.deadline is not None:
                pipe.zadd(self.keys.follower_deadlines(), {item.id: item.deadline})
            pipe.execute()
            return True
        if marker.role == "done" and marker.answer is not None:
            self._finisher.served(item, marker.answer)
            return True
        return False

    # --- 3 and 4: cluster and flush -----------------------------------------------------
    def _flush(self) -> tuple[int, int]:
        now = self._clock()
        self._fail_expired(now)
        by_group: dict[str, list[OpenItem]] = defaultdict(list)
        for entry in self._open.values():
            by_group[entry.group].append(entry)
        batches: list[tuple[list[OpenItem], str]] = []
        for group_items in by_group.values():
            group_items.sort(key=lambda e: e.item.submitted_at)
            if group_items[0].context_key is not None:
                batches += [(b, "packed") for b in self._flush_context_group(group_items, now)]
            else:
                batches += [(b, "cluster") for b in self._flush_partition(group_items, now)]
        self._record_and_dispatch(batches)
        return len(batches), sum(len(members) for members, _ in batches)

    def _due(self, members: list[OpenItem], now: float) -> bool:
        return any(self._due_at(m) <= now for m in members)

    def _flush_context_group(self, members: list[OpenItem], now: float) -> list[list[OpenItem]]:
        size = self.grouping.max_batch_size
        chunks = [members[i:i + size] for i in range(0, len(members), size)]
        return [c for c in chunks if len(c) == size or self._due(c, now)]

    def _flush_partition(self, members: list[OpenItem], now: float) -> list[list[OpenItem]]:
        size = self.grouping.max_batch_size
        if len(members) == 1:
            return [members] if self._due(members, now) else []
        embedded = [m for m in members if m.vector is not None]
        clusters: list[list[OpenItem]] = []
        if embedded:
            vectors = np.vstack([m.vector for m in embedded if m.vector is not None])
            with cpu_threads(self.grouping.encoder_threads):
                found = cluster(vectors, threshold=self.grouping.similarity_threshold, max_size=size)
            clusters = [[embedded[i] for i in c] for c in found]
        # An item the encoder has not reached yet waits for it until the item itself falls due; then
        # it goes as a cluster of its own.
        clusters += [[m] for m in members if m.vector is None and self._due([m], now)]
        ready = [c for c in clusters if len(c) == size]
        rest = [c for c in clusters if len(c) < size]
        rest.sort(key=lambda c: min(m.item.submitted_at for m in c))
        # Pack the remaining clusters, similar items side by side, into batches of at most ``size``.
        packed: list[list[OpenItem]] = []
        current: list[OpenItem] = []
        for members_of_cluster in rest:
            if len(current) + len(members_of_cluster) > size:
                packed.append(current)
                current = []
            current = current + members_of_cluster
        if current:
            packed.append(current)
        for batch in packed:
            if len(batch) >= size or self._due(batch, now):
                ready.append(batch)
        return ready

    def _fail_expired(self, now: float) -> None:
        expired = [e for e in self._open.values() if e.item.deadline is not None and e.item.deadline <= now]
        if not expired:
            return
        for entry in expired:
            error = DeadlineExceeded("deadline passed while the item waited for a batch",
                                     waited_s=round(now - entry.item.submitted_at, 3))
            self._finish_failed(entry, error)

    def _fail_overdue_followers(self) -> None:
        """Followers whose deadline passed before their leader was answered end failed (their own call)."""
        now = self._clock()
        overdue = [i.decode() for i in self._redis.zrangebyscore(self.keys.follower_deadlines(), "-inf", now)]
        if not overdue:
            return
        self._finisher.fail_ids(overdue, DeadlineExceeded(
            "deadline passed while the item waited for the answer of an identical request"))
        self._redis.zrem(self.keys.follower_deadlines(), *overdue)

    def _finish_failed(self, entry: OpenItem, error: CohortError) -> None:
        self._open.pop(entry.item.id, None)
        pipe = self._redis.pipeline(transaction=True)
        pipe.zrem(self.keys.open_pool(), entry.item.id)
        self._bump_generation(pipe)
        pipe.execute()
        self._generation = (self._generation or 0) + 1
        self._finisher.failed(entry.item, error)

    # --- 5: record and dispatch ------------------------------------------------------
    def _record_and_dispatch(self, batches: list[tuple[list[OpenItem], str]]) -> None:
        """Record the batches and take their items out of the open pool (one transaction), then
        send their tasks."""
        if not batches:
            return
        now = self._clock()
        batch_ids = [uuid.uuid4().hex for _ in batches]
        pipe = self._redis.pipeline(transaction=True)
        for batch_id, (members, kind) in zip(batch_ids, batches, strict=True):
            self._ledger.record(pipe, batch_id, [m.item.id for m in members], kind=kind,
                                tenant=members[0].item.tenant, now=now)
            pipe.zrem(self.keys.open_pool(), *[m.item.id for m in members])
            for m in members:
                pipe.hset(self.keys.item_status(m.item.id), mapping={"status": "batched", "batch": batch_id})
        self._bump_generation(pipe)
        pipe.execute()
        self._generation = (self._generation or 0) + 1
        for members, _ in batches:
            for m in members:
                self._open.pop(m.item.id, None)
        self._ledger.send([(batch_id, len(members)) for batch_id, (members, _) in zip(batch_ids, batches, strict=True)])
        self._telemetry.batches_dispatched([
            DispatchedBatch(len(members), kind, members[0].item.tenant,
                            unembedded=sum(m.needs_vector and m.vector is None for m in members))
            for members, kind in batches])


PREFIX_KEY = "pre:"


def _is_prefix(context_key: str | None) -> bool:
    return context_key is not None and context_key.startswith(PREFIX_KEY)
