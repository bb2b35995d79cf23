"""Horizontal scale: 1, 2 and 4 inference worker processes behind one grouper, on this machine.

One run, one stack (``ops.launcher.run_cohort``: the simulator, one grouper, beat, inference
workers as real Celery processes on Redis db 6), the same prompts in every phase:

1. the Banking77 prompts are embedded once before the phases (the grouper's cache by text hash),
   so that every phase measures the inference workers and not the first sight of new text; the
   cold embedding rate is reported too, since it is the one grouper's ceiling on new text;
2. phase k (k = 1, 2, 4): the whole workload is submitted at once under a tenant of its own (no
   answer is shared across phases) and timed until its last answer; workers are added between
   phases with ``start_inference`` while the grouper, beat and the earlier workers keep running
   (their PIDs are checked unchanged and alive);
3. per node, the ``cohort.run_batch`` tasks each worker ran in the phase (Celery's ``inspect
   stats``) show that the one grouper's batches were spread over every worker.

The simulator answers each call after ``--overhead-ms`` (300 ms per call, whatever the batch
size): the I/O-bound case. Every worker runs ``-P threads`` with the same ``--concurrency``: the
question is how throughput grows with worker *processes* at fixed concurrency per process.

Usage: ``python -m ops.bench_scale [--prompts 6000] [--concurrency 2] [--workers 1,2,4]``.
Prints a markdown table and writes it to ``docs/benchmarks/scale.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from celery import Celery

from ops.baselines.measure import ResultWatcher, RunResult, machine, markdown_table, summarize, write_report
from ops.launcher import Cohort, run_cohort
from ops.workloads import banking77
from producers.settings import read_config
from workers.settings import worker_settings
from workers.tiers.config import parse_routing

DB = 6
FLOOR = 3.0
"""Four workers must answer at least this many times as many prompts per second as one."""


def distinct_prompts(count: int) -> list[str]:
    """The first ``count`` distinct Banking77 prompts, in file order."""
    seen: dict[str, None] = {}
    for prompt in banking77():
        seen.setdefault(prompt.text, None)
        if len(seen) == count:
            break
    if len(seen) < count:
        raise SystemExit(f"Banking77 has only {len(seen)} distinct prompts; ask for fewer")
    return list(seen)


def warm_embeddings(cohort: Cohort, prompts: list[str]) -> float:
    """Embed the prompts into the grouper's cache with the grouper's own encoder; returns prompts/s.

    The cache is the grouper's (``workers.encoder.CachedEncoder``, keyed by text hash), filled by
    the same class the grouper uses, so the grouper finds every vector there.
    """
    from workers.encoder import CachedEncoder, Encoder

    settings = worker_settings(read_config(cohort.config_path, {}), {})
    encoder = CachedEncoder(Encoder.for_grouping(settings.grouping), cohort.redis, cohort.keys)
    encoder.embed(["warm up"])
    started = time.perf_counter()
    for start in range(0, len(prompts), 500):
        encoder.embed(prompts[start:start + 500])
    return len(prompts) / (time.perf_counter() - started)


def _batch_counts(control: Celery, nodes: list[str]) -> dict[str, dict[str, Any]]:
    """``{node: {"pid": pid, "batches": cohort.run_batch tasks run, "ticks": cohort.group tasks run}}``."""
    replies = control.control.inspect(destination=nodes, timeout=3.0).stats() or {}
    missing = set(nodes) - set(replies)
    if missing:
        raise RuntimeError(f"no stats from {sorted(missing)}")
    return {node: {"pid": stats.get("pid"), "batches": stats.get("total", {}).get("cohort.run_batch", 0),
                   "ticks": stats.get("total", {}).get("cohort.group", 0)} for node, stats in replies.items()}


def unanswered(cohort: Cohort, watcher: ResultWatcher) -> list[dict[str, str]]:
    """The Cohort status record of each prompt that has no final result (for the report)."""
    stuck = [item_id for item_id, o in watcher.outcomes.items() if o.seen is None]
    found = []
    for item_id in stuck:
        record = {k.decode(): v.decode() for k, v in cohort.redis.hgetall(cohort.keys.item_status(item_id)).items()}
        found.append({"id": item_id, **record})
    return found


def _queues_of_live_nodes(cohort: Cohort) -> dict[str, str]:
    now = time.time()
    nodes = [n.decode() for n in cohort.redis.zrangebyscore(cohort.keys.heartbeats(), now - 30, "+inf")]
    queues = {}
    for node in nodes:
        raw = cohort.redis.get(cohort.keys.heartbeat(node))
        queues[node] = json.loads(raw)["queues"] if raw else ""
    return queues


def run(args: argparse.Namespace) -> str:
    prompts = distinct_prompts(args.prompts)
    counts = sorted({int(k) for k in args.workers.split(",")})
    rows: list[list[Any]] = []
    results: dict[int, RunResult] = {}
    spread: dict[int, dict[str, int]] = {}
    drains: dict[int, float] = {}
    notes: list[str] = []
    sim_options = {"overhead_ms": args.overhead_ms, "latency_ms": 0, "jitter_ms": args.jitter_ms}
    with run_cohort(db=DB, inference_workers=counts[0], concurrency=args.concurrency, pool="threads",
                    sim_options=sim_options) as cohort:
        tiers = parse_routing(read_config(cohort.config_path, {})).tiers
        control = Celery("bench-scale-control", set_as_current=False)
        control.conf.update(broker_url=_redis_url(cohort), accept_content=["json"])
        embed_rate = warm_embeddings(cohort, prompts)
        print(f"embedding cache warmed: {len(prompts)} prompts at {embed_rate:.0f} prompts/s (cold, in one process)",
              flush=True)
        grouper_node = cohort.nodes["grouper"]
        first_pids = {name: p.pid for name, p in cohort.processes.items()}
        for k in counts:
            for index in range(len([n for n in cohort.processes if n.startswith("inference")]), k):
                before = {name: p.pid for name, p in cohort.processes.items()}
                cohort.start_inference(f"inference{index}", concurrency=args.concurrency, pool="threads")
                for name, pid in before.items():
                    process = cohort.processes[name]
                    if process.pid != pid or process.poll() is not None:
                        raise RuntimeError(f"{name} changed or stopped when inference{index} started")
            inference = [cohort.nodes[n] for n in sorted(cohort.processes) if n.startswith("inference")]
            before_counts = _batch_counts(control, inference + [grouper_node])
            cohort.sim.reset()
            with ResultWatcher(cohort.redis, cohort.keys.result) as watcher:
                first = time.monotonic()
                handles = cohort.client.submit_many(prompts, tenant=f"scale-{k}")
                watcher.add([h.id for h in handles], first)
                if not watcher.wait(args.timeout_s):
                    stuck = unanswered(cohort, watcher)
                    notes.append(f"{k} worker(s): {len(stuck)} prompt(s) still unanswered {args.timeout_s:g} s after "
                                 f"submission; their status: {stuck[:5]}")
                    print(notes[-1], flush=True)
            result = summarize(f"{k} worker(s)", "banking77", watcher, cohort.sim.stats(), tiers, first_submit=first)
            after_counts = _batch_counts(control, inference + [grouper_node])
            spread[k] = {node: after_counts[node]["batches"] - before_counts[node]["batches"] for node in inference}
            results[k] = result
            batch_ids = {(o.result or {}).get("batch_id") for o in watcher.outcomes.values()}
            batch_ids.discard(None)
            ticks = after_counts[grouper_node]["ticks"] - before_counts[grouper_node]["ticks"]
            print(f"{k} worker(s): {result.answered}/{result.prompts} in {result.wall_s:.1f} s "
                  f"= {result.throughput:.1f} prompts/s; batches per node {list(spread[k].values())}; "
                  f"{len(batch_ids)} batches from {ticks} grouper ticks", flush=True)
            seen = sorted(o.seen - first for o in watcher.outcomes.values() if o.seen is not None)
            drain = (len(seen) - 1) / (seen[-1] - seen[0]) if len(seen) > 1 and seen[-1] > seen[0] else 0.0
            drains[k] = drain
            rows.append([k, args.concurrency, result.answered, f"{result.wall_s:.1f}", f"{result.throughput:.1f}",
                         f"{result.throughput / results[counts[0]].throughput:.2f}x",
                         f"{seen[0] if seen else 0:.1f}", f"{drain:.1f}", f"{drain / drains[counts[0]]:.2f}x",
                         result.calls,
                         " / ".join(str(v) for v in spread[k].values()), len(batch_ids), ticks,
                         f"{result.latency(0.5):.2f}", f"{result.latency(0.99):.2f}"])
            if result.failed:
                notes.append(f"{k} worker(s): {result.failed} prompts failed")
        for name, pid in first_pids.items():
            process = cohort.processes[name]
            if process.pid != pid or process.poll() is not None:
                raise RuntimeError(f"{name} was restarted or stopped during the run")
        live = _queues_of_live_nodes(cohort)
        groupers = [n for n, q in live.items() if "grouper" in q.split(",")]
        grouper_processes = [n for n in cohort.processes if n.startswith("grouper")]
        pids = {name: p.pid for name, p in cohort.processes.items()}

    ratio = results[counts[-1]].throughput / results[counts[0]].throughput
    headers = ["inference workers", "threads each", "answered", "wall s", "prompts/s", "vs 1 worker",
               "first answer s", "drain prompts/s", "drain vs 1", "upstream calls", "batches per worker node",
               "batches", "grouper ticks", "p50 s", "p99 s"]
    verdict = "met" if ratio >= FLOOR else "MISSED"
    lines = [
        "# Horizontal scale: inference worker processes behind one grouper",
        "",
        f"`python -m ops.bench_scale --prompts {args.prompts} --concurrency {args.concurrency} "
        f"--workers {args.workers} --overhead-ms {args.overhead_ms:g}`; {machine()}.",
        "",
        f"Simulator: {args.overhead_ms:g} ms per call (+/- {args.jitter_ms:g} ms), whatever the batch size. "
        f"Each phase submits the same {len(prompts)} distinct Banking77 prompts at once (a tenant per phase, so "
        "nothing is shared between phases) and is timed from the first submit to the last answer; `first answer` "
        "is when the first result appeared (the grouper's time to admit the burst and dispatch the first batches), "
        "`drain` the rate between the first and the last answer. "
        f"Workers: `-P threads -c {args.concurrency}`, each a process with its own node name. Concurrency per "
        "process is fixed and small on purpose: the floor is about adding processes, and on this 2-core machine "
        "(shared with the grouper, beat, Redis, the simulator and this script) four processes at "
        f"`-c {args.concurrency}` hold {4 * args.concurrency} batches of up to 16 prompts in flight (each one packed "
        "call, or up to 8 concurrent calls of unrelated questions); at the production default (`-c 16`) a single "
        "process would saturate the cores and the test would measure the CPU instead.",
        "",
        markdown_table(headers, rows),
        "",
        f"- Floor: {counts[-1]} workers at least {FLOOR:g}x one worker (prompts/s, first submit to last answer): "
        f"**{verdict}** ({ratio:.2f}x). Between the first and the last answer (the workers draining the queue, "
        f"after the grouper has admitted the burst): {drains[counts[-1]] / drains[counts[0]]:.2f}x.",
        f"- One grouper served every phase: {len(grouper_processes)} grouper process, {len(groupers)} live node "
        f"consuming the `grouper` queue ({', '.join(groupers)}); every batch above was formed by it and consumed "
        "by the inference node named in its column.",
        f"- No restart: workers were added between phases while the grouper, beat and earlier workers kept "
        f"running; their PIDs at the end equal those at the start ({', '.join(f'{n}={p}' for n, p in pids.items())}).",
        f"- The grouper embedded new text at {embed_rate:.0f} prompts/s on this machine (cold cache, one process): "
        "that, not the inference workers, bounds throughput on prompts never seen before.",
    ]
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines)


def _redis_url(cohort: Cohort) -> str:
    return worker_settings(read_config(cohort.config_path, {}), {}).producer.redis.url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.bench_scale", description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=6000, help="distinct Banking77 prompts per phase (default 6000)")
    parser.add_argument("--concurrency", type=int, default=2, help="threads per inference worker (default 2)")
    parser.add_argument("--workers", default="1,2,4", help="worker counts, one phase each (default 1,2,4)")
    parser.add_argument("--overhead-ms", type=float, default=300.0, help="simulated latency per call (default 300)")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="uniform +/- noise per call (default 0)")
    parser.add_argument("--timeout-s", type=float, default=200.0, help="longest wait for one phase (default 200)")
    args = parser.parse_args(argv)
    if not 1 <= args.prompts <= 10_000:
        parser.error("--prompts must be between 1 and 10000")
    report = run(args)
    print(report)
    print(f"\nwritten to {write_report('scale', report)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
