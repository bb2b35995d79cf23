"""Run the provider simulator (``python -m ops.simulator``) as a subprocess for a test.

Usage::

    with run_simulator(seed=0, latency_ms=5, faults={"sim-small": {"down": True}}) as sim:
        client = openai.OpenAI(base_url=sim.base_url, api_key="test", max_retries=0)
        sim.set_faults("sim-large", error_429_rate=1.0, retry_after_s=0.1)
        sim.stats()["calls"]
        sim.reset()

Keyword options become command-line flags (``latency_ms=5`` -> ``--latency-ms 5``; a dict or list
is sent as JSON; None is left out). The server listens on a free port unless ``port`` is given.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx

__all__ = ["SimulatorHandle", "run_simulator"]

REPO_ROOT = Path(__file__).resolve().parents[2]
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
