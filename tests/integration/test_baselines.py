"""The two alternative systems of the comparison benchmark answer prompts through real workers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from ops.baselines import run_baseline
from ops.configfile import default_config, write_config
from ops.launcher import REDIS_HOST, SIM_KEY, SimulatorHandle, run_simulator, wait_until
from ops.simulator import answer_for

PROMPTS = ["How do I reset my PIN?", "Why was my card declined?", "Can I get a refund for a purchase?",
           "What fees apply to top ups?", "How long does a transfer take?"]


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorHandle]:
    with run_simulator(seed=0, overhead_ms=20) as handle:
        yield handle


@pytest.fixture
def config(sim: SimulatorHandle, tmp_path: Path) -> Path:
    tiers = [{**tier, "base_url": sim.base_url} for tier in default_config()["tiers"]]
    return write_config(tmp_path / "cohort.toml", {"tiers": tiers, "grouping": {"max_batch_size": 16,
                                                                                 "max_wait_s": 0.5}})


def _own_db(db: int) -> tuple[str, redis.Redis]:
    url = f"{REDIS_HOST}/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()  # the db is this test module's own; flushed before any worker starts
    return url, client


def _results(client: redis.Redis, keys: list[str]) -> list[dict]:
    def all_final() -> list[dict] | None:
        raws = client.mget(keys)
        if any(raw is None for raw in raws):
            return None
        metas = [json.loads(raw) for raw in raws]
        return metas if all(m["status"] in ("SUCCESS", "FAILURE") for m in metas) else None

    return wait_until(all_final, timeout=30, message="baseline results")


def test_per_prompt_answers_each_prompt_with_one_call(sim: SimulatorHandle, config: Path) -> None:
    url, client = _own_db(7)
    sim.reset()
    with run_baseline("per-prompt", redis_url=url, config_path=config, workers=1, concurrency=4,
                      env={"COHORT_SIM_KEY": SIM_KEY}) as base:
        ids = base.submit(PROMPTS)
        metas = _results(client, [base.result_key(i) for i in ids])
    assert [m["status"] for m in metas] == ["SUCCESS"] * len(PROMPTS)
    for prompt, meta in zip(PROMPTS, metas, strict=True):
        result = meta["result"]
        assert result["text"] == answer_for(prompt)
        assert result["model"] == default_config()["tiers"][0]["model"]  # the config's first tier
        assert result["tokens_in"] > 0 and result["tokens_out"] > 0 and result["cost"] > 0
        assert result["packed"] is False
    assert sim.stats()["requests"] == len(PROMPTS)
    client.flushdb()


def test_batched_packs_a_batch_into_one_call(sim: SimulatorHandle, config: Path) -> None:
    url, client = _own_db(8)
    sim.reset()
    with run_baseline("batched", redis_url=url, config_path=config, workers=1, concurrency=4,
                      env={"COHORT_SIM_KEY": SIM_KEY}) as base:
        ids = base.submit(PROMPTS)
        metas = _results(client, [base.result_key(i) for i in ids])
    assert [m["status"] for m in metas] == ["SUCCESS"] * len(PROMPTS)
    for prompt, meta in zip(PROMPTS, metas, strict=True):
        # The simulator answers a packed question exactly as it answers the question alone.
        assert meta["result"]["text"] == answer_for(prompt)
        assert meta["result"]["packed"] is True
    stats = sim.stats()
    # Five prompts, fewer than flush_every (16): one flush after flush_interval, one packed call.
    assert stats["requests"] == 1
    primary = default_config()["tiers"][0]
    assert stats["prompts"] == {primary["model"]: len(PROMPTS)}
    total_cost = sum(m["result"]["cost"] for m in metas)
    assert total_cost == pytest.approx(sum(stats["tokens_in"].values()) * primary["price_in_per_1k"] / 1000
                                       + sum(stats["tokens_out"].values()) * primary["price_out_per_1k"] / 1000)
    client.flushdb()
