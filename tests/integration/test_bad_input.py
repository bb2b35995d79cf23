"""Bad input gets a clear error naming the problem, at the earliest point, and disturbs nothing else.

- Producer side (no worker needed): each bad submission is refused by ``CohortClient.submit`` and
  by ``cohort submit --jsonl`` with a ``SubmitError`` whose message and ``field`` name the problem,
  and nothing is written to Redis.
- Worker side (a running stack on db 3): what only a worker can see (a provider answering non-JSON,
  a truncated body, the wrong number of packed answers; an item body corrupted in Redis; a tier
  pinned by an old producer) ends each item answered correctly or failed with an error that names
  the cause, while an innocent tenant's items submitted alongside all get their right answers.
- A malformed config file stops a worker at start with a message naming the bad key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from ops.configfile import write_config
from ops.simulator import answer_for
from ops.workloads import banking77
from producers import CohortClient, CohortError, PromptResult, SubmitError, UnknownTenant, load_producer_settings
from producers.schema import build_item
from tests.support.cluster import REPO_ROOT, Cohort, run_cohort, wait_until

pytestmark = pytest.mark.timeout(180)

DB = 3
REDIS_URL = f"redis://127.0.0.1:6379/{DB}"
TENANTS = {"acme": {"coalesce": True}, "globex": {"coalesce": True}}
TIER = "no-such-tier"


# --- producer side --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def producer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CohortClient]:
    """A client whose config lists tenants and tiers; the prefix is this module's own."""
    path = write_config(tmp_path_factory.mktemp("bad-input") / "cohort.toml",
                        {"redis": {"url": REDIS_URL, "key_prefix": f"bad{uuid.uuid4().hex[:6]}"}, "tenants": TENANTS})
    client = CohortClient(load_producer_settings(path, env={}))
    yield client
    for key in client.redis.scan_iter(match=f"{client.keys.prefix}:*", count=1000):
        client.redis.delete(key)
    client.close()


def _written(client: CohortClient) -> list[bytes]:
    return list(client.redis.scan_iter(match=f"{client.keys.prefix}:*", count=1000))


# (prompt, submit keyword arguments, field named, words the message must contain)
BAD_SUBMISSIONS: list[tuple[str, Any, dict[str, Any], str, list[str]]] = [
    ("empty", "", {}, "prompt", ["prompt", "empty"]),
    ("whitespace only", " \n\t  \u3000", {}, "prompt", ["prompt", "whitespace"]),
    ("above the maximum", "x" * 32_001, {}, "prompt", ["prompt", "32001", "maximum of 32000"]),
    ("invalid UTF-8 bytes", b"caf\xc3 \xff\xfe", {}, "prompt", ["prompt", "UTF-8"]),
    ("lone surrogate", "half a pair \udc80", {}, "prompt", ["prompt", "UTF-8"]),
    ("NUL character", "a\x00b", {}, "prompt", ["prompt", "NUL"]),
    ("prompt of the wrong type", 42, {}, "prompt", ["prompt", "string", "int"]),
    ("prompt as a list", ["a question"], {}, "prompt", ["prompt", "string", "list"]),
    ("missing prompt", None, {}, "prompt", ["prompt", "required"]),
    ("negative max_tokens", "ok?", {"max_tokens": -5}, "max_tokens", ["max_tokens", "between 1 and", "-5"]),
    ("zero max_tokens", "ok?", {"max_tokens": 0}, "max_tokens", ["max_tokens", "between 1 and"]),
    ("absurd max_tokens", "ok?", {"max_tokens": 10**12}, "max_tokens", ["max_tokens", "32768"]),
    ("max_tokens as a string", "ok?", {"max_tokens": "100"}, "max_tokens", ["max_tokens", "integer"]),
    ("max_tokens as a boolean", "ok?", {"max_tokens": True}, "max_tokens", ["max_tokens", "integer"]),
    ("max_tokens as a float", "ok?", {"max_tokens": 12.5}, "max_tokens", ["max_tokens", "integer"]),
    ("temperature as text", "ok?", {"temperature": "hot"}, "temperature", ["temperature"]),
    ("temperature NaN", "ok?", {"temperature": float("nan")}, "temperature", ["temperature"]),
    ("unknown tenant", "ok?", {"tenant": "mallory"}, "tenant", ["unknown tenant", "mallory"]),
    ("tenant of the wrong type", "ok?", {"tenant": 7}, "tenant", ["tenant", "string"]),
    ("unknown tier", "ok?", {"params": {"model": TIER}}, "model", ["tier", TIER]),
    ("unknown model parameter", "ok?", {"params": {"max_tokenz": 5}}, "params", ["max_tokenz"]),
    ("params of the wrong type", "ok?", {"params": "fast"}, "params", ["params"]),
    ("unknown complexity", "ok?", {"complexity": "hard"}, "complexity", ["complexity", "hard"]),
    ("metadata not an object", "ok?", {"metadata": [1, 2]}, "metadata", ["metadata", "object"]),
    ("metadata too big", "ok?", {"metadata": {"x": "y" * 5000}}, "metadata", ["metadata", "4096"]),
    ("negative deadline", "ok?", {"deadline": -1}, "deadline", ["deadline"]),
    ("coalesce as text", "ok?", {"coalesce": "yes"}, "coalesce", ["coalesce", "boolean"]),
    ("zero max_cost", "ok?", {"max_cost": 0}, "max_cost", ["max_cost", "positive"]),
    ("context above the maximum", "ok?", {"context": "c" * 32_001}, "context", ["context", "maximum"]),
]


