"""Which Celery pool for the I/O-bound inference worker: prefork, threads or gevent, in one run.

One stack (``ops.launcher.run_cohort`` on Redis db 6: the simulator, one grouper, beat), then one
inference worker process at a time, each pool at each ``--concurrency`` level, the same load:
``--prompts`` distinct Banking77 prompts submitted at once under a tenant of their own and timed
to the last answer. The simulator answers each call after ``--overhead-ms`` (300 ms), so a
worker's throughput is set by how many calls it keeps in flight and by the CPU it spends per
batch around them. The prompts are embedded into the grouper's cache first (as in
``ops.bench_scale``), so that the pool, not the grouper, is what differs. ``--rounds`` repeats
the whole sequence, pools interleaved, and the table gives medians (the cores are shared).

Reported per pool: prompts per second, p50/p99 end-to-end latency, the worker's CPU seconds per
1,000 prompts (its process and, for prefork, its children), and its resident memory.

Usage: ``python -m ops.bench_pools [--prompts 2000] [--concurrency 4,16] [--rounds 2]``.
Prints a markdown table and writes it to ``docs/benchmarks/pools.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import signal
import statistics
import sys
import time
from typing import Any

from ops.baselines.measure import (
    ResultWatcher,
    cpu_seconds,
    machine,
    markdown_table,
    rss_mib,
    summarize,
    write_report,
)
from ops.bench_scale import distinct_prompts, warm_embeddings
from ops.launcher import run_cohort
from producers.settings import read_config
from workers.tiers.config import parse_routing

DB = 6
POOLS = ("prefork", "threads", "gevent")


def run(args: argparse.Namespace) -> str:
    prompts = distinct_prompts(args.prompts)
    levels = [int(c) for c in args.concurrency.split(",")]
    pools = [p for p in POOLS if p != "gevent" or importlib.util.find_spec("gevent") is not None]
    samples: dict[tuple[str, int], list[dict[str, Any]]] = {(p, c): [] for p in pools for c in levels}
    sim_options = {"overhead_ms": args.overhead_ms, "latency_ms": 0, "jitter_ms": 0}
    with run_cohort(db=DB, inference_workers=0, sim_options=sim_options) as cohort:
        tiers = parse_routing(read_config(cohort.config_path, {})).tiers
        rate = warm_embeddings(cohort, prompts)
        print(f"embedding cache warmed ({rate:.0f} prompts/s)", flush=True)
        run_index = 0
        for round_index in range(args.rounds):
            for c in levels:
                order = pools if round_index % 2 == 0 else list(reversed(pools))
                for pool in order:
                    run_index += 1
                    name = f"{pool}-{c}-r{round_index}"
                    cohort.start_inference(name, concurrency=c, pool=pool)
                    pid = cohort.processes[name].pid
                    time.sleep(1.0)  # let a prefork pool finish forking before CPU is counted
                    cpu_before = cpu_seconds(pid)
                    cohort.sim.reset()
                    with ResultWatcher(cohort.redis, cohort.keys.result) as watcher:
                        first = time.monotonic()
                        handles = cohort.client.submit_many(prompts, tenant=f"pool-{run_index}")
                        watcher.add([h.id for h in handles], first)
                        watcher.wait(args.timeout_s)
                    cpu = cpu_seconds(pid) - cpu_before
                    memory = rss_mib(pid)
                    result = summarize(name, "banking77", watcher, cohort.sim.stats(), tiers, first_submit=first)
                    cohort.kill(name, signal.SIGTERM)
                    sample = {"throughput": result.throughput, "p50": result.latency(0.5),
                              "p99": result.latency(0.99), "cpu_per_1k": 1000 * cpu / max(1, result.answered),
                              "rss": memory, "failed": result.prompts - result.answered, "calls": result.calls}
                    samples[(pool, c)].append(sample)
                    print(f"{name:18} {result.answered}/{result.prompts} {result.throughput:7.1f}/s "
                          f"p50 {sample['p50']:.2f} p99 {sample['p99']:.2f} cpu/1k {sample['cpu_per_1k']:.2f} s "
                          f"rss {memory:.0f} MiB calls {result.calls}", flush=True)
    rows = []
    best: dict[int, tuple[str, float]] = {}
    for c in levels:
        for pool in pools:
            runs = samples[(pool, c)]

            def med(key: str, runs: list[dict[str, Any]] = runs) -> float:
                return statistics.median(r[key] for r in runs)

            throughput = med("throughput")
            if c not in best or throughput > best[c][1]:
                best[c] = (pool, throughput)
            rows.append([pool, c, f"{throughput:.1f}", " / ".join(f"{r['throughput']:.0f}" for r in runs),
                         f"{med('p50'):.2f}", f"{med('p99'):.2f}", f"{med('cpu_per_1k'):.2f}", f"{med('rss'):.0f}",
                         sum(r["failed"] for r in runs)])
    for c in levels:
        for row in rows:
            if row[1] == c:
                row.insert(3, f"{float(row[2]) / best[c][1]:.2f}")
    lines = [
        "# Celery pool of the inference worker: prefork, threads, gevent",
        "",
        f"`python -m ops.bench_pools --prompts {args.prompts} --concurrency {args.concurrency} "
        f"--rounds {args.rounds} --overhead-ms {args.overhead_ms:g}`; {machine()}.",
        "",
        f"One inference worker process at a time behind one grouper; {len(prompts)} distinct Banking77 prompts "
        f"submitted at once per run; the simulator answers each call after {args.overhead_ms:g} ms. "
        f"Medians of {args.rounds} rounds (pools interleaved); per-round throughputs in their own column. "
        "CPU: the worker process and its children, per 1,000 prompts answered. Memory: resident, after the run.",
        "",
        markdown_table(["pool", "concurrency", "prompts/s", "vs best", "per round", "p50 s", "p99 s",
                        "CPU s / 1k prompts", "RSS MiB", "failed"], rows),
        "",
    ]
    lines += [f"- Fastest at concurrency {c}: **{best[c][0]}** ({best[c][1]:.1f} prompts/s)." for c in levels]
    if "gevent" not in pools:
        lines.append("- gevent is not installed here: `pip install gevent` to include it.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.bench_pools", description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=2000, help="distinct Banking77 prompts per run (default 2000)")
    parser.add_argument("--concurrency", default="4,16", help="pool sizes to compare (default 4,16)")
    parser.add_argument("--rounds", type=int, default=2, help="repetitions, pools interleaved (default 2)")
    parser.add_argument("--overhead-ms", type=float, default=300.0, help="simulated latency per call (default 300)")
    parser.add_argument("--timeout-s", type=float, default=180.0, help="longest wait for one run (default 180)")
    args = parser.parse_args(argv)
    if not 16 <= args.prompts <= 10_000 or not 1 <= args.rounds <= 5:
        parser.error("--prompts must be 16..10000 and --rounds 1..5")
    if any(not 1 <= int(c) <= 128 for c in args.concurrency.split(",")):
        parser.error("each --concurrency must be 1..128")
    text = run(args)
    print(text)
    print(f"\nwritten to {write_report('pools', text)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
