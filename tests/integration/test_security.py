"""Security on real processes: JSON only, keys and prompts never leak, tenants isolated, Redis auth and TLS.

- No pickle: every Celery app of Cohort accepts JSON only, and a pickle message put on a worker's
  queue is refused without being unpickled (an unpickled payload would create a marker file).
- Keys never leak: a stack runs with a distinctive provider key (the simulator requires it) and
  distinctive prompt text, its workers and beat logging at ``info``. Neither string appears in the
  logs, in the task messages (read from the broker before any worker takes them, and as Flower sees
  them through Celery's events), in any Redis key other than the item bodies, or in ``/metrics``.
- Tenants are isolated: the same prompt from two tenants is answered by two upstream calls, never
  by one tenant's batch, coalesced answer or cache.
- Redis with a password, and Redis over TLS (``rediss://``), work end to end through the settings,
  and fail clearly without the password or the CA.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pickle
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from celery import Celery

from ops.monitor.server import MonitorApp, MonitorServer
from ops.monitor.settings import monitor_settings
from ops.simulator import answer_for
from producers import CohortClient, PromptResult
from producers.settings import load_producer_settings, read_config
from tests.support.cluster import REPO_ROOT, Cohort, run_cohort, wait_until
from tests.support.redis_server import RedisServer, tls_material
from workers.app import celery_config
from workers.settings import worker_settings

pytestmark = pytest.mark.timeout(180)

DB = 4
KEY = f"sk-cohort-leakcheck-{uuid.uuid4().hex}"
SECRET_WORDS = f"Quokka{uuid.uuid4().hex[:10]}"
PROMPTS = [f"{SECRET_WORDS} asks: how do I freeze my card number {i}?" for i in range(12)]


# --- JSON only ------------------------------------------------------------------------------------
def test_every_celery_app_accepts_json_only() -> None:
    conf = celery_config(worker_settings({}, env={}))
    assert conf["accept_content"] == ["json"]
    assert conf["result_accept_content"] == ["json"]
    assert conf["task_serializer"] == conf["result_serializer"] == "json"
    client = CohortClient(load_producer_settings(env={}), redis_client=redis.Redis())
    try:
        producer_conf = client._celery_app().conf
        assert list(producer_conf.accept_content) == ["json"] and producer_conf.task_serializer == "json"
    finally:
        client.close()


class _Unpickled:
    """Unpickling this creates a file: the proof that a worker deserialized pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


# --- the shared stack: distinctive key, info logs, no inference worker at first -----------------
@pytest.fixture(scope="module")
def cohort() -> Iterator[Cohort]:
    config = {"grouping": {"interval_s": 0.25, "max_batch_size": 8, "max_wait_s": 0.3}}
    with run_cohort(db=DB, config=config, sim_options={"require_key": KEY}, env={"COHORT_SIM_KEY": KEY},
                    grouper=False, beat=False, inference_workers=0) as running:
        node = f"grouper-{uuid.uuid4().hex[:6]}@test"
        running.start("grouper", ["worker", "-Q", "grouper", "-P", "solo", "-n", node, "--without-gossip",
                                  "--without-mingle", "-l", "info"], node=node)
        running.start("beat", ["beat", "-s", str(running.workdir / "beat-schedule"), "--pidfile=", "-l", "info"])
        yield running


def _start_inference(cohort: Cohort) -> None:
    if "inference" in cohort.processes:
        return
    node = f"inference-{uuid.uuid4().hex[:6]}@test"
    cohort.start("inference", ["worker", "-Q", "inference", "-P", "threads", "-c", "4", "-n", node,
                               "--without-gossip", "--without-mingle", "-l", "info"], node=node)


