"""The grouping tick in-process: the encoder's time budget, flushes that never wait on it.

A real ``Grouper`` on Redis db 15 (keys under their own prefix, removed before and after), the
real encoder and a dispatch function that records batches. The grouper's clock is moved forward
to make items fall due; the encoder's learnt pace is set to a slow one to stand for an encoder
that cannot keep up.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import redis

from ops.configfile import default_config, merged
from ops.launcher import REDIS_HOST
from producers import CohortClient
from producers.errors import ProviderUnavailable, RedeliveryLimit
from producers.schema import PromptItem
from workers.delivery import Finisher
from workers.encoder import CachedEncoder, Encoder, text_hash
from workers.grouper import Grouper
from workers.settings import WorkerSettings, worker_settings
from workers.telemetry import Telemetry, read_counter

DB = 15
PREFIX = "grouper-ticks-test"
PROMPTS = [
    "How do I reset my card PIN?", "My card PIN needs resetting, how?", "Where is my parcel?",
    "Can I open a second savings account?", "Why was I charged twice for one coffee?",
    "What is the exchange rate for euros today?",
]


@pytest.fixture(scope="module")
def client() -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(f"{REDIS_HOST}/{DB}")
    _clear(connection)
    yield connection
    _clear(connection)
    connection.close()


def _clear(connection: redis.Redis) -> None:
    for key in connection.scan_iter(f"{PREFIX}*", count=1000):
        connection.delete(key)


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    settings = worker_settings(default_config(), env={})
    model = Encoder.for_grouping(settings.grouping)
    model.encode(["warm up"])
    return model


class Rig:
    """A grouper with a movable clock, its producer client and the batches it dispatched."""

    def __init__(self, client: redis.Redis, encoder: Encoder, grouping: dict[str, Any]) -> None:
        _clear(client)
        config = merged(default_config(), {"redis": {"url": f"{REDIS_HOST}/{DB}", "key_prefix": PREFIX},
                                           "grouping": grouping})
        self.settings: WorkerSettings = worker_settings(config, env={})
        self.keys = self.settings.producer.redis.keys
        self.redis = client
        self.offset = 0.0
        self.batches: list[tuple[str, int]] = []
        self.cached = CachedEncoder(encoder, client, self.keys)
        self.grouper = Grouper(self.settings, client, encoder=self.cached,
                               dispatch=lambda batch_id, size: self.batches.append((batch_id, size)),
                               clock=self._clock)
        self.producer = CohortClient(self.settings.producer, redis_client=client)

    def _clock(self) -> float:
        return time.time() + self.offset

    def embedded(self, text: str) -> bool:
        return bool(self.redis.exists(self.keys.embedding(text_hash(text), self.cached.encoder.cache_tag)))

    def unembedded_count(self) -> int:
        return int(read_counter(self.redis, self.keys, "unembedded_items"))

    def batched_items(self) -> int:
        return sum(size for _, size in self.batches)


HOLD = {"max_wait_s": 5.0, "wait_for_packing_only": False}
"""Every item is held up to its wait, packable or not."""
LONG_SYSTEM = ("You are the support assistant of Cohort Bank. Answer in two sentences at most, in plain words, "
               "never ask for card numbers or passwords, and point to the app's Help section when unsure.") * 2


def test_items_are_embedded_while_they_wait_and_flushed_when_due(client: redis.Redis, encoder: Encoder) -> None:
    rig = Rig(client, encoder, HOLD)
    rig.producer.submit_many(PROMPTS)
    first = rig.grouper.tick()
    assert first.claimed == len(PROMPTS) and first.dispatched_items == 0 and first.open_items == len(PROMPTS)
    assert all(rig.embedded(p) for p in PROMPTS)
    rig.offset = 6.0
    second = rig.grouper.tick()
    assert second.dispatched_items == len(PROMPTS) and second.open_items == 0
    assert rig.unembedded_count() == 0


def test_items_the_encoder_cannot_reach_in_time_are_flushed_without_an_embedding(
        client: redis.Redis, encoder: Encoder) -> None:
    rig = Rig(client, encoder, {"max_wait_s": 0.5})
    rig.cached.pace.seconds_per_text = 10.0  # an encoder far too slow to embed anything in a tick
    rig.producer.submit_many([*PROMPTS, PROMPTS[2]])  # one exact duplicate
    rig.offset = 10.0  # everything is long overdue
    report = rig.grouper.tick()
    assert report.claimed == len(PROMPTS) + 1
    assert report.coalesced == 1, "exact duplicates are joined without an embedding"
    assert report.dispatched_items == len(PROMPTS) and report.open_items == 0
    assert not any(rig.embedded(p) for p in PROMPTS)
    assert rig.unembedded_count() == len(PROMPTS)


def test_embed_late_embeds_every_item_before_flushing_it(client: redis.Redis, encoder: Encoder) -> None:
    rig = Rig(client, encoder, {"max_wait_s": 0.5, "embed_late": True})
    rig.producer.submit_many(PROMPTS)
    rig.offset = 10.0
    report = rig.grouper.tick()
    assert report.dispatched_items == len(PROMPTS)
    assert all(rig.embedded(p) for p in PROMPTS)
    assert rig.unembedded_count() == 0


def test_a_full_partition_of_embedded_items_goes_at_once(client: redis.Redis, encoder: Encoder) -> None:
    rig = Rig(client, encoder, {**HOLD, "max_batch_size": 4})
    rig.producer.submit_many(PROMPTS[:5])
    report = rig.grouper.tick()
    assert [size for _, size in rig.batches] == [4], "one full batch at once; the fifth item waits"
    assert report.open_items == 1 and rig.unembedded_count() == 0


def test_an_item_the_encoder_has_not_reached_waits_until_due_then_goes_without_it(
        client: redis.Redis, encoder: Encoder) -> None:
    rig = Rig(client, encoder, {**HOLD, "max_batch_size": 4})
    rig.cached.pace.seconds_per_text = 10.0  # an encoder far too slow to embed anything before the wait is up
    rig.producer.submit_many(PROMPTS[:5])
    first = rig.grouper.tick()
    assert not rig.batches and first.open_items == 5, "not due yet: the items wait for the encoder"
    rig.offset = 6.0
    second = rig.grouper.tick()
    assert sorted(size for _, size in rig.batches) == [1, 4] and second.open_items == 0
    assert rig.unembedded_count() == 5
    assert not any(rig.embedded(p) for p in PROMPTS[:5])


def test_a_near_duplicate_joins_its_leader_in_flight(client: redis.Redis, encoder: Encoder) -> None:
    rig = Rig(client, encoder, {"max_wait_s": 5.0})
    rig.producer.submit_many(["What is the fee for an international transfer?"])
    first = rig.grouper.tick()
    assert first.dispatched_items == 1, "nothing to pack: the item goes at once"
    rig.producer.submit_many(["What's the fee for an international transfer"])
    second = rig.grouper.tick()
    assert second.coalesced == 1 and second.dispatched_items == 0 and second.open_items == 0


def test_only_items_that_a_packed_call_could_make_cheaper_are_held(client: redis.Redis, encoder: Encoder) -> None:
    rig = Rig(client, encoder, {"max_wait_s": 5.0})
    rig.producer.submit_many(PROMPTS[:3])
    rig.producer.submit_many(PROMPTS[3:], system=LONG_SYSTEM)
    report = rig.grouper.tick()
    assert report.dispatched_items == 3 and report.open_items == len(PROMPTS) - 3
    assert report.next_due_s is not None and 4.0 < report.next_due_s <= 5.0
    rig.offset = 6.0
    assert rig.grouper.tick().dispatched_items == len(PROMPTS) - 3


def test_a_follower_that_leads_its_own_duplicates_resolves_them_when_it_is_given_up(
        client: redis.Redis, encoder: Encoder) -> None:
    """X leads its exact copy Y, then follows a near duplicate L. L fails and X may not be submitted
    again (``max_redeliveries = 0``): X ends failed, and so does Y, instead of waiting forever."""
    rig = Rig(client, encoder, {"max_wait_s": 5.0})
    rig.settings = replace(rig.settings, delivery=replace(rig.settings.delivery, max_redeliveries=0))
    finisher = Finisher(rig.settings, client, telemetry=Telemetry(client, rig.keys))
    [leader] = rig.producer.submit_many(["What is the fee for an international transfer?"])
    rig.grouper.tick()
    x, y = rig.producer.submit_many(["What's the fee for an international transfer"] * 2)
    report = rig.grouper.tick()
    assert report.coalesced == 2, "Y follows X (exact), X follows L (near)"
    leader_item = PromptItem.from_json(client.get(rig.keys.item(leader.id)))
    finisher.failed(leader_item, ProviderUnavailable("every tier is down"))
    outcomes = [rig.producer.get(x.id), rig.producer.get(y.id)]
    assert all(isinstance(o, RedeliveryLimit) for o in outcomes), outcomes
