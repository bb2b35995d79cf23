"""Cohort side by side with the two systems a team would otherwise build, in one run.

Systems (real Celery workers, the same number of worker processes and threads each, the same
simulator with the same prices and latency, Redis dbs 6, 7 and 8):

1. ``one task per prompt`` (``ops.baselines.per_prompt``): each prompt one Celery task, one call;
2. ``celery-batches`` (``ops.baselines.batched``): fixed batches of Cohort's ``max_batch_size``
   flushed after at most Cohort's ``max_wait_s``, each packed into one call in Cohort's format;
3. ``Cohort`` with its defaults: one grouper, beat, the inference workers (tiers chosen by
   Cohort's router);
3b. ``Cohort, one tier``: the same stack with every item pinned to the tier the baselines call,
   to separate what grouping, coalescing and packing save from what tier routing saves.

Both baselines call the config's first tier (``primary``): one model, as a first version does.

A fifth row, ``Cohort, warm embeddings``, is a diagnostic, not a system: Cohort with its defaults
after the workload's texts were put in the grouper's embedding cache (outside the timed run). The
difference between it and ``Cohort`` is what embedding new text costs the one grouper on this
machine; the floors are not applied to it.

Workloads: the Banking77 stream (file order), the same with realistic repeats
(``ops.workloads.repeated_stream``: Zipf counts, repeats close together) and many questions
about a few documents (``ops.workloads.documents_workload``). Each workload is submitted whole
(burst) and timed until its last answer; the systems run one after the other for each workload.
A second table submits Banking77 prompts at a fixed arrival rate that every system keeps up with,
to compare latency without queueing.

Cohort's embedding cache is emptied before each Cohort run (new traffic pays its embeddings), and
each run uses a tenant of its own (no answer is shared between runs).

Usage: ``python -m ops.bench_compare [--prompts 600] [--doc-questions 24] [--workers 2] [--concurrency 16]``.
Prints markdown tables and writes them to ``docs/benchmarks/compare.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from ops.baselines import run_baseline
from ops.baselines.launch import BaselineCluster
from ops.baselines.measure import (
    ResultWatcher,
    RunResult,
    machine,
    markdown_table,
    replace_section,
    submit_paced,
    summarize,
    write_report,
)
from ops.bench_scale import warm_embeddings
from ops.launcher import REDIS_HOST, SIM_KEY, Cohort, run_cohort
from ops.workloads import Prompt, banking77, documents_workload, repeated_stream
from producers.settings import read_config
from workers.encoder import Encoder
from workers.settings import worker_settings
from workers.tiers.config import TierConfig, parse_routing

COHORT_DB, PER_PROMPT_DB, BATCHED_DB = 6, 7, 8
README = Path(__file__).resolve().parent.parent / "README.md"
LATENCY_MARGIN_S = 0.25
"""Cohort's p99 may exceed the per-prompt system's by at most max_wait_s plus this."""
SYSTEMS = ("one task per prompt", "celery-batches", "Cohort", "Cohort, one tier", "Cohort, warm embeddings")
"""The floors apply to the two Cohort rows; the last row is a diagnostic (see the module docstring)."""
FLOORED = SYSTEMS[2:4]


@dataclass
class System:
    name: str
    client: redis.Redis
    key_for: Callable[[str], str]
    submit_many: Callable[[list[str], str], list[tuple[str, float]]]
    """Submit a burst; returns (id, submit time) per prompt."""
    submit_one: Callable[[str, str], str]
    before_run: Callable[[list[str]], None]


def workloads(args: argparse.Namespace) -> dict[str, list[str]]:
    rows = [p.text for p in banking77()]
    plain = rows[:args.prompts]
    # A slice of its own: the repeated stream shares no text with the plain one.
    distinct = rows[args.prompts:args.prompts + max(1, args.prompts // 3)]
    repeated = [p.text for p in repeated_stream([Prompt(t) for t in distinct])][:args.prompts]
    documents = [p.text for p in documents_workload(questions_per_document=args.doc_questions)]
    return {"Banking77": plain, "Banking77 with repeats": repeated, "documents": documents}


def _baseline_system(name: str, base: BaselineCluster) -> System:
    client = redis.Redis.from_url(base.redis_url)

    def submit_many(prompts: list[str], _tenant: str) -> list[tuple[str, float]]:
        return [(base.submit([p])[0], time.monotonic()) for p in prompts]

    return System(name, client, base.result_key, submit_many, lambda p, _t: base.submit([p])[0], lambda _p: None)


def _cohort_system(name: str, cohort: Cohort, params: dict[str, Any] | None,
                   before_run: Callable[[list[str]], None]) -> System:
    def submit_many(prompts: list[str], tenant: str) -> list[tuple[str, float]]:
        submitted = time.monotonic()
        extra: dict[str, Any] = {"params": params} if params else {}
        return [(h.id, submitted) for h in cohort.client.submit_many(prompts, tenant=tenant, **extra)]

    def submit_one(prompt: str, tenant: str) -> str:
        return cohort.client.submit(prompt, tenant=tenant, params=params).id

    return System(name, cohort.redis, cohort.keys.result, submit_many, submit_one, before_run)


def run_burst(system: System, workload: str, prompts: list[str], tenant: str, cohort: Cohort,
              tiers: tuple[TierConfig, ...], timeout_s: float) -> RunResult:
    system.before_run(prompts)
    cohort.sim.reset()
    with ResultWatcher(system.client, system.key_for) as watcher:
        first = time.monotonic()
        for item_id, submitted in system.submit_many(prompts, tenant):
            watcher.add([item_id], submitted)
        if not watcher.wait(timeout_s):
            print(f"  {system.name}: {watcher.remaining()} prompts unanswered after {timeout_s} s", flush=True)
    result = summarize(system.name, workload, watcher, cohort.sim.stats(), tiers, first_submit=first)
    print(f"  {system.name:22} {result.answered}/{result.prompts} in {result.wall_s:6.1f} s "
          f"{result.throughput:7.1f}/s calls {result.calls:5} cost {result.cost:.4f} "
          f"p50 {result.latency(0.5):.2f} p99 {result.latency(0.99):.2f} {result.calls_by_model}", flush=True)
    return result


def run_paced(system: System, prompts: list[str], tenant: str, rate: float, cohort: Cohort,
              tiers: tuple[TierConfig, ...], timeout_s: float) -> RunResult:
    system.before_run(prompts)
    cohort.sim.reset()
    with ResultWatcher(system.client, system.key_for) as watcher:
        first = submit_paced(lambda p: system.submit_one(p, tenant), watcher, prompts, rate_per_s=rate)
        watcher.wait(timeout_s)
    result = summarize(system.name, "paced", watcher, cohort.sim.stats(), tiers, first_submit=first)
    print(f"  {system.name:22} paced {rate:g}/s: p50 {result.latency(0.5):.2f} p99 {result.latency(0.99):.2f}",
          flush=True)
    return result


@contextlib.contextmanager
def cohort_processes(cohort: Cohort, workers: int, concurrency: int) -> Iterator[None]:
    cohort.start_grouper()
    for index in range(workers):
        cohort.start_inference(f"inference{index}", concurrency=concurrency, pool="threads")
    cohort.start_beat()
    yield


def run(args: argparse.Namespace) -> tuple[str, str]:
    loads = workloads(args)
    paced_prompts = [p.text for p in banking77()][-args.paced_prompts:]
    sim_options = {"overhead_ms": args.overhead_ms, "latency_ms": args.latency_ms, "jitter_ms": args.jitter_ms}
    burst: dict[str, dict[str, RunResult]] = {w: {} for w in loads}
    embed_rates: list[float] = []
    paced: dict[str, RunResult] = {}
    with run_cohort(db=COHORT_DB, inference_workers=0, grouper=False, beat=False,
                    sim_options=sim_options) as cohort, \
            run_baseline("per-prompt", redis_url=f"{REDIS_HOST}/{PER_PROMPT_DB}", config_path=cohort.config_path,
                         workers=args.workers, concurrency=args.concurrency, env={"COHORT_SIM_KEY": SIM_KEY},
                         flush=True) as per_prompt, \
            run_baseline("batched", redis_url=f"{REDIS_HOST}/{BATCHED_DB}", config_path=cohort.config_path,
                         workers=args.workers, concurrency=args.concurrency, env={"COHORT_SIM_KEY": SIM_KEY},
                         flush=True) as batched, \
            cohort_processes(cohort, args.workers, args.concurrency):
        config = read_config(cohort.config_path, {})
        settings = worker_settings(config, {})
        tiers = parse_routing(config).tiers
        baseline_tier = tiers[0]
        embedding_pattern = cohort.keys.embedding("*", Encoder.for_grouping(settings.grouping).cache_tag)

        def clear_embeddings(_prompts: list[str]) -> None:
            for key in cohort.redis.scan_iter(match=embedding_pattern, count=1000):
                cohort.redis.delete(key)

        def warm(prompts: list[str]) -> None:
            clear_embeddings(prompts)
            embed_rates.append(warm_embeddings(cohort, sorted(set(prompts))))

        systems = [
            _baseline_system(SYSTEMS[0], per_prompt),
            _baseline_system(SYSTEMS[1], batched),
            _cohort_system(SYSTEMS[2], cohort, None, clear_embeddings),
            _cohort_system(SYSTEMS[3], cohort, {"model": baseline_tier.name}, clear_embeddings),
            _cohort_system(SYSTEMS[4], cohort, None, warm),
        ]
        for run_index, (workload, prompts) in enumerate(loads.items()):
            print(f"{workload}: {len(prompts)} prompts, {len(set(prompts))} distinct", flush=True)
            for system in systems:
                tenant = f"w{run_index}-{SYSTEMS.index(system.name)}"
                burst[workload][system.name] = run_burst(system, workload, prompts, tenant, cohort, tiers,
                                                         args.timeout_s)
        print(f"paced: {len(paced_prompts)} Banking77 prompts at {args.rate:g}/s", flush=True)
        for system in systems:
            paced[system.name] = run_paced(system, paced_prompts, f"paced-{SYSTEMS.index(system.name)}", args.rate,
                                           cohort, tiers, args.timeout_s)
    return report(args, loads, burst, paced, settings.grouping.max_wait_s, settings.grouping.max_batch_size,
                  baseline_tier, embed_rates)


def report(args: argparse.Namespace, loads: dict[str, list[str]], burst: dict[str, dict[str, RunResult]],
           paced: dict[str, RunResult], max_wait_s: float, batch_size: int, tier: TierConfig,
           embed_rates: list[float]) -> tuple[str, str]:
    """The full report (``docs/benchmarks/compare.md``) and the README's summary table."""
    headers = ["workload", "system", "prompts/s", "upstream calls", "input tokens", "output tokens", "cost",
               "cost vs (1)", "p50 s", "p99 s", "calls by model"]
    rows = []
    for workload, results in burst.items():
        base = results[SYSTEMS[0]]
        for name in SYSTEMS:
            r = results[name]
            failed = f" ({r.failed} failed)" if r.failed or r.answered < r.prompts else ""
            rows.append([f"{workload} ({len(loads[workload])})", name, f"{r.throughput:.1f}{failed}", r.calls,
                         r.tokens_in, r.tokens_out, f"{r.cost:.4f}", f"{r.cost / base.cost:.2f}x" if base.cost else "-",
                         f"{r.latency(0.5):.2f}", f"{r.latency(0.99):.2f}",
                         ", ".join(f"{m} {n}" for m, n in sorted(r.calls_by_model.items()))])
    paced_rows = [[name, f"{paced[name].throughput:.1f}", paced[name].calls, f"{paced[name].cost:.4f}",
                   f"{paced[name].latency(0.5):.2f}", f"{paced[name].latency(0.99):.2f}"] for name in SYSTEMS]

    floors = []
    limit = max_wait_s + LATENCY_MARGIN_S
    repeated = burst["Banking77 with repeats"]
    for cohort_name in FLOORED:
        c, one, two = repeated[cohort_name], repeated[SYSTEMS[0]], repeated[SYSTEMS[1]]
        floors.append([cohort_name, "cost <= 0.5x (1), repeats", f"{c.cost / one.cost:.2f}x",
                       _verdict(c.cost <= 0.5 * one.cost)])
        floors.append([cohort_name, "cost <= 0.8x (2), repeats", f"{c.cost / two.cost:.2f}x",
                       _verdict(c.cost <= 0.8 * two.cost)])
        for workload, results in burst.items():
            c, one = results[cohort_name], results[SYSTEMS[0]]
            floors.append([cohort_name, f"prompts/s >= (1), {workload}", f"{c.throughput:.1f} vs {one.throughput:.1f}",
                           _verdict(c.throughput >= one.throughput)])
            floors.append([cohort_name, f"p99 <= (1) + {limit:g} s, {workload}",
                           f"{c.latency(0.99):.2f} vs {one.latency(0.99):.2f}",
                           _verdict(c.latency(0.99) <= one.latency(0.99) + limit)])
        c, one = paced[cohort_name], paced[SYSTEMS[0]]
        floors.append([cohort_name, f"p99 <= (1) + {limit:g} s, paced {args.rate:g}/s",
                       f"{c.latency(0.99):.2f} vs {one.latency(0.99):.2f}",
                       _verdict(c.latency(0.99) <= one.latency(0.99) + limit)])

    checks = []
    for workload, results in burst.items():
        for name, r in results.items():
            if r.cost and abs(r.reported_cost - r.cost) > 0.02 * r.cost:
                checks.append(f"{workload} / {name}: cost in results {r.reported_cost:.4f} vs simulator {r.cost:.4f}")
    latency = (f"{args.overhead_ms:g} ms per call" + (f" + {args.latency_ms:g} ms per question"
                                                      if args.latency_ms else "")
               + (f" (+/- {args.jitter_ms:g} ms)" if args.jitter_ms else ""))
    lines = [
        "# Cohort against one task per prompt and celery-batches",
        "",
        f"`python -m ops.bench_compare --prompts {args.prompts} --doc-questions {args.doc_questions} "
        f"--workers {args.workers} --concurrency {args.concurrency} --overhead-ms {args.overhead_ms:g} "
        f"--latency-ms {args.latency_ms:g} --paced-prompts {args.paced_prompts} --rate {args.rate:g}`; {machine()}.",
        "",
        f"Every system: {args.workers} worker processes, `-P threads -c {args.concurrency}` each (Cohort also runs "
        f"its grouper and beat). Simulator: {latency}. The baselines call tier `{tier.name}` (`{tier.model}`, "
        f"{tier.price_in_per_1k:g} / {tier.price_out_per_1k:g} per 1,000 input / output tokens); Cohort's router "
        f"picks tiers itself, and `Cohort, one tier` pins every item to `{tier.name}`. celery-batches flushes "
        f"every {batch_size} prompts or {max_wait_s:g} s. Each workload is submitted whole (burst); latency is "
        "from a prompt's submission to its result in Redis; cost is the simulator's token counts at the tiers' "
        "prices.",
        "",
        f"`{SYSTEMS[4]}` is a diagnostic, not a system: Cohort's defaults with the workload's texts put in the "
        "grouper's embedding cache before the timed run (the grouper's own encoder, in this script). The gap "
        "between it and `Cohort` is what embedding new text costs the one grouper here: warming ran at "
        + ", ".join(f"{r:.0f}" for r in embed_rates) + " distinct texts/s (Banking77, repeats, documents, paced). "
        "No floor applies to it.",
        "",
        markdown_table(headers, rows),
        "",
        f"Latency at a fixed arrival rate ({len(next(iter(paced.values())).latencies)} Banking77 prompts at "
        f"{args.rate:g}/s, below every system's capacity):",
        "",
        markdown_table(["system", "prompts/s", "upstream calls", "cost", "p50 s", "p99 s"], paced_rows),
        "",
        "Floors:",
        "",
        markdown_table(["system", "floor", "measured", "verdict"], floors),
    ]
    if checks:
        lines += ["", "Cost cross-check (results vs simulator) off by more than 2%:", ""] + [f"- {c}" for c in checks]
    return "\n".join(lines), readme_summary(args, burst, paced, floors)