@pytest.mark.parametrize(("prompt", "kwargs", "field", "words"), [c[1:] for c in BAD_SUBMISSIONS],
                         ids=[c[0] for c in BAD_SUBMISSIONS])
def test_client_refuses_bad_submissions_naming_the_problem(producer: CohortClient, prompt: Any,
                                                           kwargs: dict[str, Any], field: str,
                                                           words: list[str]) -> None:
    with pytest.raises(SubmitError) as info:
        producer.submit(prompt, **{"tenant": "acme", **kwargs})
    error = info.value
    assert error.details.get("field") == field, error.to_dict()
    for word in words:
        assert word in error.message, f"{word!r} not in {error.message!r}"
    if kwargs.get("tenant") == "mallory":
        assert isinstance(error, UnknownTenant)
    assert not _written(producer), "a refused submission wrote to Redis"


def test_one_bad_entry_refuses_the_whole_submit_many(producer: CohortClient) -> None:
    with pytest.raises(SubmitError, match="line|prompt"):
        producer.submit_many(["a fine question?", "", "another fine question?"], tenant="acme")
    assert not _written(producer)


def test_the_prompt_limit_follows_the_config(tmp_path: Path) -> None:
    path = write_config(tmp_path / "cohort.toml", {"redis": {"url": REDIS_URL, "key_prefix": "badlimit"},
                                                   "limits": {"max_prompt_chars": 100}})
    client = CohortClient(load_producer_settings(path, env={}))
    try:
        with pytest.raises(SubmitError, match="101 characters, above the maximum of 100"):
            client.submit("x" * 101)
        assert not list(client.redis.scan_iter(match="badlimit:*"))
    finally:
        client.close()


def _cli(env: dict[str, str], args: list[str], data: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "ops.cli", "submit", *args], input=data, cwd=REPO_ROOT, env=env,
                          capture_output=True, timeout=120)


@pytest.fixture
def cli_env(tmp_path: Path) -> Iterator[tuple[dict[str, str], str]]:
    prefix = f"badcli{uuid.uuid4().hex[:6]}"
    path = write_config(tmp_path / "cohort.toml", {"redis": {"url": REDIS_URL, "key_prefix": prefix},
                                                   "tenants": TENANTS})
    env = {**os.environ, "COHORT_CONFIG": str(path)}
    env.pop("COHORT_REDIS_URL", None)
    env.pop("COHORT_KEY_PREFIX", None)
    yield env, prefix
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        client.delete(key)
    client.close()


