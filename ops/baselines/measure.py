"""The harness every benchmark shares: submit a workload, time each answer, total calls and cost.

Every system is measured the same way, from outside:

- latency of a prompt = the moment its final result is first seen in Redis (polled every 10 ms,
  one ``MGET`` for all pending keys) minus the moment it was submitted, on one monotonic clock;
- throughput = prompts / (last answer seen - first prompt submitted);
- upstream calls, input and output tokens = the provider simulator's own counters (reset before
  each run), and cost = those tokens at the prices of the tier that owns each simulated model.
  The cost each system reports in its results is kept alongside as a cross-check.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import redis

from workers.tiers.config import TierConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = REPO_ROOT / "docs" / "benchmarks"
FINAL = ("SUCCESS", "FAILURE")


@dataclass
class Outcome:
    """One prompt's timeline and final result."""

    submitted: float
    seen: float | None = None
    result: dict[str, Any] | None = None
    failed: bool = False


class Poller:
    """A daemon thread that calls ``poll()`` every ``period_s`` while the ``with`` block runs."""

    def __init__(self, period_s: float, *, name: str) -> None:
        self._period = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self._period)

    def poll(self) -> None:
        """One look (in the poller's thread)."""
        raise NotImplementedError


class ResultWatcher(Poller):
    """Polls the result keys of submitted prompts in a thread and records when each first appears."""

    def __init__(self, client: redis.Redis, key_for: Callable[[str], str], *, interval_s: float = 0.01) -> None:
        super().__init__(interval_s, name="result-watcher")
        self._redis = client
        self._key_for = key_for
        self._lock = threading.Lock()
        self._pending: dict[str, str] = {}
        self.outcomes: dict[str, Outcome] = {}

    def add(self, ids: Iterable[str], submitted: float) -> None:
        with self._lock:
            for item_id in ids:
                self.outcomes[item_id] = Outcome(submitted)
                self._pending[item_id] = self._key_for(item_id)

    def remaining(self) -> int:
        with self._lock:
            return len(self._pending)

    def wait(self, timeout_s: float) -> bool:
        """True once every added prompt has a final result; False when ``timeout_s`` passed first."""
        deadline = time.monotonic() + timeout_s
        while self.remaining():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def poll(self) -> None:
        with self._lock:
            pending = list(self._pending.items())
        for start in range(0, len(pending), 2000):
            chunk = pending[start:start + 2000]
            try:
                raws = self._redis.mget([key for _, key in chunk])
            except redis.RedisError:
                continue
            now = time.monotonic()
            for (item_id, _), raw in zip(chunk, raws, strict=True):
                if raw is None:
                    continue
                meta = json.loads(raw)
                if meta.get("status") not in FINAL:
                    continue
                with self._lock:
                    outcome = self.outcomes[item_id]
                    outcome.seen = now
                    outcome.failed = meta["status"] != "SUCCESS"
                    outcome.result = meta.get("result") if not outcome.failed else None
                    self._pending.pop(item_id, None)


@dataclass
class RunResult:
    """One system on one workload."""

    system: str
    workload: str
    prompts: int
    answered: int
    failed: int
    wall_s: float
    calls: int
    tokens_in: int
    tokens_out: int
    cost: float
    reported_cost: float
    latencies: list[float] = field(default_factory=list)
    calls_by_model: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.answered / self.wall_s if self.wall_s > 0 else 0.0

    def latency(self, q: float) -> float:
        return percentile(self.latencies, q)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def cost_of(stats: Mapping[str, Any], tiers: Sequence[TierConfig]) -> float:
    """Cost of the simulator's token counters at the prices of the tier owning each model."""
    prices = {t.model: (t.price_in_per_1k, t.price_out_per_1k) for t in tiers}
    total = 0.0
    for model, tokens in stats.get("tokens_in", {}).items():
        total += tokens * prices.get(model, (0.0, 0.0))[0] / 1000
    for model, tokens in stats.get("tokens_out", {}).items():
        total += tokens * prices.get(model, (0.0, 0.0))[1] / 1000
    return total


def summarize(system: str, workload: str, watcher: ResultWatcher, stats: Mapping[str, Any],
              tiers: Sequence[TierConfig], *, first_submit: float) -> RunResult:
    """Totals of one run from the watcher's outcomes and the simulator's counters."""
    outcomes = list(watcher.outcomes.values())
    done = [o for o in outcomes if o.seen is not None]
    answered = [o for o in done if not o.failed]
    last = max((o.seen for o in done if o.seen is not None), default=first_submit)
    calls_by_model = {m: sum(c.values()) for m, c in stats.get("calls", {}).items()}
    return RunResult(
        system=system, workload=workload, prompts=len(outcomes), answered=len(answered),
        failed=len(done) - len(answered), wall_s=last - first_submit, calls=int(stats.get("requests", 0)),
        tokens_in=int(sum(stats.get("tokens_in", {}).values())),
        tokens_out=int(sum(stats.get("tokens_out", {}).values())),
        cost=cost_of(stats, tiers),
        reported_cost=sum(float((o.result or {}).get("cost", 0.0)) for o in answered),
        latencies=[o.seen - o.submitted for o in answered if o.seen is not None],
        calls_by_model=calls_by_model,
    )


def submit_paced(submit_one: Callable[[str], str], watcher: ResultWatcher, prompts: Sequence[str], *,
                 rate_per_s: float) -> float:
    """Submit one prompt every ``1 / rate_per_s`` seconds (a fixed arrival rate); returns the first submit time."""
    first = time.monotonic()
    for index, prompt in enumerate(prompts):
        due = first + index / rate_per_s
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        submitted = time.monotonic()
        watcher.add([submit_one(prompt)], submitted)
    return first


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)


def machine() -> str:
    """One line about where and on what code the figures were measured."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{os.cpu_count()} CPU cores, Python {platform.python_version()}, {platform.system()}; "
            f"load average {load:.2f} at the end of the run; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; "
            f"code {code_version()}")


def code_version() -> str:
    """The commit the measured code came from, noting uncommitted changes to it."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "producers", "workers", "compression_jobs")
    suffix = " (+ uncommitted changes to Cohort's packages)" if dirty else ""
    return commit + suffix


def write_report(name: str, text: str) -> Path:
    """Write ``docs/benchmarks/<name>.md`` and return its path."""
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    path = BENCH_DIR / f"{name}.md"
    path.write_text(text.rstrip() + "\n", encoding="utf-8")
    return path


def replace_section(path: Path, name: str, text: str) -> None:
    """Replace what lies between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in a markdown file.

    Raises:
        ValueError: the file lacks the markers.
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    content = path.read_text(encoding="utf-8")
    if begin not in content or end not in content:
        raise ValueError(f"{path} has no {begin} ... {end} section")
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{text.strip()}\n{end}{tail}", encoding="utf-8")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants (a prefork pool's children)."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        proc = int(entry)
        children.setdefault(int(fields[1]), []).append(proc)
        times[proc] = (int(fields[11]) + int(fields[12])) / tick
    total, stack = 0.0, [pid]
    while stack:
        proc = stack.pop()
        total += times.get(proc, 0.0)
        stack.extend(children.get(proc, []))
    return total


def rss_mib(pid: int) -> float:
    """Resident memory (MiB) of a process and its live descendants."""
    total, stack = 0.0, [pid]
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii") as fh:
                    parents.setdefault(int(fh.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except (OSError, IndexError):
                continue
    while stack:
        proc = stack.pop()
        try:
            with open(f"/proc/{proc}/statm", encoding="ascii") as fh:
                total += int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:
            pass
        stack.extend(parents.get(proc, []))
    return total
