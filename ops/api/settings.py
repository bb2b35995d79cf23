"""Settings of the HTTP front door, read once at start-up from ``[api]`` and ``[tenants.*]``.

``[api]`` keys (all optional; defaults shown)::

    [api]
    host = "127.0.0.1"          # address `python -m ops.api` binds
    port = 8000                 # port `python -m ops.api` binds
    require_auth = true         # false only for the demo: requests without a key act as anonymous_tenant
    anonymous_tenant = "default"
    rate_limit_rpm = 600        # per-tenant requests per minute (0 = unlimited); [tenants.X] rate_limit_rpm overrides
    chat_timeout_s = 60.0       # how long /v1/chat/completions waits for the answer before 504
    max_wait_s = 60.0           # longest long-poll wait accepted by the status endpoints
    max_items_per_request = 1000
    max_body_bytes = 4194304
    public_health = true        # /healthz and /readyz answer without a key (for probes)
    public_docs = true          # /openapi.json and /docs answer without a key
    threads = 32                # threads for blocking Redis calls (submit, status, rate limit)
    poll_interval_s = 0.01      # how often waiting requests look for their results
    heartbeat_max_age_s = 30.0  # a worker whose heartbeat is older is not counted alive
    min_workers = 1             # /readyz fails with fewer live workers
    max_queue_depth = 0         # /readyz fails above this many waiting items (0 = no limit)
    stream_chunk_chars = 32     # size of the content pieces of a simulated stream

    [api.keys]                  # sha256 hex digest of a key -> tenant
    "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08" = "acme"

Raw keys may also come from the environment: ``[tenants.acme] api_keys_env = "ACME_API_KEYS"``
names a variable holding comma-separated keys; they are hashed at start-up and only the digests
are kept.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from producers.errors import ConfigError
from producers.settings import ProducerSettings, check_keys, producer_settings, read_config, section, typed

logger = logging.getLogger("cohort.api")

MIN_KEY_CHARS = 16
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_API_KEYS = {
    "host", "port", "require_auth", "anonymous_tenant", "rate_limit_rpm", "chat_timeout_s", "max_wait_s",
    "max_items_per_request", "max_body_bytes", "public_health", "public_docs", "threads", "poll_interval_s",
    "heartbeat_max_age_s", "min_workers", "max_queue_depth", "stream_chunk_chars", "keys",
}


def hash_key(raw: str) -> str:
    """The sha256 hex digest under which an API key is stored."""
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ApiSettings:
    """Everything the HTTP service needs, built once per process."""

    producer: ProducerSettings
    host: str = "127.0.0.1"
    """Address ``python -m ops.api`` binds (default loopback)."""
    port: int = 8000
    """Port ``python -m ops.api`` binds (default 8000)."""
    require_auth: bool = True
    """Refuse requests without a valid key (default on; off only for the demo)."""
    anonymous_tenant: str = "default"
    """Tenant of keyless requests when ``require_auth`` is off."""
    key_digests: Mapping[str, str] = field(default_factory=dict)
    """sha256 hex digest of each accepted key -> its tenant. Raw keys are never kept."""
    rate_limit_rpm: int = 600
    """Default per-tenant limit in requests per minute; 0 = unlimited (default 600)."""
    tenant_rate_limits: Mapping[str, int] = field(default_factory=dict)
    """Per-tenant overrides of ``rate_limit_rpm``."""
    chat_timeout_s: float = 60.0
    """How long the chat endpoint waits for an answer before answering 504 (default 60 s)."""
    max_wait_s: float = 60.0
    """Longest long-poll wait of the status endpoints; longer requests are cut to it (default 60 s)."""
    max_items_per_request: int = 1000
    """Most prompts per submit and ids per batch-status request (default 1,000)."""
    max_body_bytes: int = 4 * 1024 * 1024
    """Largest request body accepted; larger ones get 413 (default 4 MiB)."""
    public_health: bool = True
    """Health and readiness answer without a key, for probes (default on; they reveal only counts)."""
    public_docs: bool = True
    """The OpenAPI document and /docs answer without a key (default on)."""
    threads: int = 32
    """Threads running blocking Redis calls (default 32)."""
    poll_interval_s: float = 0.01
    """Period at which waiting requests look for their results (default 10 ms)."""
    heartbeat_max_age_s: float = 30.0
    """A worker heartbeat older than this does not count as alive (default 30 s)."""
    min_workers: int = 1
    """Readiness needs at least this many live workers (default 1; 0 to ignore workers)."""
    max_queue_depth: int = 0
    """Readiness fails when more items than this wait (default 0 = no limit)."""
    stream_chunk_chars: int = 32
    """Approximate size of the content pieces of a simulated stream (default 32 characters)."""
    tiers: tuple[str, ...] = ()
    """Tier names from ``[[tiers]]``: a chat ``model`` naming one pins that tier."""

    def rate_limit_for(self, tenant: str) -> int:
        """Requests per minute allowed to ``tenant`` (0 = unlimited)."""
        return self.tenant_rate_limits.get(tenant, self.rate_limit_rpm)


def api_settings(config: Mapping[str, Any], env: Mapping[str, str] | None = None, *,
                 require_auth: bool | None = None) -> ApiSettings:
    """Build the API settings from a parsed config; raises ``ConfigError`` naming the bad key.

    Args:
        config: the parsed TOML config (``read_config``).
        env: the environment (for key variables and Redis overrides); defaults to ``os.environ``.
        require_auth: overrides ``[api] require_auth`` (the ``--demo`` flag passes ``False``).
    """
    env = os.environ if env is None else env
    producer = producer_settings(config, env)
    table = section(config, "api")
    check_keys(table, _API_KEYS, where="api")
    w = "api"
    settings = ApiSettings(
        producer=producer,
        host=typed(table, "host", str, "127.0.0.1", where=w),
        port=typed(table, "port", int, 8000, where=w, minimum=0, maximum=65535),
        require_auth=typed(table, "require_auth", bool, True, where=w),
        anonymous_tenant=typed(table, "anonymous_tenant", str, "default", where=w),
        rate_limit_rpm=typed(table, "rate_limit_rpm", int, 600, where=w, minimum=0),
        chat_timeout_s=typed(table, "chat_timeout_s", float, 60.0, where=w, minimum=0.1, maximum=3600),
        max_wait_s=typed(table, "max_wait_s", float, 60.0, where=w, minimum=0.0, maximum=3600),
        max_items_per_request=typed(table, "max_items_per_request", int, 1000, where=w, minimum=1,
                                    maximum=100_000),
        max_body_bytes=typed(table, "max_body_bytes", int, 4 * 1024 * 1024, where=w, minimum=1024),
        public_health=typed(table, "public_health", bool, True, where=w),
        public_docs=typed(table, "public_docs", bool, True, where=w),
        threads=typed(table, "threads", int, 32, where=w, minimum=1, maximum=1024),
        poll_interval_s=typed(table, "poll_interval_s", float, 0.01, where=w, minimum=0.001, maximum=5),
        heartbeat_max_age_s=typed(table, "heartbeat_max_age_s", float, 30.0, where=w, minimum=1),
        min_workers=typed(table, "min_workers", int, 1, where=w, minimum=0),
        max_queue_depth=typed(table, "max_queue_depth", int, 0, where=w, minimum=0),
        stream_chunk_chars=typed(table, "stream_chunk_chars", int, 32, where=w, minimum=1),
        key_digests=_key_digests(config, table, producer, env),
        tenant_rate_limits=_tenant_rate_limits(config),
        tiers=_tier_names(config),
    )
    if require_auth is not None:
        settings = replace(settings, require_auth=require_auth)
    # The anonymous tenant is used only without auth; its name must still be valid.
    _check_tenant(settings.anonymous_tenant, producer if not settings.require_auth else
                  replace(producer, tenants=None), where="api.anonymous_tenant")
    if settings.require_auth and not settings.key_digests:
        raise ConfigError("[api] require_auth is on but no API key is configured: add [api.keys] or "
                          "[tenants.NAME] api_keys_env (or run the demo with --demo)", key="api.keys")
    return settings


def load_api_settings(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None, *,
                      require_auth: bool | None = None) -> ApiSettings:
    """Read the config file (``COHORT_CONFIG`` by default) and the environment once."""
    env = os.environ if env is None else env
    return api_settings(read_config(path, env), env, require_auth=require_auth)


def _check_tenant(tenant: str, producer: ProducerSettings, *, where: str) -> None:
    if not tenant or any(c in tenant for c in "/:{} \t\n"):
        raise ConfigError(f"{where} must be a tenant name without '/', ':', braces or spaces", key=where)
    if producer.tenants is not None and tenant not in producer.tenants:
        raise ConfigError(f"{where} names tenant {tenant!r}, which is not in [tenants]", key=where)


def _key_digests(config: Mapping[str, Any], table: Mapping[str, Any], producer: ProducerSettings,
                 env: Mapping[str, str]) -> dict[str, str]:
    digests: dict[str, str] = {}

    def add(digest: str, tenant: str, where: str) -> None:
        _check_tenant(tenant, producer, where=where)
        if digests.get(digest, tenant) != tenant:
            raise ConfigError(f"{where}: one API key is mapped to two tenants", key=where)
        digests[digest] = tenant

    keys_table = table.get("keys", {})
    if not isinstance(keys_table, dict):
        raise ConfigError("[api.keys] must be a table of sha256 hex digest -> tenant", key="api.keys")
    for digest, tenant in keys_table.items():
        # The digest is a hash, not a secret, but it is still not echoed: an error names its position.
        if not _HEX64.match(digest):
            raise ConfigError("[api.keys]: every key must be a lowercase sha256 hex digest (64 characters), "
                              f"entry for tenant {tenant!r} is not", key="api.keys")
        if not isinstance(tenant, str):
            raise ConfigError("[api.keys]: every value must be a tenant name", key="api.keys")
        add(digest, tenant, "api.keys")
    for tenant, policy in section(config, "tenants").items():
        if not isinstance(policy, dict) or "api_keys_env" not in policy:
            continue
        where = f"tenants.{tenant}.api_keys_env"
        variable = typed(policy, "api_keys_env", str, "", where=f"tenants.{tenant}")
        raw = env.get(variable)
        if raw is None:
            logger.warning("%s names %s, which is not set: tenant %s has no keys from it", where, variable, tenant)
            continue
        for position, key in enumerate(k.strip() for k in raw.split(",")):
            if not key:
                continue
            if len(key) < MIN_KEY_CHARS:
                raise ConfigError(f"{where}: key #{position + 1} in ${variable} is shorter than "
                                  f"{MIN_KEY_CHARS} characters", key=where)
            add(hash_key(key), tenant, where)
    return digests


def _tenant_rate_limits(config: Mapping[str, Any]) -> dict[str, int]:
    limits: dict[str, int] = {}
    for tenant, policy in section(config, "tenants").items():
        if isinstance(policy, dict) and "rate_limit_rpm" in policy:
            limits[tenant] = typed(policy, "rate_limit_rpm", int, 0, where=f"tenants.{tenant}", minimum=0)
    return limits


def _tier_names(config: Mapping[str, Any]) -> tuple[str, ...]:
    tiers = config.get("tiers", [])
    if not isinstance(tiers, list):
        return ()
    return tuple(t["name"] for t in tiers if isinstance(t, dict) and isinstance(t.get("name"), str))
