"""Benchmark of the OpenAI-compatible endpoint: Cohort's /v1/chat/completions against the same
clients calling the provider simulator directly, in one run, on loopback.

The stack is real processes (``ops.launcher.run_cohort``): the simulator (``--latency-ms`` per
question answered), a grouper, inference worker(s), beat, and the API (``python -m ops.api``).
Both sides get the same prompts, in the same order, from ``--concurrency`` asyncio clients (httpx)
sharing a bounded queue of ``--requests`` requests; a few warm-up requests per side are not counted.
Upstream calls are the simulator's own count for each side. ``--python-side`` adds a third side:
the same prompts through ``CohortClient`` in threads, without HTTP, to separate the API's overhead
from the pipeline's latency.

Usage::

    python -m ops.bench_api [--requests 1000] [--concurrency 50] [--latency-ms 300]
        [--workload banking77] [--db 12] [--inference-workers 1] [--worker-concurrency 16]

Redis: ``COHORT_TEST_REDIS`` (default ``redis://127.0.0.1:6379``), db ``--db``, flushed: it must be
the benchmark's own. Prints a markdown table (requests/s, p50/p99 latency, errors, upstream calls).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from ops.api.settings import hash_key
from ops.launcher import REPO_ROOT, SIM_KEY, Cohort, run_cohort, wait_until
from ops.workloads import stream_of


@dataclass
class SideResult:
    name: str
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    pipeline_s: list[float] = field(default_factory=list)
    """Cohort's own submit-to-result time of each answer (``cohort.timings.end_to_end_s``)."""
    wall_s: float = 0.0
    upstream_calls: int = 0

    @property
    def requests(self) -> int:
        return len(self.latencies) + sum(self.errors.values())

    def row(self) -> str:
        lat = sorted(self.latencies)
        p50 = statistics.median(lat) * 1000 if lat else float("nan")
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000 if lat else float("nan")
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(self.errors.items())) or "0"
        return (f"| {self.name} | {self.requests} | {len(self.latencies)} | {errors} | "
                f"{len(self.latencies) / self.wall_s:.1f} | {p50:.0f} | {p99:.0f} | {self.upstream_calls} |")


async def _drive(name: str, url: str, headers: dict[str, str], model: str, prompts: list[str],
                 concurrency: int, timeout_s: float) -> SideResult:
    result = SideResult(name)
    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout_s) as client:

        async def worker() -> None:
            while True:
                try:
                    prompt = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 128}
                started = time.perf_counter()
                try:
                    response = await client.post(url, json=body)
                except httpx.HTTPError as exc:
                    result.errors[type(exc).__name__] += 1
                    continue
                if response.status_code == 200:
                    result.latencies.append(time.perf_counter() - started)
                    timings = (response.json().get("cohort") or {}).get("timings") or {}
                    if "end_to_end_s" in timings:
                        result.pipeline_s.append(float(timings["end_to_end_s"]))
                else:
                    result.errors[str(response.status_code)] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.wall_s = time.perf_counter() - started
    return result


async def _drive_python_client(cohort: Cohort, prompts: list[str], concurrency: int,
                               timeout_s: float) -> SideResult:
    """The same prompts through ``CohortClient`` (no HTTP): what the pipeline alone takes."""
    result = SideResult("CohortClient (Python, no HTTP)")
    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    client = cohort.client

    def ask(prompt: str) -> None:
        client.submit(prompt, tenant="bench", max_tokens=128).result(timeout=timeout_s)

    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="bench-client")

    async def worker() -> None:
        while True:
            try:
                prompt = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            started = time.perf_counter()
            try:
                await loop.run_in_executor(pool, ask, prompt)
            except Exception as exc:  # noqa: BLE001 - counted by kind
                result.errors[type(exc).__name__] += 1
                continue
            result.latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    result.wall_s = time.perf_counter() - started
    return result


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_api(cohort: Cohort) -> str:
    port = _free_port()
    log = open(cohort.workdir / "api.log", "ab")  # noqa: SIM115 - closed when the process ends
    cohort.processes["api"] = subprocess.Popen(
        [sys.executable, "-m", "ops.api", "--config", str(cohort.config_path), "--port", str(port),
         "--log-level", "warning", "--no-access-log"],
        cwd=REPO_ROOT, env=cohort.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if cohort.processes["api"].poll() is not None:
            raise RuntimeError(f"the API exited:\n{cohort.log('api')}")
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, timeout=30, message="the API's /healthz")
    return url


