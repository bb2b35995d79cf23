"""Answering the same request once: markers in Redis that link followers to a leader.

For each request (an exact digest, or a strict near-duplicate signature, within one partition:
one tenant, one set of model parameters) a marker names the leader item whose upstream answer
will be shared. Items that arrive while the leader is in flight are pushed on the marker's
follower list and answered when the leader is. After the leader is answered the marker keeps
the answer for a window (the coalescing window for exact duplicates; the tenant's semantic
cache TTL for near-duplicates), during which new duplicates are answered without a call.
If the leader fails, the marker is removed and its followers are submitted again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, cast

import redis

from producers.keys import Keys
from producers.schema import PromptItem
from workers.encoder import text_hash

_ATTACH = """
-- KEYS: marker, followers, the item's status hash.
-- ARGV: item id, TTL, text hash, may lead, join, kind, digest, expected leader ('' for any).
local function record_lead()
  local raw = redis.call('HGET', KEYS[3], 'leads')
  local leads = {}
  if raw then leads = cjson.decode(raw) end
  for _, lead in ipairs(leads) do
    if lead[1] == ARGV[6] and lead[2] == ARGV[7] then return end
  end
  table.insert(leads, {ARGV[6], ARGV[7]})
  redis.call('HSET', KEYS[3], 'leads', cjson.encode(leads))
end
local current = redis.call('GET', KEYS[1])
if not current then
  if ARGV[4] == '1' then
    redis.call('SET', KEYS[1], cjson.encode({leader=ARGV[1], state='inflight', text_hash=ARGV[3]}),
               'EX', tonumber(ARGV[2]))
    record_lead()
    return {'leader', ''}
  end
  return {'none', ''}
end
local marker = cjson.decode(current)
if marker['leader'] == ARGV[1] and marker['state'] ~= 'done' then return {'leader', ''} end
if ARGV[5] ~= '1' or (ARGV[8] ~= '' and marker['leader'] ~= ARGV[8]) then return {'other', current} end
if marker['state'] == 'done' then return {'done', current} end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]))
return {'follower', current}
"""

_COMPLETE = """
local current = redis.call('GET', KEYS[1])
local text_hash = ''
if current then
  local marker = cjson.decode(current)
  if marker['leader'] ~= ARGV[1] or marker['state'] == 'done' then return {} end
  text_hash = marker['text_hash'] or ''
end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], cjson.encode({leader=ARGV[1], state='done', answer=ARGV[2], text_hash=text_hash}),
             'EX', tonumber(ARGV[3]))
else
  redis.call('DEL', KEYS[1])
end
local followers = redis.call('LRANGE', KEYS[2], 0, -1)
redis.call('DEL', KEYS[2])
return followers
"""

def coalescing_scope(item: PromptItem) -> str:
    """Items may share an answer only within one scope: tenant, model parameters and context."""
    scope = item.partition
    if item.context is not None:
        scope += ":" + text_hash(item.context)[:16]
    return scope


Role = Literal["leader", "follower", "done", "other", "none"]


@dataclass(frozen=True)
class Attach:
    """One item's request to lead, join or look at the marker of one coalescing key."""

    partition: str
    kind: str
    """``exact`` or ``near``."""
    digest: str
    item_id: str
    text_hash: str
    status_key: str
    """The item's status hash, where the markers it leads are recorded (``leads``)."""
    may_lead: bool = True
    """Take the lead when there is no marker (else the role is ``none``)."""
    join: bool = True
    """Follow another leader's marker (or be served its answer); else the role is ``other``."""
    expected_leader: str | None = None
    """Join only this leader's marker (the one the item was compared with); else the role is ``other``."""


@dataclass(frozen=True)
class Marker:
    """Where an item stands for one coalescing key."""

    kind: str
    digest: str
    role: Role
    leader: str | None = None
    text_hash: str | None = None
    """The leader's text hash (roles ``follower``, ``done`` and ``other``)."""
    answer: dict[str, Any] | None = None
    """The leader's answer, when ``role == 'done'``, or ``other`` with a done marker."""


class CoalescingStore:
    """Leader/follower markers for one deployment."""

    def __init__(self, client: redis.Redis, keys: Keys, *, inflight_ttl_s: int) -> None:
        self._redis = client
        self._keys = keys
        self._inflight_ttl = inflight_ttl_s
        self._attach = client.register_script(_ATTACH)
        self._complete = client.register_script(_COMPLETE)

    def attach_many(self, requests: list[Attach]) -> list[Marker]:
        """Make each item the leader of its request, a follower of the current leader, or serve it
        the kept answer; in one round trip, applied in order (a later duplicate of an earlier item
        in the list follows it). A new leader's marker is recorded in its status hash in the same
        step, so that whichever path ends the item resolves it."""
        if not requests:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for r in requests:
            self._attach(keys=[self._keys.coalesce(r.partition, r.kind, r.digest),
                               self._keys.coalesce_followers(r.partition, r.kind, r.digest), r.status_key],
                         args=[r.item_id, self._inflight_ttl, r.text_hash, "1" if r.may_lead else "0",
                               "1" if r.join else "0", r.kind, r.digest, r.expected_leader or ""],
                         client=pipe)
        return [_marker(r, reply) for r, reply in zip(requests, pipe.execute(), strict=True)]

    def complete(self, *, partition: str, kind: str, digest: str, leader: str,
                 answer: dict[str, Any] | None, keep_s: int) -> list[str]:
        """The leader ended: keep its answer for ``keep_s`` (0: drop the marker); return the followers.

        ``answer=None`` means the leader failed: the marker is dropped and the followers are
        returned to be submitted again.
        """
        keys = [self._keys.coalesce(partition, kind, digest),
                self._keys.coalesce_followers(partition, kind, digest)]
        keep = keep_s if answer is not None else 0
        payload = json.dumps(answer, separators=(",", ":")) if answer is not None else ""
        followers = self._complete(keys=keys, args=[leader, payload, keep])
        return [f.decode() if isinstance(f, bytes) else f for f in followers]


def _marker(request: Attach, reply: list[Any]) -> Marker:
    role_raw, marker_raw = reply
    role = cast(Role, role_raw.decode() if isinstance(role_raw, bytes) else role_raw)
    if role in ("leader", "none"):
        return Marker(request.kind, request.digest, role, leader=request.item_id if role == "leader" else None)
    marker = json.loads(marker_raw)
    answer = json.loads(marker["answer"]) if marker.get("state") == "done" else None
    return Marker(request.kind, request.digest, role, leader=marker.get("leader"), text_hash=marker.get("text_hash"),
                  answer=answer)
