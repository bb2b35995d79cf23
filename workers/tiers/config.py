"""The tier chain, routing knobs and spend caps, parsed once from the config file.

Shape of the config (all of ``[routing]`` and ``[budgets]`` is optional)::

    [[tiers]]                      # the chain, in fallback order
    name = "primary"
    provider = "openai"            # or "anthropic"
    base_url = "https://api.example.com/v1"
    model = "large-model"
    api_key_env = "PRIMARY_KEY"    # the variable holding the key; omit for keyless servers
    price_in_per_1k = 0.01         # currency per 1,000 input tokens
    price_out_per_1k = 0.03
    context_window = 8192
    timeout_s = 30.0
    max_retries = 2                # retries on this tier (attempts = 1 + max_retries), within the item cap
    rpm = 600                      # optional: requests per minute
    tpm = 200000                   # optional: tokens per minute
    strength = 3                   # optional: higher = stronger; default = reverse list order

    [routing]
    max_attempts_per_item = 4      # hard cap on calls per item across every tier
    medium_start = "secondary"

    [budgets]
    global_daily = 50.0
    [budgets.tenants.acme]
    daily = 5.0
    monthly = 100.0

Every error is a ``ConfigError`` naming the bad key, e.g. ``tiers[1].price_in_per_1k``.
API keys are never read here: only the *name* of the variable that holds them.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from producers.errors import ConfigError
from producers.settings import check_keys, section, typed

PROVIDERS: tuple[str, ...] = ("openai", "anthropic")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TENANT = re.compile(r"^[^\s{}:]{1,64}$")
NANOS = 1_000_000_000
"""Money is kept in Redis as integer billionths of the price currency, so sums are exact."""


@dataclass(frozen=True)
class TierConfig:
    """One upstream model endpoint of the chain."""

    name: str
    """Tier name, used in routing, Redis keys and telemetry."""
    provider: Literal["openai", "anthropic"]
    """Wire protocol: OpenAI-compatible chat completions or Anthropic Messages."""
    base_url: str
    """Endpoint root, e.g. ``https://api.openai.com/v1`` (a query string such as ``?api-version=`` is kept)."""
    model: str
    """Model (or deployment) name sent to the provider."""
    api_key_env: str | None
    """Name of the environment variable holding the key; ``None`` sends no key."""
    price_in_per_1k: float
    """Price of 1,000 input tokens."""
    price_out_per_1k: float
    """Price of 1,000 output tokens."""
    context_window: int
    """Largest prompt + output the model accepts, in tokens."""
    timeout_s: float
    """Per-call timeout in seconds (shortened to the item's deadline)."""
    max_retries: int
    """Retries of a retryable error on this tier before falling over (default 2)."""
    rpm: int | None = None
    """Requests per minute across all workers; ``None``: unlimited."""
    tpm: int | None = None
    """Tokens (prompt estimate + max_tokens) per minute across all workers; ``None``: unlimited."""
    strength: int = 0
    """Higher is stronger; ``complex`` items start at the strongest tier."""
    auth_header: str = "Authorization"
    """Header carrying the key for OpenAI-style tiers: ``Authorization`` (Bearer) or e.g. ``api-key`` (Azure)."""

    @property
    def price_in_nanos_per_1k(self) -> int:
        return round(self.price_in_per_1k * NANOS)

    @property
    def price_out_nanos_per_1k(self) -> int:
        return round(self.price_out_per_1k * NANOS)

    def cost_nanos(self, tokens_in: int, tokens_out: int) -> int:
        """Cost of a call in billionths, rounded up (exact integer arithmetic)."""
        total = tokens_in * self.price_in_nanos_per_1k + tokens_out * self.price_out_nanos_per_1k
        return -(-total // 1000)


@dataclass(frozen=True)
class RoutingConfig:
    """The chain and the one retry loop's limits."""

    tiers: tuple[TierConfig, ...]
    """The chain, in fallback order (the config file's order)."""
    max_attempts_per_item: int = 4
    """Hard cap on upstream calls for one item, across all tiers and retries (default 4)."""
    medium_start: str = ""
    """Tier where ``medium`` items start (default: the tier of median strength)."""
    backoff_base_s: float = 0.25
    """First retry waits up to this long (full jitter), doubling each retry (default 0.25 s)."""
    backoff_max_s: float = 4.0
    """Longest backoff before a retry (default 4 s)."""
    max_retry_after_s: float = 10.0
    """Longest ``Retry-After`` honoured by waiting; a longer one moves the item to the next tier (default 10 s)."""
    circuit_failure_threshold: int = 5
    """Failures in one window that open a tier's circuit (default 5) ..."""
    circuit_failure_ratio: float = 0.5
    """... when they are also at least this share of the window's calls (default 0.5)."""
    circuit_window_s: float = 30.0
    """Length of the failure-counting window (default 30 s)."""
    circuit_cooldown_s: float = 15.0
    """How long an open circuit rejects calls before one probe is let through (default 15 s)."""
    auth_disable_s: float = 300.0
    """How long a tier whose key was refused stays out of service for every worker (default 300 s)."""
    rate_limit_max_wait_s: float = 1.0
    """A saturated tier is waited for only if its window frees within this long; else skipped (default 1 s)."""

    def tier(self, name: str) -> TierConfig:
        for tier in self.tiers:
            if tier.name == name:
                return tier
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tiers)


