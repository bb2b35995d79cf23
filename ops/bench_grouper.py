"""Grouper benchmark: tick throughput against the raw encoder, and the queue wait it adds.

Usage: ``python -m ops.bench_grouper [--items 600] [--repeats 5] [--rate 100] [--duration 30]``
(``--skip-latency`` / ``--skip-throughput`` run one half). Uses Redis db 5, flushed.

1. Throughput, in-process. The raw encoder (``Encoder.encode``, batch 64, the default encoder at
   the grouper's thread count) embeds ``--items`` Banking77 queries; a ``workers.grouper.Grouper``
   with a real Redis, a real ``CachedEncoder`` whose cache is empty (so every embedding is
   computed) and a dispatch function that only records batches ticks until every enqueued item
   is dispatched or coalesced (``max_wait_s = 0`` and ``embed_late = true``: every item is
   embedded, then flushed at once). Both run on the same texts (queries long enough to be packed
   by a shared prefix are left out: the grouper would not embed them) and the same loaded
   model, alternately, ``--repeats`` times; medians and their ratio are reported, with the
   share of the grouper's time spent inside the encoder.
2. Added latency, through the real stack (``ops.launcher.run_cohort``: simulator, grouper
   worker, inference worker, beat; default settings, ``max_wait_s`` 0.5): one prompt submitted
   every ``1/rate`` seconds on a fixed schedule for ``--duration`` seconds; the queue wait of
   each result (``timings.queue_wait_s``: submission to the start of its batch, or to its
   answer for coalesced and cached items) gives p50 and p99, for all items and for items
   answered by their own batch. Floor: p99 at most ``max_wait_s`` + 250 ms. A second run in the
   same stack at ``--encoder-fraction`` (default half) of the raw encoder rate measured in part 1
   separates the grouping delay from saturation: on two shared cores the encoder may not keep
   up with 100 prompts/s, and then every queue grows, whatever the grouping does. A second
   stack, whose processes get one torch and one BLAS thread (``OMP_NUM_THREADS=1`` ...), runs
   the 100 prompts/s schedule again (``--no-single-thread-stack`` skips it), and the status of
   every 5th item is polled to split its queue wait into claim, open pool and dispatch.

0. Encoder threads: the raw encoder at 1 and 2 torch threads, alternating, on the same texts.

Prompts: Banking77 train queries shuffled with a fixed seed (the file is sorted by intent).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import redis

from ops.baselines.measure import Poller
from ops.configfile import default_config, merged
from ops.launcher import REDIS_HOST, run_cohort
from ops.workloads import Prompt, banking77
from producers import CohortClient, PromptResult
from workers.encoder import CachedEncoder, Encoder, resolve_quantize
from workers.grouper import Grouper
from workers.packing import prefix_key
from workers.settings import worker_settings
from workers.telemetry import read_counter

DB = 5
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "grouper.md"
FLOOR_RATIO = 0.90
LATENCY_MARGIN_S = 0.25
WATCH_EVERY = 5


def shuffled_banking77(seed: int = 0) -> list[Prompt]:
    prompts = banking77()
    random.Random(seed).shuffle(prompts)
    return prompts


class TimedEncoder(Encoder):
    """The encoder, adding up the seconds spent encoding."""

    def __init__(self, spec: str, *, int8: bool, threads: int) -> None:
        super().__init__(spec, int8=int8, threads=threads)
        self.seconds = 0.0

    def encode(self, texts: Any) -> np.ndarray:
        started = time.perf_counter()
        try:
            return super().encode(texts)
        finally:
            self.seconds += time.perf_counter() - started


def _encoder_name(encoder: Encoder) -> str:
    return f"{encoder.spec}, {'int8' if encoder.int8 else 'float32'}"


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


# --- 1. throughput -------------------------------------------------------------------------------
def grouper_run(encoder: TimedEncoder, client: redis.Redis, prompts: list[Prompt], *,
                max_ticks: int = 1000) -> dict[str, Any]:
    """Enqueue ``prompts`` on an empty db, tick until all are dispatched or coalesced; return figures."""
    client.flushdb()
    config = merged(default_config(), {"redis": {"url": f"{REDIS_HOST}/{DB}", "key_prefix": "gbench"},
                                       "grouping": {"max_wait_s": 0.0, "embed_late": True}})
    settings = worker_settings(config, env={})
    keys = settings.producer.redis.keys
    batches: list[tuple[str, int]] = []
    grouper = Grouper(settings, client, encoder=CachedEncoder(encoder, client, keys),
                      dispatch=lambda batch_id, size: batches.append((batch_id, size)))
    # (A full partition also sends a tick task to the broker queue; no worker reads it here.)
    CohortClient(settings.producer, redis_client=client).submit_many([p.text for p in prompts])
    encoder.seconds = 0.0
    done = ticks = 0
    started = time.perf_counter()
    while done < len(prompts) and ticks < max_ticks:
        report = grouper.tick()
        ticks += 1
        done += report.dispatched_items + report.coalesced
    elapsed = time.perf_counter() - started
    if done < len(prompts):
        raise RuntimeError(f"only {done} of {len(prompts)} items dispatched after {ticks} ticks")
    sizes = [size for _, size in batches]
    return {"seconds": elapsed, "encode_s": encoder.seconds, "ticks": ticks, "batches": len(batches),
            "mean_batch": statistics.mean(sizes), "coalesced": len(prompts) - sum(sizes),
            "batch_ids": [b for b, _ in batches], "keys": keys}


def batch_mixing(client: redis.Redis, keys: Any, batch_ids: list[str],
                 label_of: dict[str, str]) -> tuple[float, float]:
    """(share of multi-item batches mixing intents, purity) of recorded batches, read from Redis."""
    multi = mixed = majority = total = 0
    for batch_id in batch_ids:
        items = json.loads(client.hget(keys.batch(batch_id), "items") or b"[]")
        prompts = [json.loads(raw)["prompt"] for raw in client.mget([keys.item(i) for i in items]) if raw]
        counts = Counter(label_of.get(p, "?") for p in prompts)
        total += len(items)
        if counts:
            majority += counts.most_common(1)[0][1]
        if len(items) > 1:
            multi += 1
            mixed += len(counts) > 1
    return (mixed / multi if multi else 0.0), (majority / total if total else 1.0)


def throughput(items: int, repeats: int) -> tuple[list[str], float]:
    # Queries long enough to be packed by a shared prefix (220+ characters) are grouped without an
    # embedding: left out, so that both sides embed exactly the same texts.
    everything = shuffled_banking77()
    prompts = [p for p in everything if prefix_key(p.text) is None][:items]
    long_ones = sum(prefix_key(p.text) is not None for p in everything)
    texts = [p.text for p in prompts]
    client = redis.Redis.from_url(f"{REDIS_HOST}/{DB}")
    grouping = worker_settings(default_config(), env={}).grouping
    encoder = TimedEncoder(grouping.encoder, int8=resolve_quantize(grouping.encoder_quantize),
                           threads=grouping.encoder_threads)
    encoder.encode(texts[:64])  # load and warm the model
    raw_rates: list[float] = []
    grouper_rates: list[float] = []
    encode_shares: list[float] = []
    last: dict[str, Any] = {}
    for r in range(repeats):
        for which in (("raw", "grouper") if r % 2 == 0 else ("grouper", "raw")):
            if which == "raw":
                started = time.perf_counter()
                encoder.encode(texts)
                raw_rates.append(items / (time.perf_counter() - started))
            else:
                last = grouper_run(encoder, client, prompts)
                grouper_rates.append(items / last["seconds"])
                encode_shares.append(last["encode_s"] / last["seconds"])
        print(f"repeat {r + 1}: raw {raw_rates[-1]:.0f}/s, grouper {grouper_rates[-1]:.0f}/s", file=sys.stderr)
    mixed, purity = batch_mixing(client, last["keys"], last["batch_ids"], {p.text: p.label or "" for p in prompts})
    client.flushdb()
    client.close()
    raw_med, grp_med = statistics.median(raw_rates), statistics.median(grouper_rates)
    # Each repeat runs both back to back: the ratio within a repeat cancels slow swings of the
    # load that other processes put on the shared cores.
    ratios = [g / r for g, r in zip(grouper_rates, raw_rates, strict=True)]
    ratio = statistics.median(ratios)
    per_repeat = ", ".join(f"{x:.0%}" for x in ratios)
    verdict = "met" if ratio >= FLOOR_RATIO else "MISSED"
    return ([
        "## 1. Grouper throughput against the raw encoder",
        "",
        f"{items:,} Banking77 queries ({long_ones} of the {len(everything):,} are long enough to be packed by a "
        "shared prefix, which the grouper groups without embedding them: those are left out, so that both sides "
        f"embed the same texts), {repeats} repeats, each running both back to back in alternating order; "
        "one model loaded once, "
        f"batch 64 for both; the default encoder ({_encoder_name(encoder)}, {grouping.encoder_threads} torch "
        "thread, as the grouper runs it). Grouper: real Redis (db 5), "
        "`CachedEncoder` with an empty cache, `max_wait_s = 0` with `embed_late = true` (every item is "
        "embedded before it is flushed: the grouper does all of its work), dispatch recording batches; timed "
        "from the first tick until every item is dispatched or coalesced.",
        "",
        "| measure | raw encoder | grouper tick |",
        "|---|---:|---:|",
        f"| prompts per second (median) | {raw_med:.0f} | {grp_med:.0f} |",
        f"| all runs | {', '.join(f'{x:.0f}' for x in raw_rates)} | {', '.join(f'{x:.0f}' for x in grouper_rates)} |",
        f"| grouper / raw, per repeat | {per_repeat} | |",
        f"| share of grouper time inside the encoder (median) | - | {statistics.median(encode_shares):.1%} |",
        f"| ticks / batches / mean batch / coalesced (last run) | - | {last['ticks']} / {last['batches']} / "
        f"{last['mean_batch']:.1f} / {last['coalesced']} |",
        f"| batches mixing intents / batch purity (last run) | - | {mixed:.1%} / {purity:.3f} |",
        "",
        f"Ratio grouper / raw encoder (median of the per-repeat ratios): **{ratio:.1%}**; floor "
        f"{FLOOR_RATIO:.0%}: **{verdict}**. Within its own runs the grouper spends "
        f"{1 - statistics.median(encode_shares):.1%} of its time outside the encoder (claim, Redis, coalescing, "
        "clustering, recording and dispatch), a figure the load of other processes moves far less than the "
        "per-repeat ratios: with the encoder running as fast as alone, the ratio would be "
        f"{statistics.median(encode_shares):.1%}.",
        "",
    ], raw_med)


def encoder_threads(items: int, repeats: int, thread_counts: list[int]) -> list[str]:
    """The raw encoder at several torch thread counts, alternating, on the same texts."""
    import torch

    texts = [p.text for p in shuffled_banking77(seed=2)[:items]]
    default_threads = torch.get_num_threads()  # before the encoder loads: it sets its own count
    encoder = Encoder.for_grouping(worker_settings(default_config(), env={}).grouping)
    encoder.encode(texts[:16])
    rates: dict[int, list[float]] = {t: [] for t in thread_counts}
    singles: dict[int, list[float]] = {t: [] for t in thread_counts}
    try:
        for r in range(repeats):
            for threads in (thread_counts if r % 2 == 0 else thread_counts[::-1]):
                torch.set_num_threads(threads)
                started = time.perf_counter()
                encoder.encode(texts)
                rates[threads].append(items / (time.perf_counter() - started))
                for text in texts[:20]:
                    started = time.perf_counter()
                    encoder.encode([text])
                    singles[threads].append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(default_threads)
    lines = ["## Encoder threads", "",
             f"The raw encoder ({_encoder_name(encoder)}) on {items:,} Banking77 queries (batch 64) and on single "
             "queries (a quiet tick embeds a "
             f"handful), at each torch thread count, alternating, {repeats} repeats; torch's default here is "
             f"{default_threads}. On two cores shared with workers, Redis and other processes, intra-op threads wait "
             "for each other whenever the other core is busy.", "",
             "| torch threads | prompts per second (median) | one query p50 ms | one query p99 ms |",
             "|---:|---:|---:|---:|"]
    for threads in thread_counts:
        lines.append(f"| {threads} | {statistics.median(rates[threads]):.0f} | "
                     f"{_percentile(singles[threads], 50) * 1000:.0f} | "
                     f"{_percentile(singles[threads], 99) * 1000:.0f} |")
    return lines + [""]


# --- 2. latency -------------------------------------------------------------------------------------
STAGES = ("grouping", "batched", "running")
"""Item statuses in order: claimed into the open pool, recorded in a batch, its batch task started."""


class StageWatcher(Poller):
    """Polls the status of a sample of items and notes when each is first seen in each stage."""

    def __init__(self, client: CohortClient, period_s: float = 0.02) -> None:
        super().__init__(period_s, name="stage-watcher")
        self._client = client
        self._watched: dict[str, float] = {}
        self.seen: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()

    def watch(self, item_id: str, submitted_at: float) -> None:
        with self._lock:
            self._watched[item_id] = submitted_at
            self.seen[item_id] = {"submitted": submitted_at}

    def poll(self) -> None:
        with self._lock:
            open_ids = [i for i, stages in self.seen.items() if "running" not in stages]
        if not open_ids:
            return
        pipe = self._client.redis.pipeline(transaction=False)
        for item_id in open_ids:
            pipe.hget(self._client.keys.item_status(item_id), "status")
        now = time.time()
        for item_id, raw in zip(open_ids, pipe.execute(), strict=True):
            status = raw.decode() if raw else ""
            if status in STAGES:
                stages = self.seen[item_id]
                for stage in STAGES[: STAGES.index(status) + 1]:
                    stages.setdefault(stage, now)

    def breakdown(self) -> dict[str, list[float]]:
        """Seconds spent before being claimed, in the open pool, and between batching and the task's start."""
        out: dict[str, list[float]] = {"claim": [], "open pool": [], "dispatch to start": []}
        for stages in self.seen.values():
            if "running" not in stages:
                continue
            out["claim"].append(stages["grouping"] - stages["submitted"])
            out["open pool"].append(stages["batched"] - stages["grouping"])
            out["dispatch to start"].append(stages["running"] - stages["batched"])
        return out