class EventTap:
    """What Flower sees: every Celery event (task-sent, -received, -succeeded... with args and results)."""

    def __init__(self, url: str) -> None:
        self.app = Celery("event-tap", broker=url, set_as_current=False)
        self.app.conf.update(accept_content=["json"], broker_connection_retry_on_startup=True)
        self.events: list[dict[str, Any]] = []
        self._receiver: Any = None
        self._thread = threading.Thread(target=self._run, name="event-tap", daemon=True)

    def _run(self) -> None:
        with self.app.connection_for_read() as conn:
            self._receiver = self.app.events.Receiver(conn, handlers={"*": self.events.append})
            self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def __enter__(self) -> EventTap:
        self._thread.start()
        # Subscribed once a probe event of our own comes back.
        with self.app.connection_for_write() as conn:
            dispatcher = self.app.events.Dispatcher(conn, enabled=True)
            wait_until(lambda: dispatcher.send("tap-probe") is None and any(
                e.get("type") == "tap-probe" for e in self.events), timeout=20, interval=0.1,
                message="the event receiver to subscribe")
            dispatcher.close()
        return self

    def __exit__(self, *_: Any) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(timeout=10)


def _expand(raw: bytes) -> bytes:
    """A stored value, plus the decoded body if it is a kombu message (bodies are base64 JSON)."""
    parts = [raw]
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return raw
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            body = value.get("body")
            if isinstance(body, str):
                with contextlib.suppress(ValueError):
                    parts.append(base64.b64decode(body, validate=True))
            stack += list(value.values())
        elif isinstance(value, list):
            stack += value
    return b"\n".join(parts)


