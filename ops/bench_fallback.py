"""Fallback benchmark: Cohort's tier router against a naive retry client, on a failing primary.

One run, same prompts, same concurrency, same simulator (a subprocess on loopback):

- ``no failures``: Cohort's router with healthy tiers (the cost and latency reference);
- ``Cohort``: the router with the primary failing 20% of calls (5xx) and timing out 5%;
  every item starts at the primary (``complexity="complex"``) so that the comparison is about
  fallback, not routing;
- ``naive``: the same faults, a client that tries the primary up to 3 times and gives up;
- ``Cohort, estimated complexity``: the same faults, the complexity estimated per prompt
  (banking questions are ``simple`` and start at the cheap secondary): routing's own saving.

Prompts are Banking77 questions from the shared data (``COHORT_DATA_DIR`` or ``../shared/data``).
Redis: ``COHORT_BENCH_REDIS_URL`` (default db 13), under a fresh key prefix removed afterwards.

Usage: ``python -m ops.bench_fallback [--prompts 2000] [--concurrency 32] [--timeout-s 0.5]``.
Prints a markdown table: success rate, extra calls, cost against the no-failure run, p50/p99 latency.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis

from producers.errors import CohortError
from producers.keys import Keys
from producers.settings import read_config
from workers.telemetry import Telemetry
from workers.tiers import CallRequest, TierRouter, parse_budgets, parse_routing

REPO = Path(__file__).resolve().parent.parent
KEY_VAR = "COHORT_BENCH_KEY"
PRIMARY_FAULTS = {"error_5xx_rate": 0.20, "timeout_rate": 0.05, "hang_s": 3.0}


@dataclass
class RunResult:
    name: str
    items: int
    answered: int
    calls: int
    cost: float
    latencies: list[float]
    wall_s: float
    by_tier: dict[str, int]

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


class Simulator:
    """``python -m ops.simulator`` on a free loopback port."""

    def __init__(self, latency_ms: float, jitter_ms: float) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ops.simulator", "--port", "0", "--seed", "7", "--latency-ms", str(latency_ms),
             "--jitter-ms", str(jitter_ms)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if "listening on" not in line:
            self.process.kill()
            raise RuntimeError(f"simulator did not start: {line!r}")
        self.root = line.strip().rsplit(" ", 1)[-1]
        self.base_url = f"{self.root}/v1"

    def faults(self, model: str, **knobs: Any) -> None:
        httpx.post(f"{self.root}/admin/faults", json={"model": model, **knobs}, timeout=10).raise_for_status()

    def reset(self) -> None:
        httpx.post(f"{self.root}/admin/reset", timeout=10).raise_for_status()

    def requests(self) -> int:
        return int(httpx.get(f"{self.root}/admin/stats", timeout=10).json()["requests"])

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def load_prompts(n: int) -> list[str]:
    root = Path(os.environ.get("COHORT_DATA_DIR") or REPO.parent / "shared" / "data")
    with (root / "banking77" / "train.csv").open(newline="", encoding="utf-8") as fh:
        texts = [row["text"] for row in csv.DictReader(fh)]
    step = max(1, len(texts) // n)
    return (texts[::step] * 2)[:n]


def bench_config(base_url: str, timeout_s: float) -> dict[str, Any]:
    """The packaged config with every tier on the simulator and a short primary timeout."""
    config = read_config(REPO / "ops" / "cohort.toml", {})
    tiers = []
    for tier in config["tiers"]:
        tier = {**tier, "base_url": base_url, "api_key_env": KEY_VAR}
        if tier["name"] == "primary":
            tier["timeout_s"] = timeout_s
        tiers.append(tier)
    return {"tiers": tiers, "routing": config.get("routing", {}), "budgets": {}}


def run_pool(name: str, prompts: list[str], concurrency: int, sim: Simulator,
             one: Callable[[str], tuple[bool, float, str | None]], *, faulty: bool) -> RunResult:
    sim.reset()
    if faulty:
        sim.faults("sim-large", **PRIMARY_FAULTS)
    latencies: list[float] = []
    by_tier: dict[str, int] = {}
    lock = threading.Lock()
    answered = 0
    cost = 0.0

    def task(prompt: str) -> None:
        nonlocal answered, cost
        started = time.perf_counter()
        ok, item_cost, tier = one(prompt)
        elapsed = time.perf_counter() - started
        with lock:
            latencies.append(elapsed)
            if ok:
                answered += 1
                cost += item_cost
                by_tier[tier or "?"] = by_tier.get(tier or "?", 0) + 1

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(task, prompts))
    wall = time.perf_counter() - started
    return RunResult(name, len(prompts), answered, sim.requests(), cost, latencies, wall, by_tier)


def cohort_call(router: TierRouter, complexity: str | None) -> Callable[[str], tuple[bool, float, str | None]]:
    def one(prompt: str) -> tuple[bool, float, str | None]:
        try:
            done = router.complete(CallRequest(messages=[{"role": "user", "content": prompt}], max_tokens=128,
                                               complexity=complexity, tenant="bench"))
        except CohortError:
            return False, 0.0, None
        return True, done.cost, done.tier
    return one


def naive_call(client: httpx.Client, base_url: str, primary: dict[str, Any], timeout_s: float
               ) -> Callable[[str], tuple[bool, float, str | None]]:
    """Up to 3 tries on the primary, no backoff, no fallback: what many clients do."""
    def one(prompt: str) -> tuple[bool, float, str | None]:
        body = {"model": primary["model"], "messages": [{"role": "user", "content": prompt}], "max_tokens": 128}
        for _ in range(3):
            try:
                response = client.post(f"{base_url}/chat/completions", json=body, timeout=timeout_s,
                                       headers={"Authorization": "Bearer bench"})
                if response.status_code == 200:
                    usage = json.loads(response.content)["usage"]
                    cost = (usage["prompt_tokens"] * primary["price_in_per_1k"]
                            + usage["completion_tokens"] * primary["price_out_per_1k"]) / 1000
                    return True, cost, "primary"
            except (httpx.HTTPError, ValueError, KeyError):
                pass
        return False, 0.0, None
    return one


def table(results: list[RunResult], reference: RunResult) -> str:
    lines = ["| run | success | extra calls (per item) | cost | cost vs no failures | p50 latency | p99 latency |"
             " answered by |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        extra = r.calls - r.items
        tiers = ", ".join(f"{t} {n}" for t, n in sorted(r.by_tier.items(), key=lambda kv: -kv[1]))
        lines.append(
            f"| {r.name} | {r.answered / r.items:.2%} ({r.answered}/{r.items}) | {extra} ({extra / r.items:.2f}) "
            f"| {r.cost:.4f} | {r.cost / reference.cost:.3f}x | {r.pct(0.50) * 1000:.0f} ms "
            f"| {r.pct(0.99) * 1000:.0f} ms | {tiers} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--timeout-s", type=float, default=0.5, help="primary tier timeout")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="simulated model latency per call")
    parser.add_argument("--jitter-ms", type=float, default=10.0)
    args = parser.parse_args(argv)

    prompts = load_prompts(args.prompts)
    url = os.environ.get("COHORT_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
    client = redis.Redis.from_url(url)
    sim = Simulator(args.latency_ms, args.jitter_ms)
    config = bench_config(sim.base_url, args.timeout_s)
    routing, budgets = parse_routing(config, {}), parse_budgets(config)
    env = {KEY_VAR: "bench"}
    prefixes: list[str] = []

    def router() -> TierRouter:
        keys = Keys(f"bench-{uuid.uuid4().hex[:8]}")
        prefixes.append(keys.prefix)
        return TierRouter(routing, budgets, client, keys, telemetry=Telemetry(client, keys), env=env)

    results: list[RunResult] = []
    http = httpx.Client(transport=httpx.HTTPTransport(retries=0),
                        limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
    try:
        r = router()
        # Warm-up (connections, Lua scripts, imports): not measured.
        run_pool("warm-up", prompts[:64], args.concurrency, sim, cohort_call(r, "complex"), faulty=False)
        naive_call(http, sim.base_url, config["tiers"][0], args.timeout_s)(prompts[0])
        reference = run_pool("no failures (Cohort)", prompts, args.concurrency, sim, cohort_call(r, "complex"),
                             faulty=False)
        r.close()
        results.append(reference)
        primary = next(t for t in config["tiers"] if t["name"] == "primary")
        for name, make in (
            ("Cohort, primary 20% 5xx + 5% timeouts", lambda: cohort_call(router(), "complex")),
            ("naive 3 tries on primary, same faults", lambda: naive_call(http, sim.base_url, primary, args.timeout_s)),
            ("Cohort, same faults, estimated complexity", lambda: cohort_call(router(), None)),
        ):
            results.append(run_pool(name, prompts, args.concurrency, sim, make(), faulty=True))
    finally:
        http.close()
        sim.close()
        for prefix in prefixes:
            for key in client.scan_iter(f"{prefix}:*", count=1000):
                client.delete(key)
        client.close()

    print(f"{args.prompts} Banking77 prompts, concurrency {args.concurrency}, simulated latency "
          f"{args.latency_ms:.0f}±{args.jitter_ms:.0f} ms; primary timeout {args.timeout_s}s "
          f"(hang {PRIMARY_FAULTS['hang_s']}s); cap {routing.max_attempts_per_item} attempts per item\n")
    print(table(results, reference))
    print("\nextra calls: upstream calls beyond one per prompt (retries and fallbacks, failed or not)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