@dataclass(frozen=True)
class TenantBudget:
    """Spend caps of one tenant (``None``: no cap)."""

    daily: float | None = None
    monthly: float | None = None


@dataclass(frozen=True)
class BudgetConfig:
    """Spend caps, global and per tenant, per UTC day and month."""

    global_daily: float | None = None
    global_monthly: float | None = None
    tenants: Mapping[str, TenantBudget] = field(default_factory=lambda: MappingProxyType({}))
    """Per-tenant caps; the entry ``"*"`` applies to tenants not listed."""

    def tenant(self, name: str) -> TenantBudget:
        return self.tenants.get(name) or self.tenants.get("*") or TenantBudget()


_TIER_KEYS = {
    "name", "provider", "base_url", "model", "api_key_env", "price_in_per_1k", "price_out_per_1k",
    "context_window", "timeout_s", "max_retries", "rpm", "tpm", "strength", "auth_header",
}
_ROUTING_KEYS = set(RoutingConfig.__dataclass_fields__) - {"tiers"}


def _float(table: Mapping[str, Any], key: str, default: Any, *, where: str, minimum: float | None = None,
           maximum: float | None = None, positive: bool = False) -> Any:
    value = typed(table, key, float, default, where=where, minimum=minimum, maximum=maximum)
    if value is None:
        return None
    if not math.isfinite(value):
        raise ConfigError(f"{where}.{key} must be a finite number, got {value}", key=f"{where}.{key}")
    if positive and value <= 0:
        raise ConfigError(f"{where}.{key} must be greater than 0, got {value}", key=f"{where}.{key}")
    return value


def _str(table: Mapping[str, Any], key: str, *, where: str, pattern: re.Pattern[str] | None = None,
         required: bool = True, default: str | None = None) -> Any:
    if key not in table:
        if required:
            raise ConfigError(f"{where}.{key} is required", key=f"{where}.{key}")
        return default
    value = typed(table, key, str, default, where=where)
    if not value.strip():
        raise ConfigError(f"{where}.{key} must not be empty", key=f"{where}.{key}")
    if pattern is not None and not pattern.match(value):
        raise ConfigError(f"{where}.{key} has invalid characters: {value!r}", key=f"{where}.{key}")
    return value