CLI_LINES: list[tuple[bytes, str | None, list[str]]] = [
    # (JSONL line, error code or None for accepted, words the message must contain)
    (json.dumps({"prompt": "How do I order a new card?", "tenant": "acme"}).encode(), None, []),
    (json.dumps({"prompt": ""}).encode(), "invalid_prompt", ["prompt", "empty"]),
    (json.dumps({"prompt": "   "}).encode(), "invalid_prompt", ["whitespace"]),
    (json.dumps({"prompt": "x" * 32_001}).encode(), "invalid_prompt", ["32001", "maximum of 32000"]),
    (b'{"prompt": "raw bytes \xff\xfe here"}', "invalid_prompt", ["prompt", "UTF-8"]),
    (json.dumps({"prompt": "escaped \udc80 surrogate"}).encode(), "invalid_prompt", ["UTF-8"]),
    (json.dumps({"prompt": 12}).encode(), "invalid_prompt", ["prompt", "string"]),
    (json.dumps({"prompt": "ok?", "max_tokens": -1}).encode(), "invalid_prompt", ["max_tokens"]),
    (json.dumps({"prompt": "ok?", "max_tokens": 10**9}).encode(), "invalid_prompt", ["max_tokens"]),
    (json.dumps({"prompt": "ok?", "tenant": "mallory"}).encode(), "unknown_tenant", ["mallory"]),
    (json.dumps({"prompt": "ok?", "params": {"model": TIER}}).encode(), "invalid_prompt", [TIER]),
    (json.dumps({"prompt": "ok?", "colour": "red"}).encode(), "invalid_prompt", ["colour"]),
    (b"not json at all", "invalid_prompt", ["line 13", "not valid JSON"]),
    (b'["a", "list"]', "invalid_prompt", ["line 14", "object"]),
    (json.dumps({"prompt": "Can I get a second card?", "tenant": "globex"}).encode(), None, []),
]


def _check_cli_output(out: bytes) -> None:
    rows = [json.loads(line) for line in out.decode().splitlines()]
    assert [r["line"] for r in rows] == list(range(1, len(CLI_LINES) + 1))
    for row, (_, code, words) in zip(rows, CLI_LINES, strict=True):
        if code is None:
            assert "id" in row and "error" not in row, row
            continue
        assert row["error"]["code"] == code, row
        for word in words:
            assert word in row["error"]["message"], (word, row)


def test_cli_refuses_each_bad_jsonl_line_and_submits_the_others_from_stdin(
        cli_env: tuple[dict[str, str], str]) -> None:
    env, prefix = cli_env
    done = _cli(env, ["--jsonl", "--no-wait", "--tenant", "acme"], b"\n".join(line for line, _, _ in CLI_LINES) + b"\n")
    assert done.returncode == 1, done.stderr.decode()  # some lines were refused
    _check_cli_output(done.stdout)
    client = redis.Redis.from_url(REDIS_URL)
    assert client.xlen(f"{prefix}:pending") == 2  # the two good lines only
    client.close()


def test_cli_refuses_an_invalid_utf8_line_in_a_file(cli_env: tuple[dict[str, str], str], tmp_path: Path) -> None:
    env, _ = cli_env
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b"\n".join(line for line, _, _ in CLI_LINES) + b"\n")
    done = _cli(env, ["--jsonl", "--no-wait", "--tenant", "acme", str(path)], b"")
    _check_cli_output(done.stdout)


