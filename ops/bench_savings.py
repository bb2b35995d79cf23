"""Savings benchmark: upstream calls, tokens and cost of three workloads through Cohort, against
one call per prompt sent to the same simulator.

Usage: ``python -m ops.bench_savings [--base 1000] [--repeated-base 700] [--rate 100]``.
Uses Redis db 5, flushed.

Every prompt is pinned to the primary tier (``params.model = "primary"``: simulator model
``sim-large``, 0.01 / 0.03 per 1k input / output tokens), so both sides pay the same prices and
the figures show grouping, coalescing and packing alone (complexity routing to cheaper tiers is
measured elsewhere). Both sides use ``max_tokens`` 256.

- Cohort: ``run_cohort`` (grouper, inference worker, beat, default grouping settings), prompts
  submitted one by one at ``--rate`` per second; each workload has its own tenant, so no workload
  reuses another's answers. Figures are the simulator's own counts (``/admin/stats``, reset
  before each run).
- Baseline: one call per prompt, really sent to the same simulator (concurrent httpx, 32 in
  flight), the user message being exactly what Cohort sends for a prompt alone
  (``single_user_content``); cross-checked against the simulator's deterministic token functions
  (``count_prompt_tokens``, ``estimate_tokens(answer_for(...))``).

Workloads (Banking77 train queries shuffled with seed 0, because the file is sorted by intent):

a. ``--base`` distinct Banking77 queries.
b. ``--repeated-base`` other Banking77 queries, each asked a Zipf-distributed number of times
   (``ops.workloads.repeat_counts``: P(k) proportional to k^-1.6 for k = 1..20, seed 0; about half
   asked once, mean about 3.2), the repeats of one query arriving within 64 positions of its first
   ask (``repeated_stream``, burst 64): a burst of customers with the same problem. Repeats are
   the same text.
c. ``documents_workload``: 8 passages (600 to 1,500 characters, built from consecutive
   self-instruct instances) x 24 questions each (12 generic reading questions, then the same 12
   with "(part 2)"), each prompt being ``passage + "\\n\\nQuestion: " + question`` with no explicit
   context field (the grouper must find the shared prefix), shuffled.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from ops.configfile import default_config
from ops.launcher import SIM_KEY, Cohort, run_cohort
from ops.simulator import answer_for, count_prompt_tokens, estimate_tokens, parse_single
from ops.workloads import Prompt, banking77, documents_workload, repeat_counts, repeated_stream
from producers import PromptResult
from workers.packing import single_user_content

DB = 5
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "savings.md"
PIN = {"model": "primary"}
MAX_TOKENS = 256


@dataclass
class Usage:
    calls: int
    tokens_in: int
    tokens_out: int
    cost: float


def _prices() -> dict[str, tuple[float, float]]:
    return {t["model"]: (t["price_in_per_1k"], t["price_out_per_1k"]) for t in default_config()["tiers"]}


def usage_from_stats(stats: dict[str, Any]) -> Usage:
    prices = _prices()
    cost = sum(n * prices[m][0] / 1000 for m, n in stats["tokens_in"].items())
    cost += sum(n * prices[m][1] / 1000 for m, n in stats["tokens_out"].items())
    return Usage(int(stats["requests"]), sum(stats["tokens_in"].values()), sum(stats["tokens_out"].values()), cost)


def computed_baseline(prompts: list[Prompt]) -> Usage:
    """One call per prompt, from the simulator's deterministic token functions (no call made)."""
    price_in, price_out = _prices()["sim-large"]
    tokens_in = tokens_out = 0
    for p in prompts:
        content = single_user_content(p.text, p.context)
        tokens_in += count_prompt_tokens([content])
        context, question = parse_single(content)
        tokens_out += estimate_tokens(answer_for(question, context))
    return Usage(len(prompts), tokens_in, tokens_out, (tokens_in * price_in + tokens_out * price_out) / 1000)


async def _send_all(base_url: str, contents: list[str], concurrency: int) -> None:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {SIM_KEY}"},
                                 timeout=60, limits=limits) as http:
        gate = asyncio.Semaphore(concurrency)

        async def one(content: str) -> None:
            async with gate:
                response = await http.post("/chat/completions", json={
                    "model": "sim-large", "max_tokens": MAX_TOKENS,
                    "messages": [{"role": "user", "content": content}]})
                response.raise_for_status()

        await asyncio.gather(*(one(c) for c in contents))


def sent_baseline(cohort: Cohort, prompts: list[Prompt], concurrency: int = 32) -> Usage:
    """One call per prompt, really sent to the simulator; returns its counts for those calls."""
    cohort.sim.reset()
    asyncio.run(_send_all(cohort.sim.base_url, [single_user_content(p.text, p.context) for p in prompts],
                          concurrency))
    return usage_from_stats(cohort.sim.stats())


def through_cohort(cohort: Cohort, prompts: list[Prompt], *, tenant: str, rate: float) -> tuple[Usage, dict[str, Any]]:
    cohort.sim.reset()
    handles = []
    started = time.monotonic()
    for n, p in enumerate(prompts):
        pause = started + n / rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        handles.append(cohort.client.submit(p.text, context=p.context, tenant=tenant, params=PIN,
                                            max_tokens=MAX_TOKENS))
    outcomes = cohort.client.wait([h.id for h in handles], timeout=120, raise_on_timeout=False)
    elapsed = time.monotonic() - started
    results = [o for o in outcomes if isinstance(o, PromptResult)]
    failures = Counter(type(o).__name__ for o in outcomes if not isinstance(o, PromptResult))
    info = {
        "answered": len(results), "failed": dict(failures), "seconds": elapsed,
        "coalesced": sum(r.coalesced and not r.cached for r in results),
        "cached": sum(r.cached for r in results),
        "packed": sum(r.packed for r in results),
        "reported_cost": sum(r.cost for r in results),
        "models": Counter(r.model for r in results),
    }
    return usage_from_stats(cohort.sim.stats()), info