def _latency_run(cohort: Any, prompts: list[Prompt], rate: float) -> dict[str, Any]:
    client: CohortClient = cohort.client
    calls_before = int(cohort.sim.stats()["requests"])
    unembedded_before = _unembedded(cohort)
    handles = []
    lag: list[float] = []
    with StageWatcher(client) as watcher:
        started = time.monotonic()
        for n, prompt in enumerate(prompts):
            due = started + n / rate
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            lag.append(max(0.0, time.monotonic() - due))
            submitted_at = time.time()
            handles.append(client.submit(prompt.text))
            if n % WATCH_EVERY == 0:
                watcher.watch(handles[-1].id, submitted_at)
        submit_s = time.monotonic() - started
        outcomes = client.wait([h.id for h in handles], timeout=300, raise_on_timeout=False)
        drained_s = time.monotonic() - started
    results = [o for o in outcomes if isinstance(o, PromptResult)]
    own = [r for r in results if not r.coalesced and not r.cached]
    return {
        "rate": rate, "n": len(prompts), "submit_s": submit_s, "drained_s": drained_s, "lag_p99": _percentile(lag, 99),
        "calls": int(cohort.sim.stats()["requests"]) - calls_before,
        "unembedded": _unembedded(cohort) - unembedded_before,
        "batches": len({r.batch_id for r in own if r.batch_id}),
        "failures": dict(Counter(type(o).__name__ for o in outcomes if not isinstance(o, PromptResult))),
        "all": results, "own": own, "stages": watcher.breakdown(),
    }