# --- a malformed config file stops a worker at start ----------------------------------------------
BAD_CONFIGS: list[tuple[str, str, list[str]]] = [
    ("unknown key", '[delivery]\nvisiblity_timeout_s = 10\n', ["delivery.visiblity_timeout_s"]),
    ("wrong type", '[grouping]\nmax_batch_size = "lots"\n', ["grouping.max_batch_size", "int"]),
    ("out of range", '[delivery]\nmax_redeliveries = -1\n', ["delivery.max_redeliveries", "at least"]),
    ("not TOML", '[grouping\ninterval_s = 0.25\n', ["not valid TOML", "cohort.toml"]),
    ("bad tier", '[[tiers]]\nname = "primary"\nprovider = "openai"\nmodel = "m"\n'
                 'base_url = "http://127.0.0.1:9/v1"\nprice_in_per_1k = "cheap"\n', ["price_in_per_1k"]),
]


def _start_workers_and_check(tmp_path: Path, configs: list[tuple[str, str, list[str]]], timeout: float) -> None:
    processes = {}
    for name, text, _ in configs:
        folder = tmp_path / name.replace(" ", "-")
        folder.mkdir()
        (folder / "cohort.toml").write_text(f'[redis]\nurl = "{REDIS_URL}"\nkey_prefix = "badcfg"\n' + text
                                            if name != "not TOML" else text)
        env = {**os.environ, "COHORT_CONFIG": str(folder / "cohort.toml"), "HF_HUB_OFFLINE": "1"}
        env.pop("COHORT_REDIS_URL", None)
        processes[name] = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", "inference", "-P", "solo",
             "--without-gossip", "--without-mingle", "-l", "warning", "-n", f"badcfg-{folder.name}@test"],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    failures = []
    deadline = time.monotonic() + timeout  # the workers start side by side: one deadline for all
    try:
        for name, _, words in configs:
            process = processes[name]
            try:
                out, _ = process.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                out, _ = process.communicate()
                failures.append(f"{name}: the worker kept running with a malformed config:\n{out.decode()[-1500:]}")
                continue
            text = out.decode(errors="replace")
            if process.returncode == 0:
                failures.append(f"{name}: exit status 0")
            missing = [w for w in words if w not in text]
            if missing:
                failures.append(f"{name}: {missing} not in the output:\n{text[-1500:]}")
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, 9)
                process.wait()
    assert not failures, "\n\n".join(failures)


def test_a_worker_with_a_malformed_config_exits_naming_the_bad_key(tmp_path: Path) -> None:
    _start_workers_and_check(tmp_path, BAD_CONFIGS, timeout=30)


# --- worker side: a running stack -----------------------------------------------------------------
@pytest.fixture(scope="module")
def cohort() -> Iterator[Cohort]:
    config = {"tenants": TENANTS, "grouping": {"interval_s": 0.25, "max_batch_size": 8, "max_wait_s": 0.3},
              "routing": {"backoff_base_s": 0.05, "backoff_max_s": 0.2}}
    with run_cohort(db=DB, config=config, concurrency=4) as running:
        yield running


def _questions(tag: str, n: int, offset: int) -> list[str]:
    texts = [p.text for p in banking77(limit=offset + n)][offset:]
    return [f"{t} ({tag} {i})" for i, t in enumerate(texts)]


def _check_clear(outcome: PromptResult | CohortError, prompt: str, *, fault_words: list[str]) -> str:
    """An answer must be the right one; an error must name the fault. Returns the outcome's kind."""
    if isinstance(outcome, PromptResult):
        assert outcome.text == answer_for(prompt), "a wrong answer was delivered"
        return "answered"
    text = json.dumps(outcome.to_dict()).lower()
    # After repeated faults every tier's circuit may be open: the error then names that instead.
    words = [*fault_words, "circuit_open"]
    assert any(w.lower() in text for w in words), f"the error does not name the fault: {outcome.to_dict()}"
    return "failed"