def repeat_summary(n: int) -> str:
    counts = repeat_counts(n, seed=0)
    hist = Counter(counts)
    three_to_five = sum(hist[k] for k in range(3, 6)) / n
    six_plus = sum(v for k, v in hist.items() if k >= 6) / n
    return (f"{n} base queries -> {sum(counts):,} prompts; asked once {hist[1] / n:.0%}, twice {hist[2] / n:.0%}, "
            f"3-5 times {three_to_five:.0%}, 6+ times {six_plus:.0%}; "
            f"mean {sum(counts) / n:.2f}, max {max(counts)}")


def _pct(ours: float, base: float) -> str:
    return f"{1 - ours / base:.1%}" if base else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=int, default=1000, help="distinct Banking77 queries in workload (a)")
    parser.add_argument("--repeated-base", type=int, default=700, help="base queries of workload (b)")
    parser.add_argument("--rate", type=float, default=100.0, help="arrival rate (prompts/s)")
    parser.add_argument("--sim-latency-ms", type=float, default=5.0, help="simulator latency per question")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown report to write")
    args = parser.parse_args(argv)

    queries = banking77()
    random.Random(0).shuffle(queries)
    workloads = {
        "a. Banking77 stream": queries[:args.base],
        "b. Banking77, repeated": repeated_stream(queries[args.base:args.base + args.repeated_base], seed=0),
        "c. documents x questions": documents_workload(),
    }
    floors = {"b. Banking77, repeated": ("cost", 0.50), "c. documents x questions": ("input tokens", 0.60)}
    rows = ["| workload | prompts | side | upstream calls | input tokens | output tokens | cost | "
            "saved: calls / input / output / cost |",
            "|---|---:|---|---:|---:|---:|---:|---|"]
    notes: list[str] = []
    verdicts: list[str] = []
    with run_cohort(db=DB, sim_options={"latency_ms": args.sim_latency_ms}, concurrency=8) as cohort:
        for index, (name, prompts) in enumerate(workloads.items()):
            ours, info = through_cohort(cohort, prompts, tenant=f"w{index}", rate=args.rate)
            base = sent_baseline(cohort, prompts)
            check = computed_baseline(prompts)
            print(f"{name}: cohort {ours}, baseline {base}, computed {check}", file=sys.stderr)
            saved = (f"{_pct(ours.calls, base.calls)} / {_pct(ours.tokens_in, base.tokens_in)} / "
                     f"{_pct(ours.tokens_out, base.tokens_out)} / {_pct(ours.cost, base.cost)}")
            rows.append(f"| {name} | {len(prompts):,} | one call per prompt | {base.calls:,} | {base.tokens_in:,} | "
                        f"{base.tokens_out:,} | {base.cost:.3f} | |")
            rows.append(f"| | | **Cohort** | {ours.calls:,} | {ours.tokens_in:,} | {ours.tokens_out:,} | "
                        f"{ours.cost:.3f} | {saved} |")
            agree = (base.calls, base.tokens_in, base.tokens_out) == (check.calls, check.tokens_in, check.tokens_out)
            notes.append(f"- {name}: answered {info['answered']:,} in {info['seconds']:.1f} s"
                         + (f", failed {info['failed']}" if info["failed"] else "")
                         + f"; coalesced {info['coalesced']:,}, served from a kept answer {info['cached']:,}, "
                         f"packed {info['packed']:,}; models {dict(info['models'])}; cost Cohort reports in results "
                         f"{info['reported_cost']:.3f}; sent baseline {'equals' if agree else 'DIFFERS from'} the "
                         f"computed one ({check.calls:,} calls, {check.tokens_in:,} in, {check.tokens_out:,} out).")
            if name in floors:
                what, floor = floors[name]
                achieved = 1 - (ours.cost / base.cost if what == "cost" else ours.tokens_in / base.tokens_in)
                verdicts.append(f"- {name}: {achieved:.1%} lower {what} (floor {floor:.0%}): "
                                f"**{'met' if achieved >= floor else 'MISSED'}**.")
    report = "\n".join([
        "# Savings against one call per prompt",
        "",
        f"`python -m ops.bench_savings --base {args.base} --repeated-base {args.repeated_base} "
        f"--rate {args.rate:.0f}`: "
        f"real stack (`run_cohort`, Redis db 5, default grouping: max_wait_s 0.5, batches of 16), prompts submitted "
        f"at {args.rate:.0f}/s, all pinned to the primary tier (sim-large, 0.01 / 0.03 per 1k tokens in / out), "
        f"max_tokens {MAX_TOKENS}. Figures are the simulator's own counts. Baseline: one call per prompt with "
        "the same user message Cohort sends for a prompt alone, really sent to the same simulator.",
        "",
        "Workloads: Banking77 train queries shuffled (seed 0; the file is sorted by intent). "
        f"(a) {args.base:,} distinct queries. (b) {args.repeated_base:,} other queries, each repeated "
        "a Zipf number of times, P(k) ~ k^-1.6 for k = 1..20 (`ops.workloads.repeat_counts`, seed 0: "
        f"{repeat_summary(args.repeated_base)}), repeats arriving within 64 positions of the first ask "
        "(`repeated_stream`). (c) `documents_workload()`: 8 passages of 600-1,500 characters (consecutive "
        "self-instruct instances) x 24 reading questions, each prompt = passage + question in one text, "
        "no context field, shuffled.",
        "",
        *rows,
        "",
        *notes,
        "",
        "Floors:",
        "",
        *verdicts,
        "",
    ])
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