def _unembedded(cohort: Any) -> int:
    """Items the grouper flushed before its encoder reached them (its telemetry counter)."""
    return int(read_counter(cohort.redis, cohort.keys, "unembedded_items"))


SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
"""Every process of the stack with one torch and one BLAS thread (read by torch and numpy at start)."""


def latency(rates: list[float], duration: float, latency_ms: float, *, single_thread: bool) -> list[str]:
    max_wait = float(default_config()["grouping"]["max_wait_s"])
    floor = max_wait + LATENCY_MARGIN_S
    pool = shuffled_banking77(seed=1)
    runs = []
    variants: list[tuple[str, dict[str, str], list[float]]] = [("default threads", {}, rates)]
    if single_thread:
        variants.append(("1 thread", SINGLE_THREAD_ENV, rates[:1]))
    for label, env, variant_rates in variants:
        offset = 0  # each stack starts on an empty db: its own caches, no kept answers
        with run_cohort(db=DB, sim_options={"latency_ms": latency_ms}, concurrency=8, env=env) as cohort:
            for rate in variant_rates:
                count = int(rate * duration)
                run = _latency_run(cohort, pool[offset:offset + count], rate)
                run["label"] = f"{label}, {rate:.0f}/s"
                runs.append(run)
                offset += count
                print(f"latency run {run['label']} done", file=sys.stderr)

    def row(label: str, results: list[PromptResult], calls: bool) -> str:
        waits = [r.timings.get("queue_wait_s", 0.0) for r in results]
        e2e = [r.timings.get("end_to_end_s", 0.0) for r in results]
        model = _percentile([r.timings.get("model_call_s", 0.0) for r in results], 50) * 1000 if calls else None
        return (f"| {label} | {len(results):,} | {_percentile(waits, 50) * 1000:.0f} | "
                f"{_percentile(waits, 99) * 1000:.0f} | "
                f"{_percentile(e2e, 50) * 1000:.0f} | {_percentile(e2e, 99) * 1000:.0f} | "
                f"{'-' if model is None else f'{model:.0f}'} |")

    lines = [
        "## 2. Added latency at a fixed arrival rate (real stack)",
        "",
        f"Distinct Banking77 queries, one every 1/rate seconds on a fixed schedule for {duration:.0f} s, through "
        f"`run_cohort` (grouper, inference worker with 8 threads, beat; default grouping: max_wait_s {max_wait}, "
        f"interval_s 0.25), simulator latency {latency_ms:.0f} ms per question. Queue wait: `timings.queue_wait_s` "
        "(submission to the start of the item's batch; for coalesced and served items, to their answer). "
        "`default threads`: the stack as shipped (torch and numpy pick their own thread counts); `1 thread`: "
        "a second stack whose processes get OMP_NUM_THREADS=1, MKL_NUM_THREADS=1 and OPENBLAS_NUM_THREADS=1.",
        "",
        "| stack, rate: items | n | queue wait p50 ms | queue wait p99 ms | end-to-end p50 ms | end-to-end p99 ms | "
        "model call p50 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for run in runs:
        lines.append(row(f"{run['label']}: all answered", run["all"], False))
        lines.append(row(f"{run['label']}: answered by their own batch", run["own"], True))
        notes.append(f"- {run['label']}: {run['n']:,} prompts submitted in {run['submit_s']:.1f} s "
                     "(schedule lag p99 "
                     f"{run['lag_p99'] * 1000:.0f} ms), all answered {run['drained_s']:.1f} s after the first; "
                     f"{run['calls']:,} upstream calls, {run['batches']:,} batches, "
                     f"{run['unembedded']:,} items flushed before the encoder reached them"
                     + (f"; failed {run['failures']}" if run["failures"] else "") + ".")
    lines += ["", *notes, "",
              f"Where the queue wait goes, for every {WATCH_EVERY}th item (its status polled every 20 ms; "
              "each stage ends when the next status is first seen):", "",
              "| stack, rate | items | stage | p50 ms | p99 ms |", "|---|---:|---|---:|---:|"]
    for run in runs:
        for stage, values in run["stages"].items():
            lines.append(f"| {run['label']} | {len(values)} | {stage} | {_percentile(values, 50) * 1000:.0f} | "
                         f"{_percentile(values, 99) * 1000:.0f} |")
    lines.append("")
    for run in runs:
        if run["rate"] != rates[0]:
            continue
        p99 = max(_percentile([r.timings.get("queue_wait_s", 0.0) for r in run[k]], 99) for k in ("all", "own"))
        verdict = "met" if p99 <= floor else "MISSED"
        lines.append(f"Floor, {run['label']}: queue wait p99 at most max_wait + 250 ms = {floor * 1000:.0f} ms: "
                     f"{p99 * 1000:.0f} ms, **{verdict}**.")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=600, help="prompts per throughput run")
    parser.add_argument("--repeats", type=int, default=5, help="throughput repeats (medians)")
    parser.add_argument("--rate", type=float, default=100.0, help="arrival rate of the latency run (prompts/s)")
    parser.add_argument("--encoder-fraction", type=float, default=0.5,
                        help="also run at this fraction of the raw encoder rate measured in part 1 (0: no)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals in the latency run")
    parser.add_argument("--sim-latency-ms", type=float, default=5.0, help="simulator latency per question")
    parser.add_argument("--thread-items", type=int, default=300,
                        help="prompts per run of the encoder-threads comparison (0: skip it)")
    parser.add_argument("--no-single-thread-stack", dest="single_thread_stack", action="store_false",
                        help="skip the latency run of a stack whose processes use one torch/BLAS thread")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown report to write")
    args = parser.parse_args(argv)
    import os

    import torch

    lines = ["# Grouper benchmark", "",
             f"`python -m ops.bench_grouper --items {args.items} --repeats {args.repeats} --rate {args.rate:.0f} "
             f"--duration {args.duration:.0f}` on {os.cpu_count()} cores (torch threads {torch.get_num_threads()}; "
             "load "
             f"average {os.getloadavg()[0]:.1f} at the start: the cores are shared); "
             "Redis db 5. Prompts: Banking77 train queries shuffled with a fixed seed.", ""]
    rates = [args.rate]
    if args.thread_items > 0:
        lines += encoder_threads(args.thread_items, 3, [1, 2])
    if not args.skip_throughput:
        part, raw_rate = throughput(args.items, args.repeats)
        lines += part
        if args.encoder_fraction > 0:
            rates.append(round(raw_rate * args.encoder_fraction))
    if not args.skip_latency:
        lines += latency(rates, args.duration, args.sim_latency_ms, single_thread=args.single_thread_stack)
    report = "\n".join(lines)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
