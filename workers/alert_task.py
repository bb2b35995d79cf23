"""The alert evaluation task: ``cohort.evaluate_alerts``, run by beat every ``[alerts] interval_s``.

It takes no arguments and returns a small summary (alert ids fired and resolved), so Flower shows
no figures other than those. The rules live in ``workers.alerting``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import redis

from workers.alerting import AlertSettings, alert_settings, run_once
from workers.app import app
from workers.settings import load_worker_settings


@lru_cache(maxsize=1)
def _redis() -> redis.Redis:
    return redis.Redis.from_url(load_worker_settings().producer.redis.url)


@lru_cache(maxsize=1)
def _settings() -> AlertSettings:
    return alert_settings(load_worker_settings().config)


@app.task(name="cohort.evaluate_alerts", ignore_result=True, acks_late=False)
def evaluate_alerts() -> dict[str, Any]:
    """Evaluate every alert rule once (deduplicated, resolved when cleared, webhook on change)."""
    settings = load_worker_settings()
    return run_once(_redis(), settings.producer.redis.keys, _settings(), settings.config).summary()
