"""Writing final results: exactly one per item, whoever writes first wins.

The write is one Lua script: it stores the Celery meta and publishes it only if the item has no
final result yet, so a redelivered batch or a late duplicate never overwrites an answer.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import redis

from producers.errors import CohortError
from producers.keys import Keys
from producers.results import encode_failure, encode_success

_FINALIZE = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' and (meta['status'] == 'SUCCESS' or meta['status'] == 'FAILURE') then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
redis.call('PUBLISH', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], 'status', ARGV[3])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]))
return 1
"""


class ResultWriter:
    """Stores final results under Celery's result keys, at most once per item."""

    def __init__(self, client: redis.Redis, keys: Keys, *, ttl_s: int) -> None:
        self._redis = client
        self._keys = keys
        self._ttl = ttl_s
        self._finalize = client.register_script(_FINALIZE)

    def answer(self, item_id: str, answer: dict[str, Any]) -> bool:
        """Store an answer; ``False`` if the item already had a final result."""
        payload = encode_success(item_id, answer, _now_iso())
        return self._write(item_id, payload, "answered")

    def fail(self, item_id: str, error: CohortError) -> bool:
        """Store a final error; ``False`` if the item already had a final result."""
        payload = encode_failure(item_id, error, _now_iso())
        return self._write(item_id, payload, "failed")

    def _write(self, item_id: str, payload: str, status: str) -> bool:
        keys = [self._keys.result(item_id), self._keys.item_status(item_id)]
        return bool(self._finalize(keys=keys, args=[payload, self._ttl, status]))

    def finals(self, item_ids: list[str]) -> set[str]:
        """The ids among ``item_ids`` that already have a final result."""
        if not item_ids:
            return set()
        raw = self._redis.mget([self._keys.result(i) for i in item_ids])
        return {i for i, value in zip(item_ids, raw, strict=True)
                if value is not None and (b'"SUCCESS"' in value or b'"FAILURE"' in value)}


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()
