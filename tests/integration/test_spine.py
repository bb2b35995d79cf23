"""The spine, end to end on real processes: producers -> Redis -> grouper -> inference -> results."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from ops.simulator import answer_for
from ops.workloads import banking77
from producers import PromptResult
from tests.support.cluster import REPO_ROOT, Cohort, run_cohort
from workers.sameness import strictly_same

DB = 11


@pytest.fixture(scope="module")
def cohort() -> Iterator[Cohort]:
    with run_cohort(db=DB, concurrency=8) as running:
        yield running


def _submit_from_process(cohort: Cohort, path: Path, tenant: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "ops.cli", "submit", str(path), "--jsonl", "--tenant", tenant,
                             "--no-wait"],
                            cwd=REPO_ROOT, env=cohort.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_500_prompts_from_two_producer_processes_each_get_their_own_answer(cohort: Cohort, tmp_path: Path) -> None:
    distinct = [p.text for p in banking77(limit=450, seed=None)]  # file order: natural paraphrases side by side
    # Each tenant's 250 prompts: 225 of its own, then 25 of them asked again (answered once each).
    prompts = {"acme": distinct[:225] + distinct[:225:9], "globex": distinct[225:] + distinct[225::9]}
    repeats = sum(len(p) - len(set(p)) for p in prompts.values())
    files = {"acme": tmp_path / "acme.txt", "globex": tmp_path / "globex.txt"}
    for tenant, path in files.items():
        path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts[tenant]))
    calls_before = cohort.upstream_calls()

    producers = {tenant: _submit_from_process(cohort, path, tenant) for tenant, path in files.items()}
    submitted: dict[str, tuple[str, str]] = {}  # id -> (tenant, prompt)
    for tenant, process in producers.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        lines = [json.loads(line) for line in out.splitlines()]
        texts = [json.loads(line)["prompt"] for line in files[tenant].read_text().splitlines()]
        assert len(lines) == len(texts) == 250
        for line, text in zip(lines, texts, strict=True):
            submitted[line["id"]] = (tenant, text)

    results = cohort.client.wait(list(submitted), timeout=180)
    batches_by_tenant: dict[str, set[str]] = defaultdict(set)
    for item_id, result in zip(submitted, results, strict=True):
        tenant, text = submitted[item_id]
        assert isinstance(result, PromptResult), result
        assert result.id == item_id
        if result.coalesced:  # answered by a strictly-same request of the same tenant
            sources = [t for other_tenant, t in submitted.values() if other_tenant == tenant and strictly_same(t, text)]
            assert result.text in {answer_for(t) for t in sources}, f"item {item_id} got an unrelated answer"
        else:
            assert result.text == answer_for(text), f"item {item_id} got another prompt's answer"
        if result.batch_id and not result.cached:
            batches_by_tenant[tenant].add(result.batch_id)

    calls = cohort.upstream_calls() - calls_before
    assert repeats == 50 and 0 < calls <= len(submitted) - repeats
    assert not batches_by_tenant["acme"] & batches_by_tenant["globex"], "a batch mixed two tenants"


def test_any_celery_client_reads_the_answer_by_id(cohort: Cohort) -> None:
    handle = cohort.client.submit("What is the exchange rate for euros today?", tenant="acme")
    app = Celery("any-client", broker=cohort.client.settings.redis.url, backend=cohort.client.settings.redis.url)
    app.conf.update(accept_content=["json"], result_accept_content=["json"])
    answer = app.AsyncResult(handle.id).get(timeout=60)
    assert answer["text"] == answer_for("What is the exchange rate for euros today?")
    assert answer["tier"] and answer["tokens_in"] >= 0 and "end_to_end_s" in answer["timings"]


def test_identical_prompts_are_answered_by_one_call(cohort: Cohort) -> None:
    before = cohort.upstream_calls()
    handles = cohort.client.submit_many(["Where is my new card? It has not arrived yet."] * 12, tenant="acme")
    results = cohort.client.wait([h.id for h in handles], timeout=60)
    assert all(isinstance(r, PromptResult) for r in results)
    assert len({r.text for r in results}) == 1
    assert cohort.upstream_calls() - before == 1
    assert sum(not r.coalesced for r in results) == 1


def test_cli_reads_jsonl_from_stdin_and_prints_answers(cohort: Cohort) -> None:
    lines = [json.dumps({"prompt": "How do I close my account?", "metadata": {"row": 1}}),
             "not json", json.dumps({"prompt": ""}),
             json.dumps({"prompt": "Can I get a second card?", "complexity": "simple"})]
    process = subprocess.run([sys.executable, "-m", "ops.cli", "submit", "--jsonl", "--timeout", "60"],
                             input="\n".join(lines) + "\n", cwd=REPO_ROOT, env=cohort.env, capture_output=True,
                             text=True, timeout=120)
    out = [json.loads(line) for line in process.stdout.splitlines()]
    assert process.returncode == 1  # two lines were refused
    assert [o["line"] for o in out] == [1, 2, 3, 4]
    assert out[0]["text"] == answer_for("How do I close my account?") and out[0]["metadata"] == {"row": 1}
    assert out[1]["error"]["code"] == "invalid_prompt" and "not valid JSON" in out[1]["error"]["message"]
    assert out[2]["error"]["code"] == "invalid_prompt" and "empty" in out[2]["error"]["message"]
    assert out[3]["text"] == answer_for("Can I get a second card?")


def test_one_grouper_at_a_time_with_two_beats_and_two_groupers() -> None:
    with run_cohort(db=DB + 1, concurrency=8) as cohort:
        cohort.start_grouper("grouper2")
        cohort.start_beat("beat2")
        prompts = [p.text for p in banking77(limit=300)]
        handles = cohort.client.submit_many(prompts, tenant="acme")
        results = cohort.client.wait([h.id for h in handles], timeout=120)
        for prompt, result in zip(prompts, results, strict=True):
            assert isinstance(result, PromptResult)
            assert result.coalesced or result.text == answer_for(prompt)
        counters = {k.decode(): float(v) for k, v in cohort.redis.hgetall(cohort.keys.counters()).items()}
        batched = [h.id for h in handles if cohort.redis.hget(cohort.keys.item_status(h.id), "batch") is not None]
        # Each item was put in a batch at most once: two groupers never dispatched the same items.
        assert batched and counters["batched_items"] == len(batched)


def test_paraphrases_and_repeats_all_get_an_answer_of_their_own_request(cohort: Cohort) -> None:
    from ops.workloads import support_stream

    prompts = [p.text for p in support_stream(240, seed=7)]
    before = cohort.upstream_calls()
    handles = cohort.client.submit_many(prompts, tenant="globex")
    results = cohort.client.wait([h.id for h in handles], timeout=120)
    for prompt, result in zip(prompts, results, strict=True):
        assert isinstance(result, PromptResult), result
        sources = [p for p in prompts if strictly_same(p, prompt)]
        assert result.text in {answer_for(p) for p in sources}
    assert cohort.upstream_calls() - before < len(set(prompts))