def _dump(client: redis.Redis, key: bytes) -> bytes:
    kind = client.type(key).decode()
    if kind == "string":
        values = [client.get(key) or b""]
    elif kind == "hash":
        values = [b for kv in client.hgetall(key).items() for b in kv]
    elif kind == "list":
        values = client.lrange(key, 0, -1)
    elif kind == "set":
        values = list(client.smembers(key))
    elif kind == "zset":
        values = [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
    elif kind == "stream":
        values = [b for _, fields in client.xrange(key) for kv in fields.items() for b in kv]
    else:
        values = []
    return b"\n".join([key, *(_expand(v) for v in values)])


def _leaks(text: bytes) -> list[str]:
    return [name for name, secret in (("the provider key", KEY), ("the prompt text", SECRET_WORDS))
            if secret.encode() in text]


def test_keys_and_prompts_never_leak(cohort: Cohort) -> None:
    url = cohort.client.settings.redis.url
    with EventTap(url) as tap:
        handles = cohort.client.submit_many(PROMPTS, tenant="acme")
        # The task messages, read from the broker before any inference worker takes them.
        queue = cohort.keys.broker_queue("inference")

        def all_sent() -> bool:
            statuses = [cohort.redis.hmget(cohort.keys.item_status(h.id), "status", "batch") for h in handles]
            if not all(status == b"batched" for status, _ in statuses):
                return False
            # A batch is recorded before its task is sent: wait for every task in the queue too.
            return int(cohort.redis.llen(queue)) >= len({batch for _, batch in statuses})

        wait_until(all_sent, timeout=60, message="every item in a batch whose task is in the queue")
        messages = cohort.redis.lrange(queue, 0, -1)
        assert messages
        for message in messages:
            decoded = _expand(message)
            assert b"cohort.run_batch" in decoded
            assert not _leaks(decoded), decoded[:2000]
        _start_inference(cohort)
        outcomes = cohort.client.wait([h.id for h in handles], timeout=90)
        wait_until(lambda: any(e.get("type") == "task-succeeded" for e in tap.events), timeout=30,
                   message="task events")
    for prompt, outcome in zip(PROMPTS, outcomes, strict=True):
        assert isinstance(outcome, PromptResult) and outcome.text == answer_for(prompt), outcome
    stats = cohort.sim.stats()
    assert stats["calls"] and "auth" not in json.dumps(stats["calls"]), "the provider refused the key"

    found: dict[str, list[str]] = {}
    # Flower's view: task events carry args, kwargs and results.
    kinds = {e.get("type") for e in tap.events}
    assert {"task-sent", "task-received", "task-succeeded"} <= kinds, kinds
    events_text = json.dumps(tap.events, default=str).encode()
    found["task events"] = _leaks(events_text)
    # Logs of every process (workers and beat at info).
    for name in cohort.processes:
        found[f"{name} log"] = _leaks((cohort.workdir / f"{name}.log").read_bytes())
    found["simulator log"] = _leaks(cohort.sim.logs().encode())
    # Redis: every key but the item bodies (which must hold the prompt).
    item_prefix = cohort.keys.item("").encode()
    bodies = 0
    for key in cohort.redis.scan_iter(count=1000):
        if key.startswith(item_prefix):
            bodies += _leaks(_dump(cohort.redis, key)) == ["the prompt text"]  # the search does find it
            continue
        leaks = _leaks(_dump(cohort.redis, key))
        if leaks:
            found[f"redis key {key.decode(errors='replace')}"] = leaks
    assert bodies >= len(PROMPTS)
    # /metrics, as Prometheus scrapes it (behind basic auth outside the demo).
    config = read_config(cohort.config_path)
    auth = ("ops", "pw-" + uuid.uuid4().hex[:8])
    settings = monitor_settings(config, {"COHORT_MONITOR_USER": auth[0], "COHORT_MONITOR_PASSWORD": auth[1]}, port=0)
    server = MonitorServer(MonitorApp(settings, config)).start()
    try:
        assert httpx.get(server.url + "/metrics", timeout=10).status_code == 401
        metrics = httpx.get(server.url + "/metrics", auth=auth, timeout=10)
        assert metrics.status_code == 200 and "cohort" in metrics.text
        found["/metrics"] = _leaks(metrics.content)
    finally:
        server.stop()
    found = {where: leaks for where, leaks in found.items() if leaks}
    assert not found, f"secrets found in: {found}"


def test_a_pickle_message_is_refused_and_never_unpickled(cohort: Cohort, tmp_path: Path) -> None:
    _start_inference(cohort)
    marker = tmp_path / "unpickled"
    assert pickle.loads(pickle.dumps(_Unpickled(tmp_path / "self-check"))) is not None  # the payload works
    assert (tmp_path / "self-check").exists()
    attacker = Celery("attacker", broker=cohort.client.settings.redis.url, set_as_current=False)
    attacker.conf.update(task_serializer="pickle", accept_content=["pickle", "json"])
    for queue in ("inference", "grouper"):
        attacker.send_task("cohort.run_batch", args=[_Unpickled(marker)], queue=queue, serializer="pickle")
    wait_until(lambda: all(cohort.redis.llen(cohort.keys.broker_queue(q)) == 0 for q in ("inference", "grouper")),
               timeout=30, message="the pickle messages to be taken")
    wait_until(lambda: "untrusted content of type pickle" in cohort.log("inference")
               and "untrusted content of type pickle" in cohort.log("grouper"), timeout=30,
               message="the workers to refuse the pickle messages")
    assert not marker.exists(), "a worker unpickled a message"
    # The refused messages are dropped, not left to be redelivered.
    assert all(b"x-python-serialize" not in v for v in cohort.redis.hvals("unacked"))


def test_tenants_never_share_batches_answers_or_cache(cohort: Cohort) -> None:
    _start_inference(cohort)
    prompt = f"Is my card blocked? case {uuid.uuid4().hex[:6]}"

    def upstream() -> int:
        return int(sum(cohort.sim.stats()["prompts"].values()))

    before = upstream()
    acme = cohort.client.submit_many([prompt, prompt], tenant="acme")
    globex = cohort.client.submit(prompt, tenant="globex")
    results = cohort.client.wait([*(h.id for h in acme), globex.id], timeout=60)
    assert all(isinstance(r, PromptResult) and r.text == answer_for(prompt) for r in results), results
    acme_results, globex_result = results[:2], results[2]
    assert isinstance(globex_result, PromptResult)
    # Within a tenant the duplicate is answered once; across tenants, never.
    assert sum(not r.coalesced for r in acme_results if isinstance(r, PromptResult)) == 1
    assert not globex_result.coalesced and not globex_result.cached
    assert globex_result.batch_id not in {r.batch_id for r in acme_results if isinstance(r, PromptResult)}
    assert upstream() - before == 2
    # After both answered: a new copy of acme is served from acme's answer, one of initech is computed.
    again = cohort.client.submit(prompt, tenant="acme").result(timeout=60)
    assert again.coalesced or again.cached
    assert upstream() - before == 2
    other = cohort.client.submit(prompt, tenant="initech").result(timeout=60)
    assert not other.coalesced and not other.cached
    assert upstream() - before == 3


# --- Redis with a password ----------------------------------------------------------------------
def test_redis_password_end_to_end_and_a_clear_refusal_without_it(tmp_path: Path) -> None:
    password = f"pw-{uuid.uuid4().hex[:12]}"
    with RedisServer(password=password, directory=tmp_path) as server:
        refused_url = f"redis://127.0.0.1:{server.port}/0"
        for url in (refused_url, f"redis://:wrong-{password}@127.0.0.1:{server.port}/0"):
            bad = CohortClient(load_producer_settings(env={"COHORT_REDIS_URL": url}))
            with pytest.raises(redis.AuthenticationError, match="authenticat|password"):
                bad.submit("Does this get in?")
            bad.close()
        with run_cohort(db=0, redis_base=server.base_url, concurrency=2,
                        config={"grouping": {"interval_s": 0.25, "max_batch_size": 8, "max_wait_s": 0.3}}) as cohort:
            assert cohort.client.settings.redis.url == server.url(0)
            prompts = [f"What is the fee for transfer number {i}?" for i in range(6)]
            outcomes = cohort.client.wait([h.id for h in cohort.client.submit_many(prompts)], timeout=60)
            assert [o.text for o in outcomes if isinstance(o, PromptResult)] == [answer_for(p) for p in prompts]
            # A worker configured without the password says why it cannot work, and never runs a task.
            env = {**cohort.env, "COHORT_REDIS_URL": refused_url}
            worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", "inference",
                                       "-P", "solo", "--without-gossip", "--without-mingle", "-l", "warning",
                                       "-n", "nopassword@test"], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, start_new_session=True)
            try:
                out, _ = worker.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, 9)
                out, _ = worker.communicate()
            text = out.decode(errors="replace")
            assert "Authentication required" in text or "AuthenticationError" in text or "NOAUTH" in text, text[-2000:]
            assert password not in text


