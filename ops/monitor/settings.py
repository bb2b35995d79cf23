"""Settings of the monitor process, from ``[monitor]`` and the environment (read once, at start).

Environment:

- ``COHORT_MONITOR_USER`` / ``COHORT_MONITOR_PASSWORD``: basic-auth credentials. When set they
  are always required; without them the monitor refuses to start unless demo mode is on
  (``--demo`` or ``COHORT_DEMO=1``), which then serves without authentication.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from producers.errors import ConfigError
from producers.settings import RedisSettings, check_keys, redis_settings, section, typed
from workers.alerting import AlertSettings, alert_settings
from workers.tiers.config import parse_budgets

USER_ENV = "COHORT_MONITOR_USER"
PASSWORD_ENV = "COHORT_MONITOR_PASSWORD"
DEMO_ENV = "COHORT_DEMO"


@dataclass(frozen=True)
class MonitorSettings:
    """Where the monitor listens and who may read it."""

    redis: RedisSettings
    alerts: AlertSettings
    host: str = "127.0.0.1"
    """Address to bind (default loopback)."""
    port: int = 9808
    """Port to bind (default 9808)."""
    refresh_ms: int = 1000
    """How often the dashboard page polls (default 1,000 ms)."""
    metrics_auth: bool = True
    """Put ``/metrics`` behind basic auth as well (default on)."""
    flower_url: str = ""
    """Flower's address, linked from the dashboard (empty: no link)."""
    user: str | None = None
    password: str | None = None
    demo: bool = False
    """Demo mode: may run without credentials (the demo, on loopback)."""

    @property
    def auth_required(self) -> bool:
        """Credentials set: always required (demo mode only allows running without them)."""
        return bool(self.user and self.password)


def monitor_settings(config: Mapping[str, Any], env: Mapping[str, str] | None = None, *,
                     demo: bool | None = None, host: str | None = None,
                     port: int | None = None) -> MonitorSettings:
    """Build the monitor settings; raises ``ConfigError`` naming the bad key or missing variable."""
    env = os.environ if env is None else env
    table = section(config, "monitor")
    check_keys(table, {"host", "port", "refresh_ms", "metrics_auth", "flower_url"}, where="monitor")
    parse_budgets(config)  # fail at start, not at the first scrape
    if demo is None:
        demo = env.get(DEMO_ENV, "").lower() in ("1", "true", "yes")
    user, password = env.get(USER_ENV) or None, env.get(PASSWORD_ENV) or None
    if not demo and not (user and password):
        raise ConfigError(f"set {USER_ENV} and {PASSWORD_ENV} for the monitor's basic auth, or run it with --demo",
                          key=USER_ENV)
    return MonitorSettings(
        redis=redis_settings(config, env),
        alerts=alert_settings(config, env),
        host=host or typed(table, "host", str, "127.0.0.1", where="monitor"),
        port=port if port is not None else typed(table, "port", int, 9808, where="monitor", minimum=0, maximum=65535),
        refresh_ms=typed(table, "refresh_ms", int, 1000, where="monitor", minimum=100, maximum=60_000),
        metrics_auth=typed(table, "metrics_auth", bool, True, where="monitor"),
        flower_url=typed(table, "flower_url", str, "", where="monitor"),
        user=user,
        password=password,
        demo=bool(demo),
    )