def run(args: argparse.Namespace) -> dict[str, Any]:
    prompts = [p.text for p in stream_of(args.workload, args.requests + args.warmup)]
    if len(prompts) < args.requests + args.warmup:
        raise SystemExit(f"workload {args.workload!r} has only {len(prompts)} prompts")
    warmup, measured = prompts[:args.warmup], prompts[args.warmup:]
    key = "ck-bench-" + secrets.token_hex(16)
    config = {"api": {"keys": {hash_key(key): "bench"}, "rate_limit_rpm": 0, "chat_timeout_s": 120.0,
                      "min_workers": 1}}
    with run_cohort(db=args.db, config=config, inference_workers=args.inference_workers,
                    concurrency=args.worker_concurrency, sim_options={"latency_ms": args.latency_ms}) as cohort:
        api_url = _start_api(cohort)
        sides = {
            "simulator directly": (f"{cohort.sim.base_url}/chat/completions", {"Authorization": f"Bearer {SIM_KEY}"},
                                   "sim-large"),
            "Cohort /v1/chat/completions": (f"{api_url}/v1/chat/completions", {"Authorization": f"Bearer {key}"},
                                            "cohort"),
        }
        results = []
        for name, (url, headers, model) in sides.items():
            asyncio.run(_drive("warm-up", url, headers, model, warmup, min(args.concurrency, len(warmup) or 1),
                               args.timeout_s))
            cohort.sim.reset()
            result = asyncio.run(_drive(name, url, headers, model, measured, args.concurrency, args.timeout_s))
            result.upstream_calls = int(cohort.sim.stats()["requests"])
            results.append(result)
        if args.python_side:
            cohort.sim.reset()
            # Other prompts than the HTTP side's: the same ones would be answered from earlier answers.
            variant = [f"{p} (second run)" for p in measured]
            result = asyncio.run(_drive_python_client(cohort, variant, args.concurrency, args.timeout_s))
            result.upstream_calls = int(cohort.sim.stats()["requests"])
            results.append(result)
    print(f"\n{args.requests} requests per side, {args.concurrency} concurrent clients, simulator latency "
          f"{args.latency_ms} ms per question, workload {args.workload}, {args.inference_workers} inference "
          f"worker(s) x {args.worker_concurrency} threads\n")
    print("| side | requests | ok | errors | requests/s | p50 ms | p99 ms | upstream calls |")
    print("|---|---|---|---|---|---|---|---|")
    for result in results:
        print(result.row())
    summary = {r.name: {"ok": len(r.latencies), "errors": dict(r.errors), "wall_s": round(r.wall_s, 3),
                        "rps": round(len(r.latencies) / r.wall_s, 2),
                        "p50_ms": round(statistics.median(r.latencies) * 1000, 1) if r.latencies else None,
                        "p99_ms": round(sorted(r.latencies)[int(0.99 * (len(r.latencies) - 1))] * 1000, 1)
                        if r.latencies else None,
                        "upstream_calls": r.upstream_calls} for r in results}
    for result in results:
        if result.pipeline_s:
            pipeline = statistics.median(result.pipeline_s) * 1000
            print(f"\n{result.name}: p50 of Cohort's own submit-to-result time {pipeline:.0f} ms "
                  f"(the rest of the p50 is HTTP, the API and the wait for the result)")
            summary[result.name]["pipeline_p50_ms"] = round(pipeline, 1)
    print("\n" + json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.bench_api", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="measured requests per side (default 1000)")
    parser.add_argument("--concurrency", type=int, default=50, help="concurrent clients (default 50)")
    parser.add_argument("--latency-ms", type=int, default=300, help="simulator latency per question (default 300)")
    parser.add_argument("--workload", default="banking77", help="ops.workloads stream name or file (default banking77)")
    parser.add_argument("--warmup", type=int, default=20, help="uncounted requests per side first (default 20)")
    parser.add_argument("--db", type=int, default=12,
                        help="Redis db of the benchmark's own, flushed (default 12)")
    parser.add_argument("--inference-workers", type=int, default=1)
    parser.add_argument("--worker-concurrency", type=int, default=16, help="threads per inference worker")
    parser.add_argument("--timeout-s", type=float, default=180.0, help="per-request client timeout")
    parser.add_argument("--python-side", action="store_true",
                        help="also run the prompts through CohortClient without HTTP (the API's own overhead)")
    args = parser.parse_args(argv)
    # A SIGTERM (a timeout, Ctrl-C from a supervisor) still stops every process the stack started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
