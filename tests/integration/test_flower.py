"""Flower against a real Cohort: basic auth from the environment, readable task names, no prompt text.

Flower is started exactly as the README and the demo start it::

    FLOWER_BASIC_AUTH=user:pass celery -A workers.app flower --basic-auth=$FLOWER_BASIC_AUTH --port 5555

and watches a running grouper, inference worker and beat (task events on).
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx

from producers import PromptResult
from tests.support.cluster import REPO_ROOT, Cohort, run_cohort, wait_until

DB = 14


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def flower(cohort: Cohort, auth: str) -> Iterator[str]:
    port = free_port()
    env = {**cohort.env, "FLOWER_BASIC_AUTH": auth}
    log_path = Path(cohort.workdir) / "flower.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.app", "flower", f"--basic-auth={auth}",
             f"--port={port}", "--address=127.0.0.1"],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"flower exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            return httpx.get(url + "/healthcheck", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, timeout=40, interval=0.2, message="flower")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def test_flower_needs_auth_and_shows_cohort_tasks_without_prompt_text() -> None:
    user, password = "ops", "pw-" + uuid.uuid4().hex[:8]
    marker = "zebra-" + uuid.uuid4().hex[:8]  # a word that must never appear in Flower
    with run_cohort(db=DB) as cohort, flower(cohort, f"{user}:{password}") as url:
        assert httpx.get(url + "/api/tasks", timeout=10).status_code == 401
        assert httpx.get(url + "/", timeout=10).status_code == 401
        assert httpx.get(url + "/api/tasks", auth=(user, "wrong"), timeout=10).status_code == 401
        # Flower records only the events it sees: submit once it is up.
        handles = cohort.client.submit_many([f"How do I reset the PIN of card {marker} {i}?" for i in range(5)],
                                            tenant="acme")
        for h in handles:
            assert isinstance(h.result(timeout=60), PromptResult)

        def tasks() -> dict[str, dict[str, object]] | None:
            response = httpx.get(url + "/api/tasks", auth=(user, password), timeout=10)
            assert response.status_code == 200
            data = response.json()
            names = {t.get("name") for t in data.values()}
            return data if {"cohort.group", "cohort.run_batch"} <= names else None

        data = wait_until(tasks, timeout=30, interval=0.5, message="cohort tasks in flower")
        batches = [t for t in data.values() if t.get("name") == "cohort.run_batch"]
        assert batches and all(t.get("state") in ("SUCCESS", "STARTED", "RECEIVED") for t in batches)
        # Arguments carry ids and counts only: no prompt text, no key.
        dump = json.dumps(data)
        assert marker not in dump
        assert "reset the PIN" not in dump
        assert cohort.env["COHORT_SIM_KEY"] not in dump
        assert "items" in str(batches[0].get("kwargs"))
        assert httpx.get(url + "/metrics", timeout=10).status_code == 200  # Flower's own, always open