def _parse_tier(raw: Any, index: int, count: int) -> TierConfig:
    where = f"tiers[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table", key=where)
    check_keys(raw, _TIER_KEYS, where=where)
    provider = _str(raw, "provider", where=where)
    if provider not in PROVIDERS:
        raise ConfigError(f"{where}.provider must be one of {', '.join(PROVIDERS)}, got {provider!r}",
                          key=f"{where}.provider")
    base_url = _str(raw, "base_url", where=where)
    if not base_url.startswith(("http://", "https://")) or len(base_url) < 8:
        raise ConfigError(f"{where}.base_url must be an http:// or https:// URL", key=f"{where}.base_url")
    rpm = typed(raw, "rpm", int, None, where=where, minimum=1)
    tpm = typed(raw, "tpm", int, None, where=where, minimum=1)
    return TierConfig(
        name=_str(raw, "name", where=where, pattern=_NAME),
        provider=provider,
        base_url=base_url,
        model=_str(raw, "model", where=where),
        api_key_env=_str(raw, "api_key_env", where=where, pattern=_ENV_NAME, required=False),
        price_in_per_1k=_float(_required(raw, "price_in_per_1k", where), "price_in_per_1k", None,
                               where=where, minimum=0),
        price_out_per_1k=_float(_required(raw, "price_out_per_1k", where), "price_out_per_1k", None,
                                where=where, minimum=0),
        context_window=typed(_required(raw, "context_window", where), "context_window", int, None,
                             where=where, minimum=16, maximum=100_000_000),
        timeout_s=_float(raw, "timeout_s", 30.0, where=where, maximum=3600, positive=True),
        max_retries=typed(raw, "max_retries", int, 2, where=where, minimum=0, maximum=20),
        rpm=rpm,
        tpm=tpm,
        strength=typed(raw, "strength", int, count - index, where=where, minimum=-1000, maximum=1000),
        auth_header=_str(raw, "auth_header", where=where, pattern=re.compile(r"^[A-Za-z0-9-]{1,64}$"),
                         required=False, default="Authorization"),
    )


