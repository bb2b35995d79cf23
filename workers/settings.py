"""Worker-side settings: grouping, delivery, and the parsed config the tiers are built from."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from producers.errors import ConfigError
from producers.settings import (
    ProducerSettings,
    check_keys,
    producer_settings,
    read_config,
    section,
    typed,
)
from workers.tiers.config import BudgetConfig, RoutingConfig, parse_budgets, parse_routing

QUANTIZE_CHOICES = ("auto", "int8", "none")


@dataclass(frozen=True)
class GroupingSettings:
    """How the grouping beat task forms batches."""

    interval_s: float = 0.25
    """Beat period of the grouping task (default 250 ms)."""
    similarity_threshold: float = 0.85
    """Cosine similarity for an item to join a cluster (default 0.85)."""
    max_batch_size: int = 16
    """A cluster is flushed when it holds this many items (default 16)."""
    max_wait_s: float = 0.5
    """A cluster is flushed when its oldest item has waited this long (default 0.5 s)."""
    encoder: str = "all-MiniLM-L6-v2"
    """Encoder name (the packaged all-MiniLM-L6-v2) or the directory of a sentence-transformers model."""
    encoder_quantize: str = "auto"
    """``auto`` (int8 where the CPU has VNNI or AMX, float elsewhere), ``int8`` or ``none``: dynamic int8
    quantization of a float encoder at load time (about 1.6x the rate at a mean cosine of 0.995)."""
    claim_count: int = 1024
    """Most new items claimed per tick, so a tick stays short under a backlog."""
    embed_late: bool = False
    """Embed every item before it is flushed, even when the encoder falls behind and items wait past
    ``max_wait_s`` (favours near-duplicate coalescing over latency). By default the grouper embeds only
    what it can before the oldest item falls due, and items still without an embedding when they fall
    due are flushed without one (exact-duplicate coalescing still applies to them)."""
    encoder_threads: int = 1
    """CPU threads of the encoder and of clustering's matrix products; 0 keeps the libraries' default.
    Default 1, for a grouper that shares its cores with workers: on two busy cores one thread embedded
    twice as fast as two, while on two idle cores two threads embed 1.8x as fast as one
    (``ops.bench_grouper``). Give a grouper with cores of its own more threads."""
    coalesce_near_duplicates: bool = True
    """Answer near-identical prompts once when the strict sameness test agrees (default on)."""
    near_duplicate_threshold: float = 0.9
    """Cosine two near-duplicates must also reach, besides equal strict signatures (default 0.9)."""
    coalesce_window_s: int = 600
    """How long an answer is reused for exact duplicates of its prompt (default 10 minutes)."""
    pack_contexts: bool = True
    """Pack items that share a context into one call (default on)."""
    wait_for_packing_only: bool = True
    """Hold items up to ``max_wait_s`` only where one packed call can cost less than separate calls
    (a shared context or a long system message). Other items go at the next tick: holding them saves
    nothing, because a duplicate that arrives later still joins its leader while it is in flight."""


@dataclass(frozen=True)
class DeliverySettings:
    """Delivery guarantees: see README, 'Nothing lost'."""

    visibility_timeout_s: int = 600
    """Redis broker visibility timeout: unacknowledged batches are redelivered after it."""
    max_redeliveries: int = 3
    """A batch delivered more often than this fails its unanswered items."""
    task_time_limit_s: int = 300
    """Hard time limit of one batch task (kept below the visibility timeout)."""
    redispatch_after_s: float = 5.0
    """A batch recorded but not confirmed dispatched after this long is dispatched again."""
    lost_batch_after_s: float = 900.0
    """A dispatched batch not completed after this long is dispatched again (a broker that lost it)."""


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker, beat or grouper needs, built once per process."""

    producer: ProducerSettings
    grouping: GroupingSettings = field(default_factory=GroupingSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    routing: RoutingConfig | None = None
    """The tier chain and its retry, circuit and rate-limit settings (``[[tiers]]``, ``[routing]``)."""
    budgets: BudgetConfig = field(default_factory=BudgetConfig)
    """Spend caps (``[budgets]``)."""
    config: Mapping[str, Any] = field(default_factory=dict)
    """The parsed config file (alerts and monitor settings are read from it by their own modules)."""

    @property
    def primary_prices(self) -> tuple[float, float] | None:
        """Prices per 1k input and output tokens of the first tier: the one-call-per-prompt baseline."""
        if self.routing is None or not self.routing.tiers:
            return None
        primary = self.routing.tiers[0]
        return primary.price_in_per_1k, primary.price_out_per_1k

    @property
    def output_price_ratio(self) -> float:
        """Price of an output token over an input token on the primary tier (1 when unknown)."""
        prices = self.primary_prices
        return prices[1] / prices[0] if prices and prices[0] > 0 else 1.0


def worker_settings(config: Mapping[str, Any], env: Mapping[str, str] | None = None) -> WorkerSettings:
    grouping = section(config, "grouping")
    check_keys(grouping, set(GroupingSettings.__dataclass_fields__), where="grouping")
    delivery = section(config, "delivery")
    check_keys(delivery, set(DeliverySettings.__dataclass_fields__), where="delivery")
    g = GroupingSettings(
        interval_s=typed(grouping, "interval_s", float, 0.25, where="grouping", minimum=0.01, maximum=60),
        similarity_threshold=typed(grouping, "similarity_threshold", float, 0.85, where="grouping",
                                   minimum=0.0, maximum=1.0),
        max_batch_size=typed(grouping, "max_batch_size", int, 16, where="grouping", minimum=1, maximum=256),
        max_wait_s=typed(grouping, "max_wait_s", float, 0.5, where="grouping", minimum=0.0, maximum=3600),
        encoder=typed(grouping, "encoder", str, "all-MiniLM-L6-v2", where="grouping"),
        encoder_quantize=typed(grouping, "encoder_quantize", str, "auto", where="grouping"),
        claim_count=typed(grouping, "claim_count", int, 1024, where="grouping", minimum=1),
        embed_late=typed(grouping, "embed_late", bool, False, where="grouping"),
        encoder_threads=typed(grouping, "encoder_threads", int, 1, where="grouping", minimum=0, maximum=256),
        coalesce_near_duplicates=typed(grouping, "coalesce_near_duplicates", bool, True, where="grouping"),
        pack_contexts=typed(grouping, "pack_contexts", bool, True, where="grouping"),
        wait_for_packing_only=typed(grouping, "wait_for_packing_only", bool, True, where="grouping"),
        near_duplicate_threshold=typed(grouping, "near_duplicate_threshold", float, 0.9, where="grouping",
                                       minimum=0.0, maximum=1.0),
        coalesce_window_s=typed(grouping, "coalesce_window_s", int, 600, where="grouping", minimum=0),
    )
    if g.encoder_quantize not in QUANTIZE_CHOICES:
        raise ConfigError(f"grouping.encoder_quantize must be one of {', '.join(QUANTIZE_CHOICES)}; "
                          f"got {g.encoder_quantize!r}", key="grouping.encoder_quantize")
    d = DeliverySettings(
        visibility_timeout_s=typed(delivery, "visibility_timeout_s", int, 600, where="delivery", minimum=1),
        max_redeliveries=typed(delivery, "max_redeliveries", int, 3, where="delivery", minimum=0),
        task_time_limit_s=typed(delivery, "task_time_limit_s", int, 300, where="delivery", minimum=1),
        redispatch_after_s=typed(delivery, "redispatch_after_s", float, 5.0, where="delivery", minimum=0.1),
        lost_batch_after_s=typed(delivery, "lost_batch_after_s", float, 900.0, where="delivery", minimum=1.0),
    )
    if d.task_time_limit_s >= d.visibility_timeout_s:
        raise ConfigError("delivery.task_time_limit_s must be below delivery.visibility_timeout_s, or a running "
                          "batch would be redelivered while it runs", key="delivery.task_time_limit_s")
    routing = parse_routing(config, env) if "tiers" in config else None
    return WorkerSettings(producer=producer_settings(config, env), grouping=g, delivery=d, routing=routing,
                          budgets=parse_budgets(config), config=config)


@lru_cache(maxsize=1)
def load_worker_settings() -> WorkerSettings:
    """The settings of this process, read once from ``COHORT_CONFIG`` and the environment."""
    return worker_settings(read_config(None, os.environ), os.environ)
