"""The demo: a whole Cohort on this machine, a realistic workload, and what batching saved.

    python -m ops.demo [--workload support|banking77|banking77-repeated|documents|PATH] [--count N]

Starts Redis (only if none is reachable), the provider simulator, a grouper worker, an inference
worker, beat, Flower, the HTTP API and the monitor; submits the workload; waits for every answer;
prints the figures next to those of one call per prompt; stops everything it started.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass

from ops.launcher import available_redis, run_cohort, wait_until
from ops.simulator import answer_for, count_prompt_tokens, estimate_tokens, truncate_to_tokens
from ops.workloads import Prompt, stream_of
from producers import PromptResult
from workers.packing import single_user_content

DEMO_DB = 9
SIM_LATENCY = {"overhead_ms": 150, "latency_ms": 20, "jitter_ms": 10}


@dataclass(frozen=True)
class Figures:
    prompts: int
    answered: int
    failed: int
    calls: int
    tokens_in: int
    tokens_out: int
    cost: float


def one_call_per_prompt(prompts: list[Prompt], *, max_tokens: int, price_in: float, price_out: float) -> Figures:
    """What the simulator charges when every prompt is sent on its own to the primary tier.

    The simulator is deterministic, so these are the figures a replay would produce, without the calls.
    """
    tokens_in = tokens_out = 0
    for prompt in prompts:
        tokens_in += count_prompt_tokens([single_user_content(prompt.text, prompt.context)])
        answer, _cut = truncate_to_tokens(answer_for(prompt.text, prompt.context), max_tokens)
        tokens_out += estimate_tokens(answer)
    cost = tokens_in * price_in / 1000 + tokens_out * price_out / 1000
    return Figures(len(prompts), len(prompts), 0, len(prompts), tokens_in, tokens_out, cost)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="support", help="support (default), banking77, "
                        "banking77-repeated, documents, or a file (.csv with 'text', .jsonl with 'prompt', or lines)")
    parser.add_argument("--count", type=int, default=600, help="prompts to submit (default 600)")
    parser.add_argument("--redis", default=os.environ.get("COHORT_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--keep-running", type=float, default=0.0, help="seconds to keep the stack up afterwards")
    args = parser.parse_args(argv)
    # SIGTERM and SIGHUP unwind like Ctrl-C, so that everything the demo started is stopped.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)

    prompts = stream_of(args.workload, args.count)
    if not prompts:
        print(f"no prompts in workload {args.workload!r}", file=sys.stderr)
        return 2
    flower_auth = os.environ.get("FLOWER_BASIC_AUTH") or f"demo:{secrets.token_urlsafe(8)}"
    with available_redis(args.redis) as (redis_url, started_here):
        base = redis_url.rsplit("/", 1)[0]
        print(f"Redis: {base} ({'started for the demo' if started_here else 'already running'})")
        with run_cohort(db=0 if started_here else DEMO_DB, redis_base=base, concurrency=16, flush=started_here,
                        sim_options=SIM_LATENCY, env={"FLOWER_BASIC_AUTH": flower_auth}) as cohort:
            ports = _start_front(cohort, flower_auth)
            print(f"Flower:    http://127.0.0.1:{ports['flower']}  (basic auth {flower_auth})")
            print(f"API:       http://127.0.0.1:{ports['api']}/docs")
            print(f"Dashboard: http://127.0.0.1:{ports['monitor']}/dashboard   metrics: /metrics")
            print(f"Submitting {len(prompts)} prompts ({args.workload})...")
            started = time.monotonic()
            handles = cohort.client.submit_many(
                [{"prompt": p.text, "context": p.context} for p in prompts], tenant="demo")
            outcomes = cohort.client.wait([h.id for h in handles], timeout=600, raise_on_timeout=False)
            elapsed = time.monotonic() - started
            stats = cohort.sim.stats()
            answered = [o for o in outcomes if isinstance(o, PromptResult)]
            cohort_figures = Figures(
                prompts=len(prompts), answered=len(answered), failed=len(outcomes) - len(answered),
                calls=int(stats["requests"]), tokens_in=sum(stats["tokens_in"].values()),
                tokens_out=sum(stats["tokens_out"].values()), cost=sum(o.cost for o in answered))
            tiers = cohort_config_tiers(cohort.config_path)
            baseline = one_call_per_prompt(prompts, max_tokens=256, price_in=tiers[0], price_out=tiers[1])
            print_summary(cohort_figures, baseline, elapsed, answered)
            if args.keep_running > 0:
                print(f"Keeping the stack up for {args.keep_running:.0f} s (Ctrl-C to stop)...")
                time.sleep(args.keep_running)
    print("Stopped everything the demo started.")
    return 0 if cohort_figures.failed == 0 else 1


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _start_front(cohort, flower_auth: str) -> dict[str, int]:
    """Flower, the HTTP API and the monitor, on free ports."""
    import httpx

    from ops.launcher import _free_port

    ports = {"flower": _free_port(), "api": _free_port(), "monitor": _free_port()}
    cohort.start("flower", ["flower", f"--port={ports['flower']}", "--address=127.0.0.1",
                            f"--basic-auth={flower_auth}"])
    cohort.start_process("api", ["-m", "ops.api", "--host", "127.0.0.1", "--port", str(ports["api"]), "--demo"])
    cohort.start_process("monitor", ["-m", "ops.monitor", "--host", "127.0.0.1", "--port", str(ports["monitor"]),
                                      "--demo"])

    def up(name: str, url: str) -> bool:
        if cohort.processes[name].poll() is not None:
            raise RuntimeError(f"the {name} server exited: {cohort.log(name)}")
        try:
            return httpx.get(url, timeout=1).status_code < 500
        except httpx.HTTPError:
            return False

    for name, path in (("api", "/healthz"), ("monitor", "/metrics")):
        url = f"http://127.0.0.1:{ports[name]}{path}"
        wait_until(lambda name=name, url=url: up(name, url), timeout=60, message=f"the {name} server")
    return ports


def cohort_config_tiers(path) -> tuple[float, float]:
    import tomllib

    with open(path, "rb") as fh:
        primary = tomllib.load(fh)["tiers"][0]
    return float(primary["price_in_per_1k"]), float(primary["price_out_per_1k"])


def print_summary(cohort: Figures, baseline: Figures, elapsed: float, answered: list[PromptResult]) -> None:
    coalesced = sum(1 for r in answered if r.coalesced)
    latencies = sorted(r.timings.get("end_to_end_s", 0.0) for r in answered)
    p50 = latencies[len(latencies) // 2] if latencies else 0.0
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else 0.0
    rows = [
        ("prompts submitted", f"{cohort.prompts}", f"{baseline.prompts}"),
        ("answered", f"{cohort.answered}", f"{baseline.answered}"),
        ("failed", f"{cohort.failed}", f"{baseline.failed}"),
        ("upstream model calls", f"{cohort.calls}", f"{baseline.calls}"),
        ("input tokens", f"{cohort.tokens_in}", f"{baseline.tokens_in}"),
        ("output tokens", f"{cohort.tokens_out}", f"{baseline.tokens_out}"),
        ("cost", f"{cohort.cost:.4f}", f"{baseline.cost:.4f}"),
    ]
    print()
    print(f"{'':<24}{'Cohort':>14}{'one call per prompt':>22}")
    for label, mine, theirs in rows:
        print(f"{label:<24}{mine:>14}{theirs:>22}")
    saved = 1 - cohort.cost / baseline.cost if baseline.cost else 0.0
    print()
    print(f"saved {saved:.0%} of the cost and {1 - cohort.calls / max(1, baseline.calls):.0%} of the calls; "
          f"{coalesced} prompts answered by another's call")
    print(f"throughput {cohort.answered / elapsed:.1f} prompts/s; end-to-end latency p50 {p50:.2f} s, p99 {p99:.2f} s")


if __name__ == "__main__":
    sys.exit(main())