def test_worker_side_bad_items_fail_clearly_and_an_innocent_tenant_is_not_disturbed(cohort: Cohort) -> None:
    """While ``acme`` sends every kind of bad input, ``globex``'s questions all get their right answers."""
    innocent = _questions("globex", 40, offset=2000)
    innocent_ids: list[str] = []
    submitter = threading.Thread(
        target=lambda: innocent_ids.extend(h.id for h in cohort.client.submit_many(innocent, tenant="globex")))
    submitter.start()

    refused = 0
    for _, prompt, kwargs, _, _ in BAD_SUBMISSIONS:
        try:
            cohort.client.submit(prompt, **{"tenant": "acme", **kwargs})
        except SubmitError:
            refused += 1
    assert refused == len(BAD_SUBMISSIONS)

    # What an older producer, or a bug, could still put in Redis: a tier that does not exist, and a
    # body that is not JSON. Each fails alone, naming its problem.
    pinned = build_item("Which tier answers this?", tenant="acme", params={"model": TIER})
    cohort.client.enqueue([pinned])
    corrupt_id = str(uuid.uuid4())
    pipe = cohort.redis.pipeline(transaction=True)
    pipe.set(cohort.keys.item(corrupt_id), b"{not json")
    pipe.hset(cohort.keys.item_status(corrupt_id), mapping={"status": "queued", "tenant": "acme"})
    pipe.xadd(cohort.keys.pending_stream(), {"id": corrupt_id})
    pipe.execute()

    submitter.join(timeout=60)
    assert len(innocent_ids) == len(innocent)
    pinned_outcome, corrupt_outcome = cohort.client.wait([pinned.id, corrupt_id], timeout=60)
    assert isinstance(pinned_outcome, CohortError) and TIER in pinned_outcome.message, pinned_outcome
    assert isinstance(corrupt_outcome, CohortError) and "not valid JSON" in corrupt_outcome.message, corrupt_outcome
    outcomes = cohort.client.wait(innocent_ids, timeout=120)
    for prompt, outcome in zip(innocent, outcomes, strict=True):
        assert isinstance(outcome, PromptResult), outcome
        assert outcome.text == answer_for(prompt)
    wait_until(lambda: cohort.redis.zcard(cohort.keys.inflight()) == 0, timeout=30, message="no batch in flight")


FAULTS: list[tuple[str, dict[str, float], list[str], bool]] = [
    # (name, simulator knobs, words a final error must contain, whether every item must be answered)
    ("non-JSON body, sometimes", {"malformed_rate": 0.3}, ["not json"], False),
    ("truncated body, sometimes", {"truncated_rate": 0.3}, ["not json", "truncated", "cut"], False),
    ("wrong number of packed answers", {"packed_miscount_rate": 1.0}, [], True),
    ("non-JSON body, always", {"malformed_rate": 1.0}, ["not json"], False),
    ("truncated body, always", {"truncated_rate": 1.0}, ["not json", "truncated", "cut"], False),
]


@pytest.mark.parametrize(("knobs", "words", "all_answered"), [f[1:] for f in FAULTS], ids=[f[0] for f in FAULTS])
def test_provider_faults_end_each_item_answered_or_failed_clearly(cohort: Cohort, knobs: dict[str, float],
                                                                  words: list[str], all_answered: bool) -> None:
    cohort.sim.reset()
    cohort.sim.set_faults("*", **knobs)
    try:
        prompts = _questions(f"fault {uuid.uuid4().hex[:6]}", 24, offset=1000)
        handles = cohort.client.submit_many(prompts, tenant="acme")
        outcomes = cohort.client.wait([h.id for h in handles], timeout=120)
    finally:
        cohort.sim.reset()
    kinds = [_check_clear(o, p, fault_words=words) for o, p in zip(outcomes, prompts, strict=True)]
    print(f"\n[bad input] {knobs}: {kinds.count('answered')} answered, {kinds.count('failed')} failed clearly")
    if all_answered:
        assert kinds.count("answered") == len(prompts)
    if knobs.get("malformed_rate") == 1.0 or knobs.get("truncated_rate") == 1.0:
        assert kinds.count("failed") == len(prompts)
