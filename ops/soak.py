"""Load and soak: many prompts through two inference workers, a faulty provider, and a chaos loop.

    python -m ops.soak [--prompts 10000] [--max-seconds 900] [--rate 25] [--kill-every 20]

What it does, all on this machine over loopback:

- starts its own redis-server (no persistence, a free port), the provider simulator, a grouper,
  beat and two inference workers (threads pool, 4 threads each);
- the simulator injects 10% errors (5xx 5%, 429 3% with Retry-After 0.2 s, non-JSON bodies 1%,
  truncated bodies 1%) and random latency (300 ms per call + 30 ms per question, +/- 200 ms);
- a producer submits Banking77 questions at a fixed arrival rate (``--rate`` prompts/s, default 15,
  below what the grouper's encoder sustains on a shared 2-core machine; 0 = as fast as it can),
  alternating two tenants;
- a chaos loop SIGKILLs one inference worker (in turn) every ``--kill-every`` seconds while prompts
  arrive (as soon as a batch is running, if one starts within 5 s), and starts a replacement at once;
- final results are read as they appear and again at the end (after forcing the broker to redeliver
  every unacknowledged task): a final result that changed counts as a duplicated final result.

Bounded: at most ``--prompts`` prompts and ``--max-seconds`` seconds; items without a final result
by then are reported as lost. The report (submitted, answered, failed with a clear error, lost,
duplicated final results, duplicated upstream calls, throughput, latency percentiles) is printed
and written to ``docs/benchmarks/soak.md``.

Delivery settings are shortened so that a killed worker's batches come back within the run: the
broker's visibility timeout 30 s, task time limit 20 s, a dispatched batch not completed after 30 s
is dispatched again (``lost_batch_after_s``); the defaults (600 s, 300 s, 900 s) suit long batches.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
from kombu import Connection

from ops.launcher import REPO_ROOT, Cohort, run_cohort, wait_until
from ops.workloads import banking77
from producers import CohortError, PromptResult
from producers.results import decode_final

DELIVERY = {"visibility_timeout_s": 30, "task_time_limit_s": 20, "redispatch_after_s": 2.0,
            "lost_batch_after_s": 30.0, "max_redeliveries": 3}
FAULTS = {"error_5xx_rate": 0.05, "error_429_rate": 0.03, "retry_after_s": 0.2, "malformed_rate": 0.01,
          "truncated_rate": 0.01}
LATENCY = {"overhead_ms": 300, "latency_ms": 30, "jitter_ms": 200}
TENANTS = ("acme", "globex")
REPORT_PATH = REPO_ROOT / "docs" / "benchmarks" / "soak.md"


@contextlib.contextmanager
def own_redis() -> Iterator[str]:
    """A redis-server of this run's own on a free port (nothing kept on disk); yields its base URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH (or pass --redis-base)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="cohort-soak-redis-") as workdir:
        process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no", "--dir", workdir], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        base = f"redis://127.0.0.1:{port}"
        try:
            probe = redis.Redis.from_url(base + "/0")
            wait_until(lambda: _ping(probe), timeout=20, message="the soak's redis-server")
            probe.close()
            yield base
        finally:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
            if process.poll() is None:
                process.kill()
                process.wait()


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@dataclass
class Ledger:
    """Every submitted item: when it was submitted and the first final result read for it."""

    submitted_at: dict[str, float] = field(default_factory=dict)
    prompts: dict[str, str] = field(default_factory=dict)
    first: dict[str, bytes] = field(default_factory=dict)
    pending: set[str] = field(default_factory=set)
    changed: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, item_id: str, prompt: str, at: float) -> None:
        with self.lock:
            self.submitted_at[item_id] = at
            self.prompts[item_id] = prompt
            self.pending.add(item_id)

    def read(self, client: redis.Redis, keys: Any, ids: list[str]) -> None:
        """Read the results of ``ids``; remember first finals, note any that changed since."""
        for start in range(0, len(ids), 1000):
            chunk = ids[start:start + 1000]
            raws = client.mget([keys.result(i) for i in chunk])
            with self.lock:
                for item_id, raw in zip(chunk, raws, strict=True):
                    if raw is None or decode_final(raw) is None:
                        if item_id in self.first:
                            self.changed.add(item_id)  # a final result disappeared
                        continue
                    if item_id in self.first:
                        if raw != self.first[item_id]:
                            self.changed.add(item_id)
                    else:
                        self.first[item_id] = raw
                        self.pending.discard(item_id)


