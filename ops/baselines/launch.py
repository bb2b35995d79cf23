"""Starting baseline workers on this machine, submitting prompts to them, and stopping them.

    with run_baseline("per-prompt", redis_url=url, config_path=path, workers=2, concurrency=16) as base:
        ids = base.submit(["How do I reset my PIN?"])
        base.result_key(ids[0])        # where the Celery result backend stores its answer

Each worker is ``python -m celery -A ops.baselines.<module> worker`` with a node name of its own;
the processes run in their own session so that stopping them also stops a prefork pool.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import redis
from celery import Celery

from ops.baselines.settings import REDIS_URL_ENV, TIER_ENV

BaselineKind = Literal["per-prompt", "batched"]
MODULES: dict[str, tuple[str, str]] = {
    "per-prompt": ("ops.baselines.per_prompt", "baseline.answer"),
    "batched": ("ops.baselines.batched", "baseline.answer_batch"),
}
QUEUE = "baseline"
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class BaselineCluster:
    """Running baseline workers and a producer for them."""

    kind: str
    redis_url: str
    producer: Celery
    task_name: str
    logdir: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    nodes: dict[str, str] = field(default_factory=dict)
    _logs: list[IO[bytes]] = field(default_factory=list)

    def submit(self, prompts: list[str]) -> list[str]:
        """Send one task message per prompt; returns the task ids in order."""
        ids = []
        for prompt in prompts:
            task_id = uuid.uuid4().hex
            self.producer.send_task(self.task_name, args=[prompt], task_id=task_id, queue=QUEUE)
            ids.append(task_id)
        return ids

    def result_key(self, task_id: str) -> str:
        """The result backend's key of a task (Celery builds it; never formatted here)."""
        key = self.producer.backend.get_key_for_task(task_id)
        return key.decode() if isinstance(key, bytes) else str(key)

    def log(self, name: str) -> str:
        path = self.logdir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        for fh in self._logs:
            fh.close()
        self.producer.close()


def _producer(redis_url: str) -> Celery:
    app = Celery("baseline-producer", set_as_current=False)
    app.conf.update(broker_url=redis_url, result_backend=redis_url, task_serializer="json",
                    accept_content=["json"], result_serializer="json", broker_connection_retry_on_startup=True)
    return app


@contextlib.contextmanager
def run_baseline(kind: BaselineKind, *, redis_url: str, config_path: Path | str, workers: int = 2,
                 concurrency: int = 16, pool: str = "threads", tier: str | None = None,
                 env: Mapping[str, str] | None = None, flush: bool = False,
                 startup_timeout_s: float = 60.0) -> Iterator[BaselineCluster]:
    """Start ``workers`` baseline worker processes and stop them on exit.

    Args:
        kind: ``per-prompt`` or ``batched``.
        redis_url: broker and result backend (a db of the caller's own).
        config_path: the Cohort config whose tiers and grouping limits the baseline reuses.
        workers: worker processes (distinct node names).
        concurrency: pool size of each.
        pool: Celery pool (``threads``, ``prefork``, ``gevent``).
        tier: the tier every prompt goes to (default: the config's first).
        env: extra environment (the tier's key variable, for instance).
        flush: empty the Redis db before the workers start and after they stop (the caller's own db;
            never while workers run, which would delete kombu's bindings).
        startup_timeout_s: how long to wait for every worker to answer a ping.

    Raises:
        RuntimeError: a worker exited or did not answer in time (its log is in the message).
    """
    module, task_name = MODULES[kind]
    process_env = {**os.environ, **(env or {}), "COHORT_CONFIG": str(config_path), REDIS_URL_ENV: redis_url,
                   "PYTHONUNBUFFERED": "1"}
    if tier:
        process_env[TIER_ENV] = tier
    if flush:
        _flushdb(redis_url)
    with tempfile.TemporaryDirectory(prefix=f"baseline-{kind}-") as tmp:
        cluster = BaselineCluster(kind=kind, redis_url=redis_url, producer=_producer(redis_url),
                                  task_name=task_name, logdir=Path(tmp))
        try:
            for index in range(workers):
                name = f"{kind}{index}"
                node = f"{name}-{uuid.uuid4().hex[:6]}@bench"
                log = open(cluster.logdir / f"{name}.log", "ab")  # noqa: SIM115 - closed by stop()
                cluster._logs.append(log)
                cluster.processes[name] = subprocess.Popen(
                    [sys.executable, "-m", "celery", "-A", module, "worker", "-Q", QUEUE, "-P", pool,
                     "-c", str(concurrency), "-n", node, "--without-gossip", "--without-mingle", "-l", "warning"],
                    cwd=REPO_ROOT, env=process_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                cluster.nodes[name] = node
            _wait_ready(cluster, startup_timeout_s)
            yield cluster
        finally:
            cluster.stop()
            if flush:
                _flushdb(redis_url)


def _flushdb(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


def _wait_ready(cluster: BaselineCluster, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    waiting = dict(cluster.nodes)
    while waiting:
        for name in list(waiting):
            process = cluster.processes[name]
            if process.poll() is not None:
                raise RuntimeError(f"baseline worker {name} exited with {process.returncode}:\n{cluster.log(name)}")
        replies = cluster.producer.control.ping(destination=list(waiting.values()), timeout=0.5)
        answered = {node for reply in replies for node in reply}
        waiting = {name: node for name, node in waiting.items() if node not in answered}
        if waiting and time.monotonic() > deadline:
            logs = "\n".join(f"--- {n} ---\n{cluster.log(n)}" for n in waiting)
            raise RuntimeError(f"baseline workers not ready after {timeout_s} s: {sorted(waiting)}\n{logs}")
