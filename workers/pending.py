"""The pending stream: claiming submitted items for the grouper, and submitting items again."""

from __future__ import annotations

from dataclasses import dataclass

import redis

from producers.keys import GROUPER_CONSUMER_GROUP, Keys

CONSUMER = "grouper"


@dataclass(frozen=True)
class Claimed:
    entry_id: bytes
    item_id: str


class PendingStream:
    """The stream of submitted item ids, read through one consumer group.

    Entries stay in the group's pending list until the grouper has moved their items into the
    open pool (``ack``), so a grouper killed in between finds them again on its next tick.
    """

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._redis = client
        self._keys = keys
        self._group_ready = False

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            self._redis.xgroup_create(self._keys.pending_stream(), GROUPER_CONSUMER_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def claim(self, count: int) -> list[Claimed]:
        """Entries read before but not acknowledged (a crashed tick), then new ones, up to ``count``."""
        self._ensure_group()
        claimed: list[Claimed] = []
        for start in ("0", ">"):
            if len(claimed) >= count:
                break
            try:
                reply = self._redis.xreadgroup(GROUPER_CONSUMER_GROUP, CONSUMER,
                                               {self._keys.pending_stream(): start}, count=count - len(claimed))
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self._group_ready = False
                self._ensure_group()
                continue
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    if fields and b"id" in fields:
                        claimed.append(Claimed(entry_id, fields[b"id"].decode()))
                    else:  # an entry whose item was trimmed away: acknowledge it and move on
                        self._redis.xack(self._keys.pending_stream(), GROUPER_CONSUMER_GROUP, entry_id)
        return claimed

    def ack(self, pipe: redis.client.Pipeline, entries: list[bytes]) -> None:
        if entries:
            pipe.xack(self._keys.pending_stream(), GROUPER_CONSUMER_GROUP, *entries)

    def depth(self) -> int:
        """Items submitted and not yet claimed by the grouper."""
        try:
            groups = self._redis.xinfo_groups(self._keys.pending_stream())
        except redis.ResponseError:
            return 0
        for group in groups:
            if group.get("name") in (GROUPER_CONSUMER_GROUP, GROUPER_CONSUMER_GROUP.encode()):
                lag = group.get("lag")
                return int(lag or 0) + int(group.get("pending") or 0)
        return int(self._redis.xlen(self._keys.pending_stream()))


def requeue(client: redis.Redis, keys: Keys, item_ids: list[str], *, partition: str,
            max_requeues: int) -> dict[str, int]:
    """Submit items again (e.g. followers of a failed leader).

    Returns the items already submitted again ``max_requeues`` times, with that count: they are
    not submitted again, and the caller ends them (resolving whatever they lead).
    """
    over: dict[str, int] = {}
    for item_id in item_ids:
        count = client.hincrby(keys.item_status(item_id), "requeues", 1)
        if count > max_requeues:
            over[item_id] = count - 1
            continue
        pipe = client.pipeline(transaction=True)
        pipe.hset(keys.item_status(item_id), "status", "queued")
        pipe.xadd(keys.pending_stream(), {"id": item_id})
        pipe.incrby(keys.partition_count(partition), 1)
        pipe.execute()
    return over