def readme_summary(args: argparse.Namespace, burst: dict[str, dict[str, RunResult]],
                   paced: dict[str, RunResult], floors: list[list[str]]) -> str:
    """A compact table of the three systems for the README (the diagnostic row left out)."""
    rows = []
    for workload, results in burst.items():
        base = results[SYSTEMS[0]]
        for name in SYSTEMS[:4]:
            r = results[name]
            rows.append([workload, name, f"{r.throughput:.0f}", r.calls, r.tokens_in, r.tokens_out,
                         f"{r.cost / base.cost:.2f}x" if base.cost else "-", f"{r.latency(0.5):.2f}",
                         f"{r.latency(0.99):.2f}"])
    for name in SYSTEMS[:4]:
        r = paced[name]
        rows.append([f"paced {args.rate:g}/s", name, f"{r.throughput:.0f}", r.calls, r.tokens_in, r.tokens_out,
                     f"{r.cost / paced[SYSTEMS[0]].cost:.2f}x" if paced[SYSTEMS[0]].cost else "-",
                     f"{r.latency(0.5):.2f}", f"{r.latency(0.99):.2f}"])
    met = sum(f[3] == "met" for f in floors)
    return "\n".join([
        markdown_table(["workload", "system", "prompts/s", "calls", "input tokens", "output tokens", "cost vs (1)",
                        "p50 s", "p99 s"], rows),
        "",
        f"Floors (cost, throughput and p99 against (1) and (2), for both Cohort rows): {met} of {len(floors)} met; "
        f"measured {machine()}.",
    ])


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.bench_compare", description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=600, help="prompts of each Banking77 workload (default 600)")
    parser.add_argument("--doc-questions", type=int, default=24, help="questions per document, 8 documents (24)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of every system (default 2)")
    parser.add_argument("--concurrency", type=int, default=16, help="threads per worker process (default 16)")
    parser.add_argument("--overhead-ms", type=float, default=300.0, help="simulated latency per call (default 300)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="simulated latency per question (default 0)")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="uniform +/- noise per call (default 0)")
    parser.add_argument("--paced-prompts", type=int, default=300, help="prompts of the fixed-rate run (default 300)")
    parser.add_argument("--rate", type=float, default=20.0, help="arrival rate of the fixed-rate run (default 20/s)")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="longest wait for one run (default 300)")
    args = parser.parse_args(argv)
    if not 16 <= args.prompts <= 3000 or not 1 <= args.doc_questions <= 200 or not 1 <= args.paced_prompts <= 2000:
        parser.error("--prompts must be 16..3000, --doc-questions 1..200, --paced-prompts 1..2000")
    if not 0.1 <= args.rate <= 500:
        parser.error("--rate must be 0.1..500")
    text, summary = run(args)
    print(text)
    print(f"\nwritten to {write_report('compare', text)}", file=sys.stderr)
    replace_section(README, "compare", summary)
    print(f"summary written to {README}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
