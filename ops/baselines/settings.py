"""Settings of the baseline workers, built once per process from the Cohort config and the environment.

Environment (read by ``load_baseline_settings`` only, never at import time):

- ``COHORT_CONFIG``: the Cohort config file whose tiers, prices and grouping limits are reused.
- ``COHORT_BASELINE_REDIS_URL``: broker and result backend of the baseline (default: Cohort's
  ``[redis].url`` / ``COHORT_REDIS_URL``). Give each system a db of its own.
- ``COHORT_BASELINE_TIER``: the one tier every prompt is sent to (default: the first ``[[tiers]]``).
- the tier's ``api_key_env`` variable (or ``COHORT_SECRETS_FILE``), as for Cohort.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from producers.errors import ConfigError
from producers.settings import read_config
from workers.settings import worker_settings
from workers.tiers.config import TierConfig, parse_routing, resolve_keys

REDIS_URL_ENV = "COHORT_BASELINE_REDIS_URL"
TIER_ENV = "COHORT_BASELINE_TIER"


@dataclass(frozen=True)
class BaselineSettings:
    """What a baseline worker needs."""

    redis_url: str
    """Broker and result backend (``COHORT_BASELINE_REDIS_URL``, default Cohort's Redis URL)."""
    tier: TierConfig
    """The one model every prompt goes to (``COHORT_BASELINE_TIER``, default the first tier)."""
    api_key: str | None
    """The tier's key (from its ``api_key_env``); ``None`` sends none."""
    batch_size: int = 16
    """celery-batches ``flush_every``: Cohort's ``[grouping] max_batch_size`` (default 16)."""
    flush_interval_s: float = 0.5
    """celery-batches ``flush_interval``: Cohort's ``[grouping] max_wait_s`` (default 0.5 s)."""
    max_tokens: int = 256
    """Output tokens asked per question (Cohort's default ``max_tokens``)."""
    max_tokens_limit: int = 32768
    """Largest ``max_tokens`` of one call (Cohort's ``[limits] max_tokens``)."""
    result_ttl_s: int = 3600
    """How long per-prompt results stay in the result backend (default one hour)."""


def baseline_settings(config: Mapping[str, object], env: Mapping[str, str]) -> BaselineSettings:
    """Build the settings from a parsed Cohort config; raises ``ConfigError`` naming the problem."""
    cohort = worker_settings(config, env)
    routing = parse_routing(config, env)
    name = env.get(TIER_ENV) or routing.tiers[0].name
    if name not in routing.names:
        raise ConfigError(f"{TIER_ENV}={name!r} names no tier; tiers are {', '.join(routing.names)}", key=TIER_ENV)
    tier = routing.tier(name)
    url = env.get(REDIS_URL_ENV) or cohort.producer.redis.url
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"{REDIS_URL_ENV} must start with redis://, rediss:// or unix://", key=REDIS_URL_ENV)
    return BaselineSettings(
        redis_url=url,
        tier=tier,
        api_key=resolve_keys(routing, env)[tier.name],
        batch_size=cohort.grouping.max_batch_size,
        flush_interval_s=max(0.01, cohort.grouping.max_wait_s),
        max_tokens_limit=cohort.producer.max_tokens_limit,
    )


@lru_cache(maxsize=1)
def load_baseline_settings() -> BaselineSettings:
    """The settings of this process, read once from ``COHORT_CONFIG`` and the environment."""
    return baseline_settings(read_config(None, os.environ), os.environ)
