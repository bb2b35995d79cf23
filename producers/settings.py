"""Settings shared by every role, built once at start-up from the environment and a TOML file.

Environment variables (read only by ``load_settings``, never at import time):

- ``COHORT_CONFIG``: path of the TOML config file (default: the packaged ``ops/cohort.toml``).
- ``COHORT_REDIS_URL``: overrides ``[redis].url`` (``redis://``, ``rediss://`` with password).
- ``COHORT_KEY_PREFIX``: overrides ``[redis].key_prefix``.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from producers.errors import ConfigError
from producers.keys import Keys

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "ops" / "cohort.toml"


@dataclass(frozen=True)
class RedisSettings:
    """Where Cohort's Redis is."""

    url: str = "redis://127.0.0.1:6379/0"
    """Redis URL for items, broker and results (``rediss://`` for TLS, ``redis://:password@host``)."""
    key_prefix: str = "cohort"
    """Prefix of every key Cohort writes (results excepted: Celery's own keys)."""

    @property
    def keys(self) -> Keys:
        return Keys(self.key_prefix)


@dataclass(frozen=True)
class TenantPolicy:
    """Per-tenant switches."""

    coalesce: bool = True
    """Answer exact and near-identical prompts of this tenant once (default on)."""
    cache_ttl_s: float = 0.0
    """Semantic result cache lifetime in seconds; 0 disables the cache (default off)."""


@dataclass(frozen=True)
class ProducerSettings:
    """What a producer needs: Redis, limits, tenants."""

    redis: RedisSettings = field(default_factory=RedisSettings)
    max_prompt_chars: int = 32000
    """Longest prompt accepted, in characters (default 32,000)."""
    max_tokens_limit: int = 32768
    """Largest ``max_tokens`` accepted."""
    result_ttl_s: int = 86400
    """How long results and item bodies are kept in Redis (default one day)."""
    tenants: Mapping[str, TenantPolicy] | None = None
    """Known tenants; ``None`` accepts any tenant with the default policy."""
    max_batch_size: int = 16
    """Batch size, used by producers to request an immediate flush of a full partition."""
    tier_names: frozenset[str] = frozenset()
    """Names of the configured tiers: a prompt may pin one with ``params.model``."""

    def tenant_policy(self, tenant: str) -> TenantPolicy:
        if self.tenants is None:
            return TenantPolicy()
        return self.tenants.get(tenant, TenantPolicy())


def read_config(path: str | os.PathLike[str] | None = None,
                env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Read the TOML config file; raises ``ConfigError`` naming the file and the problem."""
    env = os.environ if env is None else env
    config_path = Path(path or env.get("COHORT_CONFIG") or DEFAULT_CONFIG)
    try:
        with config_path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {config_path}", path=str(config_path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {config_path} is not valid TOML: {exc}", path=str(config_path)) from None
    data["_path"] = str(config_path)
    return data


def section(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A table of the config (empty if absent); raises ``ConfigError`` if it is not a table."""
    value = config.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] must be a table", key=name)
    return value


def typed(table: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any, *,
          where: str, minimum: float | None = None, maximum: float | None = None) -> Any:
    """Read ``table[key]`` checking its type and range; errors name ``where.key``."""
    if key not in table:
        return default
    value: Any = table[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and bool not in kinds:
        raise ConfigError(f"{where}.{key} must be {_names(kinds)}, got a boolean", key=f"{where}.{key}")
    if not isinstance(value, kinds):
        raise ConfigError(f"{where}.{key} must be {_names(kinds)}, got {type(value).__name__}",
                          key=f"{where}.{key}")
    return _in_range(value, minimum, maximum, where=f"{where}.{key}")


def _in_range(value: Any, minimum: float | None, maximum: float | None, *, where: str) -> Any:
    key = where
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}", key=key)
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key} must be at least {minimum}, got {value}", key=key)
    if maximum is not None and value > maximum:
        raise ConfigError(f"{key} must be at most {maximum}, got {value}", key=key)
    return value


def _names(kinds: tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in kinds)


def check_keys(table: Mapping[str, Any], allowed: set[str], *, where: str) -> None:
    """Reject unknown keys so that a typo never passes silently."""
    unknown = sorted(set(table) - allowed - {"_path"})
    if unknown:
        names = ", ".join(f"{where}.{key}" for key in unknown)
        raise ConfigError(f"unknown key(s) in [{where}]: {names}", key=f"{where}.{unknown[0]}")


def redis_settings(config: Mapping[str, Any], env: Mapping[str, str] | None = None) -> RedisSettings:
    env = os.environ if env is None else env
    table = section(config, "redis")
    check_keys(table, {"url", "key_prefix"}, where="redis")
    url = env.get("COHORT_REDIS_URL") or typed(table, "url", str, RedisSettings.url, where="redis")
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"redis.url must start with redis://, rediss:// or unix://, got {url.split('://')[0]!r}",
                          key="redis.url")
    prefix = env.get("COHORT_KEY_PREFIX") or typed(table, "key_prefix", str, "cohort", where="redis")
    if not prefix or any(c in prefix for c in " {}"):
        raise ConfigError("redis.key_prefix must be non-empty without spaces or braces", key="redis.key_prefix")
    return RedisSettings(url=url, key_prefix=prefix)


def producer_settings(config: Mapping[str, Any], env: Mapping[str, str] | None = None) -> ProducerSettings:
    """Build the producer settings from a parsed config."""
    limits = section(config, "limits")
    check_keys(limits, {"max_prompt_chars", "max_tokens", "result_ttl_s"}, where="limits")
    tenants_table = section(config, "tenants")
    tenants: dict[str, TenantPolicy] | None = None
    if tenants_table:
        tenants = {}
        for name, policy in tenants_table.items():
            if not isinstance(policy, dict):
                raise ConfigError(f"[tenants.{name}] must be a table", key=f"tenants.{name}")
            check_keys(policy, {"coalesce", "cache_ttl_s", "api_keys_env", "rate_limit_rpm"},
                       where=f"tenants.{name}")
            tenants[name] = TenantPolicy(
                coalesce=typed(policy, "coalesce", bool, True, where=f"tenants.{name}"),
                cache_ttl_s=typed(policy, "cache_ttl_s", float, 0.0, where=f"tenants.{name}", minimum=0),
            )
    grouping = section(config, "grouping")
    tiers = config.get("tiers", [])
    tier_names = frozenset(t["name"] for t in tiers if isinstance(t, dict) and isinstance(t.get("name"), str)) \
        if isinstance(tiers, list) else frozenset()
    return ProducerSettings(
        redis=redis_settings(config, env),
        max_prompt_chars=typed(limits, "max_prompt_chars", int, 32000, where="limits", minimum=1),
        max_tokens_limit=typed(limits, "max_tokens", int, 32768, where="limits", minimum=1),
        result_ttl_s=typed(limits, "result_ttl_s", int, 86400, where="limits", minimum=60),
        tenants=tenants,
        max_batch_size=typed(grouping, "max_batch_size", int, 16, where="grouping", minimum=1, maximum=256),
        tier_names=tier_names,
    )


def load_producer_settings(path: str | os.PathLike[str] | None = None,
                           env: Mapping[str, str] | None = None) -> ProducerSettings:
    """Read the config file and the environment once and build the producer settings."""
    return producer_settings(read_config(path, env), env)