# --- Redis over TLS -----------------------------------------------------------------------------
def test_redis_over_tls_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        material = tls_material(tmp_path / "tls")
    except RuntimeError as exc:
        pytest.skip(f"cannot make a test certificate: {exc}")
    server = RedisServer(tls=material, plain=False, directory=tmp_path)
    try:
        server.start()
    except RuntimeError as exc:
        server.close()
        if "tls" in str(exc).lower():
            pytest.skip(f"this redis-server has no TLS support: {exc}")
        raise
    try:
        # Without the CA the certificate is refused; plain text on the TLS port gets nowhere.
        with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            redis.Redis.from_url(f"rediss://127.0.0.1:{server.tls_port}/0?ssl_cert_reqs=required",
                                 socket_timeout=3).ping()
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(f"redis://127.0.0.1:{server.tls_port}/0", socket_timeout=3,
                                 socket_connect_timeout=3).ping()
        # The launcher's own clients (flush, heartbeats) find the test CA through SSL_CERT_FILE; every
        # Cohort process gets the URL with the CA from its settings. The server has no plain port.
        monkeypatch.setenv("SSL_CERT_FILE", str(material.ca))
        prefix = f"tls{uuid.uuid4().hex[:6]}"
        with run_cohort(db=0, redis_base=f"rediss://127.0.0.1:{server.tls_port}", concurrency=2,
                        config={"redis": {"url": server.tls_url(0), "key_prefix": prefix},
                                "grouping": {"interval_s": 0.25, "max_batch_size": 8, "max_wait_s": 0.3}}) as cohort:
            assert cohort.client.settings.redis.url.startswith("rediss://")
            prompts = [f"Can I pay with card number {i} abroad?" for i in range(6)]
            outcomes = cohort.client.wait([h.id for h in cohort.client.submit_many(prompts)], timeout=60)
            assert [o.text for o in outcomes if isinstance(o, PromptResult)] == [answer_for(p) for p in prompts]
            assert len(cohort.redis.client_list()) >= 3  # grouper, inference worker, beat: all over TLS
    finally:
        server.close()