def _required(table: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    """The table itself, after checking that it has ``key``."""
    if key not in table:
        raise ConfigError(f"{where}.{key} is required", key=f"{where}.{key}")
    return table


def parse_routing(config: Mapping[str, Any], env: Mapping[str, str] | None = None) -> RoutingConfig:
    """Build the tier chain and routing limits from the parsed config.

    Args:
        config: the parsed TOML mapping (``WorkerSettings.config``).
        env: the environment; only ``COHORT_SECRETS_FILE`` is checked here (it must exist if set).
            Keys themselves are read by the router, when it starts.

    Returns:
        The validated ``RoutingConfig``.

    Raises:
        ConfigError: naming the bad key (``tiers[1].price_in_per_1k``, ``routing.medium_start``...).
    """
    env = os.environ if env is None else env
    raw_tiers = config.get("tiers")
    if raw_tiers is None:
        raise ConfigError("at least one [[tiers]] entry is required", key="tiers")
    if not isinstance(raw_tiers, list) or not raw_tiers:
        raise ConfigError("tiers must be a non-empty array of tables ([[tiers]])", key="tiers")
    tiers = tuple(_parse_tier(raw, i, len(raw_tiers)) for i, raw in enumerate(raw_tiers))
    seen: set[str] = set()
    for i, tier in enumerate(tiers):
        if tier.name in seen:
            raise ConfigError(f"tiers[{i}].name {tier.name!r} is used twice", key=f"tiers[{i}].name")
        seen.add(tier.name)

    table = section(config, "routing")
    check_keys(table, _ROUTING_KEYS, where="routing")
    medium = table.get("medium_start", _median_tier(tiers))
    if not isinstance(medium, str) or medium not in seen:
        raise ConfigError(f"routing.medium_start names unknown tier {medium!r}; tiers are {sorted(seen)}",
                          key="routing.medium_start")
    backoff_base = _float(table, "backoff_base_s", 0.25, where="routing", minimum=0, maximum=60)
    backoff_max = _float(table, "backoff_max_s", 4.0, where="routing", minimum=0, maximum=600)
    if backoff_max < backoff_base:
        raise ConfigError("routing.backoff_max_s must be at least routing.backoff_base_s",
                          key="routing.backoff_max_s")
    secrets = env.get("COHORT_SECRETS_FILE")
    if secrets and not os.path.isfile(secrets):
        raise ConfigError(f"COHORT_SECRETS_FILE points to a missing file: {secrets}", key="COHORT_SECRETS_FILE")
    return RoutingConfig(
        tiers=tiers,
        max_attempts_per_item=typed(table, "max_attempts_per_item", int, 4, where="routing",
                                    minimum=1, maximum=50),
        medium_start=medium,
        backoff_base_s=backoff_base,
        backoff_max_s=backoff_max,
        max_retry_after_s=_float(table, "max_retry_after_s", 10.0, where="routing", minimum=0, maximum=3600),
        circuit_failure_threshold=typed(table, "circuit_failure_threshold", int, 5, where="routing",
                                        minimum=1, maximum=10_000),
        circuit_failure_ratio=_float(table, "circuit_failure_ratio", 0.5, where="routing", minimum=0,
                                     maximum=1),
        circuit_window_s=_float(table, "circuit_window_s", 30.0, where="routing", maximum=86400,
                                positive=True),
        circuit_cooldown_s=_float(table, "circuit_cooldown_s", 15.0, where="routing", maximum=86400,
                                  positive=True),
        auth_disable_s=_float(table, "auth_disable_s", 300.0, where="routing", minimum=1, maximum=7 * 86400),
        rate_limit_max_wait_s=_float(table, "rate_limit_max_wait_s", 1.0, where="routing", minimum=0,
                                     maximum=60),
    )


def _median_tier(tiers: tuple[TierConfig, ...]) -> str:
    ranked = sorted(tiers, key=lambda t: -t.strength)
    return ranked[len(ranked) // 2].name


def _cap(table: Mapping[str, Any], key: str, where: str) -> float | None:
    return _float(table, key, None, where=where, minimum=0)


def parse_budgets(config: Mapping[str, Any]) -> BudgetConfig:
    """Build the spend caps from ``[budgets]`` (absent: no caps).

    Raises:
        ConfigError: naming the bad key (``budgets.tenants.acme.daily``...).
    """
    table = section(config, "budgets")
    check_keys(table, {"global_daily", "global_monthly", "tenants"}, where="budgets")
    raw_tenants = table.get("tenants", {})
    if not isinstance(raw_tenants, dict):
        raise ConfigError("[budgets.tenants] must be a table", key="budgets.tenants")
    tenants: dict[str, TenantBudget] = {}
    for name, raw in raw_tenants.items():
        where = f"budgets.tenants.{name}"
        if not isinstance(name, str) or not _TENANT.match(name):
            raise ConfigError(f"{where}: tenant names must be 1-64 characters without spaces, braces or colons",
                              key=where)
        if not isinstance(raw, dict):
            raise ConfigError(f"[{where}] must be a table", key=where)
        check_keys(raw, {"daily", "monthly"}, where=where)
        tenants[name] = TenantBudget(daily=_cap(raw, "daily", where), monthly=_cap(raw, "monthly", where))
    return BudgetConfig(
        global_daily=_cap(table, "global_daily", "budgets"),
        global_monthly=_cap(table, "global_monthly", "budgets"),
        tenants=MappingProxyType(tenants),
    )


def load_secrets(env: Mapping[str, str]) -> dict[str, str]:
    """Keys from ``COHORT_SECRETS_FILE`` (``NAME=VALUE`` lines, ``#`` comments); empty if unset.

    The environment wins over the file. Values are never logged or put in errors.
    """
    path = env.get("COHORT_SECRETS_FILE")
    if not path:
        return {}
    values: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                name, sep, value = line.partition("=")
                name = name.strip().removeprefix("export ").strip()
                if not sep or not _ENV_NAME.match(name):
                    raise ConfigError(f"COHORT_SECRETS_FILE line {number} is not NAME=VALUE",
                                      key="COHORT_SECRETS_FILE")
                values[name] = value.strip().strip("'\"")
    except OSError as exc:
        raise ConfigError(f"COHORT_SECRETS_FILE cannot be read: {exc.strerror}", key="COHORT_SECRETS_FILE") from None
    return values


def resolve_keys(routing: RoutingConfig, env: Mapping[str, str]) -> dict[str, str | None]:
    """The key of each tier (``None`` when the tier needs none or its variable is unset)."""
    secrets = load_secrets(env)
    keys: dict[str, str | None] = {}
    for tier in routing.tiers:
        if tier.api_key_env is None:
            keys[tier.name] = None
        else:
            keys[tier.name] = env.get(tier.api_key_env) or secrets.get(tier.api_key_env) or None
    return keys