def force_redelivery(broker_url: str) -> int:
    """Put every unacknowledged task back on its queue now, as the broker would after its visibility timeout."""
    client = redis.Redis.from_url(broker_url)
    try:
        count = int(client.hlen("unacked"))
    finally:
        client.close()
    with Connection(broker_url, transport_options={"visibility_timeout": 0}) as conn:
        conn.default_channel.qos.restore_visible(num=None, interval=1)
    return count


def producer_loop(cohort: Cohort, ledger: Ledger, texts: list[str], *, rate: float, stop: threading.Event,
                  done: threading.Event) -> None:
    """Submit ``texts`` at ``rate`` prompts/s (0: as fast as possible), in small chunks."""
    chunk = 100 if rate <= 0 else max(1, int(rate / 10))
    started = time.monotonic()
    sent = 0
    try:
        while sent < len(texts) and not stop.is_set():
            if rate > 0:
                due = started + sent / rate
                pause = due - time.monotonic()
                if pause > 0:
                    stop.wait(pause)
                    continue
            batch = texts[sent:sent + chunk]
            tenant = TENANTS[(sent // chunk) % len(TENANTS)]
            now = time.time()
            try:
                handles = cohort.client.submit_many(batch, tenant=tenant)
            except redis.RedisError as exc:  # not accepted: not counted as submitted
                print(f"soak: submit failed ({type(exc).__name__}), retrying", flush=True)
                stop.wait(0.5)
                continue
            for handle, text in zip(handles, batch, strict=True):
                ledger.add(handle.id, text, now)
            sent += len(batch)
    finally:
        done.set()


def chaos_loop(cohort: Cohort, *, every_s: float, stop: threading.Event, calm: threading.Event,
               kills: list[dict[str, Any]], concurrency: int) -> None:
    """SIGKILL one inference worker (in turn) every ``every_s`` seconds and start a replacement at once.

    Kills stop once ``calm`` is set; the thread itself lives until ``stop``, because the launcher's
    processes die with the thread that started them (parent-death signal).
    """
    generation = 0
    while not stop.wait(every_s):
        if calm.is_set():
            continue
        alive = sorted(n for n, p in cohort.processes.items() if n.startswith("inference") and p.poll() is None)
        if not alive:
            continue
        victim = alive[0]  # the oldest: each worker in turn
        with contextlib.suppress(TimeoutError):  # aim for a moment when a batch is running
            wait_until(lambda: _running_batches(cohort) > 0, timeout=5, interval=0.05, message="a running batch")
        running = _running_batches(cohort)
        at = time.monotonic()
        cohort.kill(victim, signal.SIGKILL)
        generation += 1
        replacement = f"inference-r{generation}"
        try:
            cohort.start_inference(replacement, concurrency=concurrency)
        except (RuntimeError, TimeoutError) as exc:
            print(f"soak: replacement {replacement} did not start: {exc}", flush=True)
        kills.append({"victim": victim, "batches_running": running, "restart_s": round(time.monotonic() - at, 1)})
        print(f"soak: killed {victim} ({running} batch(es) running anywhere), started {replacement} "
              f"in {time.monotonic() - at:.1f} s", flush=True)


def _running_batches(cohort: Cohort) -> int:
    return sum(1 for _ in cohort.redis.scan_iter(match=cohort.keys.batch_lock("*"), count=1000))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, int(round(q / 100 * len(ordered) + 0.5)))
    return ordered[min(rank, len(ordered)) - 1]


def run(args: argparse.Namespace, base: str) -> dict[str, Any]:
    rng = random.Random(args.seed)
    texts = [p.text for p in banking77()]
    rng.shuffle(texts)
    texts = texts[:args.prompts]
    config = {"delivery": DELIVERY, "grouping": {"interval_s": 0.25, "max_batch_size": 16, "max_wait_s": 0.5}}
    # The 5xx share takes up whatever --error-rate asks beyond the other faults (5% by default).
    faults = {**FAULTS, "error_5xx_rate": round(args.error_rate - 0.05, 4)}
    sim_options = {**LATENCY, "faults": {"*": faults}}
    deadline = time.monotonic() + args.max_seconds
    with run_cohort(db=args.db, redis_base=base, config=config, sim_options=sim_options, inference_workers=2,
                    concurrency=args.concurrency) as cohort:
        ledger = Ledger()
        stop = threading.Event()
        submitted_all = threading.Event()
        kills: list[dict[str, Any]] = []
        started = time.time()
        producer = threading.Thread(target=producer_loop, args=(cohort, ledger, texts),
                                    kwargs={"rate": args.rate, "stop": stop, "done": submitted_all}, daemon=True)
        calm, chaos_end = threading.Event(), threading.Event()
        chaos = threading.Thread(target=chaos_loop, args=(cohort,),
                                 kwargs={"every_s": args.kill_every, "stop": chaos_end, "calm": calm, "kills": kills,
                                         "concurrency": args.concurrency}, daemon=True)
        producer.start()
        if args.kill_every > 0:
            chaos.start()
        last_print = 0.0
        while time.monotonic() < deadline:
            with ledger.lock:
                pending = list(ledger.pending)
            ledger.read(cohort.redis, cohort.keys, pending)
            if submitted_all.is_set():
                calm.set()  # the chaos runs while prompts arrive; then the backlog drains
                if not ledger.pending:
                    break
            if time.monotonic() - last_print > 10:
                last_print = time.monotonic()
                print(f"soak: {time.time() - started:6.0f} s  submitted {len(ledger.submitted_at)}  "
                      f"final {len(ledger.first)}  kills {len(kills)}", flush=True)
            time.sleep(0.5)
        calm.set()
        stop.set()  # (the producer, if the time ran out)
        producer.join(timeout=30)
        finished = time.time()
        # Late duplicates: every unacknowledged task delivered again now; nothing may change.
        redelivered = force_redelivery(cohort.client.settings.redis.url)
        settle_until = time.monotonic() + 10
        while time.monotonic() < settle_until:
            ledger.read(cohort.redis, cohort.keys, list(ledger.submitted_at))
            time.sleep(2)
        stats = cohort.sim.stats()
        counters = {k.decode(): float(v) for k, v in cohort.redis.hgetall(cohort.keys.counters()).items()}
        chaos_end.set()
        if chaos.is_alive():
            chaos.join(timeout=max(10.0, args.kill_every + 130))
        return summarize(args, ledger, stats, counters, kills, started=started, finished=finished,
                         redelivered=redelivered)


def summarize(args: argparse.Namespace, ledger: Ledger, stats: dict[str, Any], counters: dict[str, float],
              kills: list[dict[str, Any]], *, started: float, finished: float, redelivered: int) -> dict[str, Any]:
    answered = failed = unclear = own_calls = coalesced = 0
    codes: Counter[str] = Counter()
    latencies: list[float] = []
    last_done = started
    for item_id, raw in ledger.first.items():
        outcome = decode_final(raw)
        meta = json.loads(raw)
        done_at = datetime.fromisoformat(meta["date_done"]).timestamp()
        last_done = max(last_done, done_at)
        latencies.append(max(0.0, done_at - ledger.submitted_at[item_id]))
        if isinstance(outcome, PromptResult):
            answered += 1
            if outcome.coalesced or outcome.cached:
                coalesced += 1
            else:
                own_calls += 1
        elif isinstance(outcome, CohortError):
            failed += 1
            codes[outcome.code] += 1
            if outcome.code == "cohort_error" or not outcome.message:
                unclear += 1
    submitted = len(ledger.submitted_at)
    lost = submitted - len(ledger.first)
    upstream_questions = int(sum(stats.get("prompts", {}).values()))
    recorded = int(counters.get("items:answered", 0) + counters.get("items:failed", 0))
    calls = Counter()
    for model_calls in stats.get("calls", {}).values():
        calls.update(model_calls)
    elapsed = max(1e-9, last_done - started)
    return {
        "prompts": args.prompts, "rate": args.rate, "kill_every_s": args.kill_every, "seed": args.seed,
        "submitted": submitted, "answered": answered, "answered_coalesced": coalesced,
        "failed_clear": failed - unclear, "failed_unclear": unclear, "failed_by_code": dict(codes.most_common()),
        "lost": lost, "duplicated_final_results": len(ledger.changed),
        "outcomes_recorded": recorded,
        "upstream_calls": int(stats.get("requests", 0)), "upstream_outcomes": dict(calls.most_common()),
        "upstream_questions_answered": upstream_questions,
        "duplicated_upstream_calls": upstream_questions - own_calls,
        "kills": len(kills), "kill_log": kills, "forced_redeliveries": redelivered,
        "wall_s": round(finished - started, 1), "throughput_per_s": round((answered + failed) / elapsed, 1),
        "latency_p50_s": round(percentile(latencies, 50), 2), "latency_p95_s": round(percentile(latencies, 95), 2),
        "latency_p99_s": round(percentile(latencies, 99), 2), "latency_max_s": round(max(latencies, default=0), 2),
    }


def markdown(report: dict[str, Any]) -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    rows = [
        ("items submitted", report["submitted"]),
        ("answered", f"{report['answered']} (of which {report['answered_coalesced']} shared another item's answer)"),
        ("failed with a clear error", f"{report['failed_clear']} {report['failed_by_code'] or ''}"),
        ("failed with an unclear error", report["failed_unclear"]),
        ("**lost** (no final result)", f"**{report['lost']}**"),
        ("**duplicated final results**", f"**{report['duplicated_final_results']}**"),
        ("final outcomes recorded by telemetry", report["outcomes_recorded"]),
        ("upstream calls (all outcomes)", f"{report['upstream_calls']} {report['upstream_outcomes']}"),
        ("questions answered upstream", report["upstream_questions_answered"]),
        ("duplicated upstream calls (questions answered more than once)", report["duplicated_upstream_calls"]),
        ("worker kills (SIGKILL, restarted at once)", report["kills"]),
        ("unacknowledged tasks redelivered at the end", report["forced_redeliveries"]),
        ("wall time", f"{report['wall_s']} s"),
        ("throughput (final results per second)", report["throughput_per_s"]),
        ("latency p50 / p95 / p99 / max (submit to final result)",
         f"{report['latency_p50_s']} / {report['latency_p95_s']} / {report['latency_p99_s']} / "
         f"{report['latency_max_s']} s"),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    every = f"{report['kill_every_s']:g}"
    return f"""# Soak: {report['prompts']:,} prompts, a faulty provider, a worker killed every {every} s

Command: `python -m ops.soak --prompts {report['prompts']} --rate {report['rate']:g} --kill-every \
{report['kill_every_s']:g} --seed {report['seed']}` ({datetime.now().strftime('%Y-%m-%d %H:%M')}).

Set-up (all on one machine, loopback): own redis-server, provider simulator, one grouper, beat,
two inference workers (threads, 4 each). Arrival: a fixed rate of {report['rate']:g} prompts/s
(Banking77 questions, two tenants). Provider faults: 10% of calls (5xx 5%, 429 3%, non-JSON 1%,
truncated 1%), latency 300 ms per call + 30 ms per question, +/- 200 ms. Chaos: one inference
worker SIGKILLed every {every} s while prompts arrive (as soon as a batch is running, if one starts
within 5 s), a replacement started at once.
Delivery settings: visibility timeout 30 s, task time limit 20 s, lost batch redispatched after
30 s, at most 3 redeliveries. Machine: {os.cpu_count()} CPUs ({platform.machine()}), load average
{load[0]:.1f} at the end, shared with other work.

| figure | value |
|---|---|
{table}

A duplicated upstream call is a question the provider answered with an ok reply more than once
(a batch killed mid-call and run again, or a packed reply cut or miscounted and asked again). Lost
and duplicated final results must be 0: every item ends with exactly one final result, and a late
duplicate (including every unacknowledged task redelivered at the end) never overwrites it.
Latency is dominated by batches whose worker was killed: they come back after
`lost_batch_after_s` (30 s here).

Kills: {json.dumps(report['kill_log'])}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=10_000, help="prompts to submit (default 10,000)")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="hard bound on the run (default 900)")
    parser.add_argument("--rate", type=float, default=15.0, help="arrivals per second, 0 = as fast as possible")
    parser.add_argument("--kill-every", type=float, default=20.0, help="seconds between worker kills, 0 = none")
    parser.add_argument("--concurrency", type=int, default=4, help="threads per inference worker")
    parser.add_argument("--error-rate", type=float, default=0.10, help="share of failing upstream calls")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--redis-base", help="redis://HOST:PORT of a Redis whose --db may be flushed "
                                             "(default: a redis-server of the run's own)")
    parser.add_argument("--db", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPORT_PATH, help="where to write the Markdown report")
    args = parser.parse_args(argv)
    if not 1 <= args.prompts <= 100_000 or not 10 <= args.max_seconds <= 3600:
        parser.error("--prompts must be 1..100,000 and --max-seconds 10..3600")
    if not 0.05 <= args.error_rate <= 0.5:
        parser.error("--error-rate must be between 0.05 and 0.5")
    with contextlib.ExitStack() as stack:
        base = args.redis_base or stack.enter_context(own_redis())
        report = run(args, base)
    print(json.dumps({k: v for k, v in report.items() if k != "kill_log"}, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(report))
    print(f"report written to {args.out}")
    return 0 if report["lost"] == 0 and report["duplicated_final_results"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
