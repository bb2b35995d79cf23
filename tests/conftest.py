"""Shared test setup: a real Redis is required (skipped locally when absent, a failure in CI)."""

from __future__ import annotations

import os

import pytest
import redis

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _redis_up() -> bool:
    try:
        return bool(redis.Redis.from_url("redis://127.0.0.1:6379/0", socket_timeout=1).ping())
    except redis.RedisError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    needs_redis = [i for i in items if "integration" in str(i.fspath) or "e2e" in str(i.fspath)]
    if not needs_redis or _redis_up():
        return
    if os.environ.get("CI"):
        raise pytest.UsageError("Redis is not reachable at 127.0.0.1:6379 and CI is set")
    skip = pytest.mark.skip(reason="Redis is not reachable at 127.0.0.1:6379")
    for item in needs_redis:
        item.add_marker(skip)
