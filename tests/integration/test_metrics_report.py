"""Metrics, report, alerts and the monitor's endpoints against real Redis (db 14, this module's own).

A known sequence goes through ``Telemetry``; the test works out every expected figure itself,
from the sequence, and checks the Prometheus exposition, the report (API and CLI), the dashboard
data and the alert evaluator (fire, dedup, resolve, webhook) against them. The last test runs a
real Cohort (workers, beat, simulator) and checks the same figures against counts taken outside
Cohort: the simulator's own call and token counts and the client's results.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from ops.cli_monitor import main as cli_main
from ops.monitor.dashboard import dashboard_data
from ops.monitor.report import report
from ops.monitor.server import MonitorApp, MonitorServer
from ops.monitor.settings import monitor_settings
from producers.errors import ConfigError
from producers.keys import GROUPER_CONSUMER_GROUP, Keys
from tests.support.config import default_config, merged, write_config
from workers.alerting import AlertStore, alert_settings, run_once
from workers.telemetry import LATENCY_BUCKETS, DispatchedBatch, Telemetry

DB = 14
REDIS_HOST = os.environ.get("COHORT_TEST_REDIS", "redis://127.0.0.1:6379")
URL = f"{REDIS_HOST}/{DB}"
OPS = Path(__file__).resolve().parents[2] / "ops"
PRICES = {"primary": (0.01, 0.03), "secondary": (0.0005, 0.0015), "long-context": (0.003, 0.015)}


@pytest.fixture(scope="module")
def rdb() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(URL)
    client.flushdb()  # db 14 belongs to these tests
    yield client
    client.flushdb()
    client.close()


def make_config(prefix: str, **overrides: Any) -> dict[str, Any]:
    return merged(default_config(), {"redis": {"url": URL, "key_prefix": prefix}, **overrides})


def price(tier: str, tokens_in: float, tokens_out: float) -> float:
    p_in, p_out = PRICES[tier]
    return (tokens_in * p_in + tokens_out * p_out) / 1000.0


# --- the known sequence ---------------------------------------------------------------------
@dataclass
class Known:
    """The sequence fed through telemetry and every figure expected from it."""

    latencies: list[float] = field(default_factory=list)
    items: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (tenant, tier, outcome)
    calls: dict[tuple[str, str], int] = field(default_factory=dict)  # (tier, outcome)
    cost: dict[tuple[str, str], float] = field(default_factory=dict)  # (tier, tenant)
    tokens: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    baseline_cost: dict[str, float] = field(default_factory=dict)
    baseline_tokens: dict[str, list[int]] = field(default_factory=dict)
    call_latencies: dict[str, list[float]] = field(default_factory=dict)
    tenant_of: list[str] = field(default_factory=list)


def feed_known_traffic(client: redis.Redis, keys: Keys) -> Known:
    """Record a fixed mix of calls, items and grouping events; return what they add up to."""
    priced = Telemetry(client, keys, baseline_price_in_per_1k=0.01, baseline_price_out_per_1k=0.03)
    unpriced = Telemetry(client, keys)  # leaves the baseline to be priced by the reader
    k = Known()

    def add(d: dict[Any, Any], key: Any, value: Any) -> None:
        d[key] = d.get(key, 0) + value

    for tier, tenant, outcome, t_in, t_out, latency, items, count in (
        ("primary", "acme", "ok", 200, 100, 0.4, 3, 10),
        ("primary", "acme", "provider_unavailable", 0, 0, 1.2, 3, 2),
        ("secondary", "beta", "ok", 100, 40, 0.2, 1, 5),
    ):
        for _ in range(count):
            cost = price(tier, t_in, t_out)
            priced.upstream_call(tier=tier, tenant=tenant, outcome=outcome, tokens_in=t_in, tokens_out=t_out,
                                 cost=cost, latency_s=latency, items=items)
            add(k.calls, (tier, outcome), 1)
            add(k.cost, (tier, tenant), cost)
            old = k.tokens.get((tier, tenant), (0, 0))
            k.tokens[(tier, tenant)] = (old[0] + t_in, old[1] + t_out)
            k.call_latencies.setdefault(tier, []).append(latency)

    def item(t: Telemetry, *, tenant: str, tier: str | None, outcome: str, e2e: float, bl: tuple[int, int, float],
             **kwargs: Any) -> None:
        t.item_finished(tenant=tenant, tier=tier, outcome=outcome, queue_wait_s=0.1, model_call_s=0.2,
                        end_to_end_s=e2e, **kwargs)
        add(k.items, (tenant, tier or "none", outcome), 1)
        k.latencies.append(e2e)
        k.tenant_of.append(tenant)
        add(k.baseline_cost, tenant, bl[2])
        tokens = k.baseline_tokens.setdefault(tenant, [0, 0])
        tokens[0] += bl[0]
        tokens[1] += bl[1]

    share = price("primary", 200, 100) / 3
    for i in range(30):
        flags = {"coalesced": i % 3 == 2, "cached": i in (27, 28), "packed": i < 6}
        common = dict(tenant="acme", tier="primary", outcome="answered", e2e=0.5 + 0.05 * i, cost=share,
                      tokens_in=70, tokens_out=33, **flags)
        if i < 10:  # the worker says what one call per prompt would have sent and received
            item(priced, bl=(80, 40, price("primary", 80, 40)), baseline_tokens_in=80, baseline_tokens_out=40,
                 **common)
        elif i < 20:  # ... or what it would have cost
            item(priced, bl=(70, 33, 0.004), baseline_cost=0.004, **common)
        else:  # ... or nothing: the item's own tokens, priced by whoever reads them
            item(unpriced, bl=(70, 33, price("primary", 70, 33)), **common)
    for _ in range(5):
        item(priced, tenant="beta", tier="secondary", outcome="answered", e2e=0.3, cost=price("secondary", 100, 40),
             tokens_in=100, tokens_out=40, bl=(100, 40, price("primary", 100, 40)))
    for _ in range(2):
        item(priced, tenant="beta", tier=None, outcome="failed", e2e=5.0, cost=0.0, tokens_in=0, tokens_out=0,
             error_code="fallback_exhausted", bl=(0, 0, 0.0))
    item(priced, tenant="acme", tier=None, outcome="failed", e2e=0.1, cost=0.0, tokens_in=0, tokens_out=0,
         error_code="budget_exceeded", bl=(0, 0, 0.0))

    for _ in range(2):
        priced.retry(tier="primary", reason="provider_unavailable")
    priced.fallback(from_tier="primary", to_tier="secondary", reason="circuit_open")
    priced.fallback(from_tier="secondary", to_tier=None, reason="exhausted")
    for _ in range(10):
        priced.batches_dispatched([DispatchedBatch(3, "cluster", "acme")])
    for _ in range(5):
        priced.batches_dispatched([DispatchedBatch(1, "single", "beta")])
    for duration in (0.01, 0.02, 0.03):
        priced.grouping_tick(duration_s=duration, claimed=3, dispatched=3, open_items=4)
    for _ in range(4):
        priced.grouping_tick(duration_s=0.001, claimed=0, dispatched=0, open_items=4)
    priced.circuit_changed(tier="primary", state="open")
    return k


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[math.ceil(q * len(ordered)) - 1]


def scrape(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def sample(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


# --- shared running monitor -------------------------------------------------------------------
@dataclass
class Env:
    keys: Keys
    config: dict[str, Any]
    known: Known
    server: MonitorServer
    auth: tuple[str, str]
    fed_at: float
    """When the known traffic was recorded."""


@pytest.fixture(scope="module")
def env(rdb: redis.Redis) -> Iterator[Env]:
    prefix = f"m{uuid.uuid4().hex[:6]}"
    config = make_config(prefix, budgets={"global_daily": 1.0, "tenants": {"acme": {"daily": 0.05}}})
    keys = Keys(prefix)
    known = feed_known_traffic(rdb, keys)
    fed_at = time.time()
    auth = ("ops", "s3cret-" + uuid.uuid4().hex[:6])
    settings = monitor_settings(config, {"COHORT_MONITOR_USER": auth[0], "COHORT_MONITOR_PASSWORD": auth[1]},
                                port=0)
    server = MonitorServer(MonitorApp(settings, config)).start()
    yield Env(keys, config, known, server, auth, fed_at)
    server.stop()


def get(env: Env, path: str, *, auth: bool = True) -> httpx.Response:
    return httpx.get(env.server.url + path, auth=env.auth if auth else None, timeout=10, follow_redirects=False)


# --- metrics ----------------------------------------------------------------------------------
def test_metrics_need_basic_auth(env: Env) -> None:
    assert get(env, "/metrics", auth=False).status_code == 401
    assert get(env, "/metrics", auth=False).headers["www-authenticate"].startswith("Basic")
    wrong = httpx.get(env.server.url + "/metrics", auth=(env.auth[0], "nope"), timeout=10)
    assert wrong.status_code == 401
    assert get(env, "/metrics").status_code == 200
    assert get(env, "/healthz", auth=False).json() == {"ok": True, "redis": True}
    for path in ("/dashboard", "/dashboard/data", "/alerts", "/queues", "/report"):
        assert get(env, path, auth=False).status_code == 401, path


def test_monitor_refuses_to_start_without_credentials_unless_demo() -> None:
    with pytest.raises(ConfigError, match="COHORT_MONITOR_USER"):
        monitor_settings(make_config("x"), {})
    assert not monitor_settings(make_config("x"), {}, demo=True).auth_required


def test_metrics_show_the_exact_figures(env: Env) -> None:
    k = env.known
    s = scrape(get(env, "/metrics").text)
    for (tenant, tier, outcome), n in k.items.items():
        assert sample(s, "cohort_items_total", tenant=tenant, tier=tier, outcome=outcome) == n
    assert sample(s, "cohort_items_coalesced_total", tenant="acme") == 10
    assert sample(s, "cohort_items_cached_total", tenant="acme") == 2
    assert sample(s, "cohort_items_packed_total", tenant="acme") == 6
    assert sample(s, "cohort_item_errors_total", tenant="beta", code="fallback_exhausted") == 2
    assert sample(s, "cohort_item_errors_total", tenant="acme", code="budget_exceeded") == 1
    for (tier, outcome), n in k.calls.items():
        assert sample(s, "cohort_upstream_calls_total", tier=tier, outcome=outcome) == n
    assert sample(s, "cohort_upstream_call_items_total", tier="primary") == 36
    for (tier, tenant), (t_in, t_out) in k.tokens.items():
        assert sample(s, "cohort_tokens_in_total", tier=tier, tenant=tenant) == t_in
        assert sample(s, "cohort_tokens_out_total", tier=tier, tenant=tenant) == t_out
        assert sample(s, "cohort_cost_total", tier=tier, tenant=tenant) == pytest.approx(k.cost[(tier, tenant)])
    for tenant, cost in k.baseline_cost.items():
        assert sample(s, "cohort_baseline_cost_total", tenant=tenant) == pytest.approx(cost)
        assert sample(s, "cohort_baseline_tokens_in_total", tenant=tenant) == k.baseline_tokens[tenant][0]
        assert sample(s, "cohort_baseline_tokens_out_total", tenant=tenant) == k.baseline_tokens[tenant][1]
    assert sample(s, "cohort_retries_total", tier="primary", reason="provider_unavailable") == 2
    assert sample(s, "cohort_fallbacks_total", from_tier="primary", to_tier="secondary", reason="circuit_open") == 1
    assert sample(s, "cohort_fallbacks_total", from_tier="secondary", to_tier="none", reason="exhausted") == 1
    assert sample(s, "cohort_circuit_transitions_total", tier="primary", state="open") == 1
    assert sample(s, "cohort_batches_total", kind="cluster") == 10
    assert sample(s, "cohort_batched_items_total", kind="cluster") == 30
    assert sample(s, "cohort_grouping_ticks_total") == 7
    assert sample(s, "cohort_grouping_open_items") == 4


def test_histograms_count_every_observation_in_its_bucket(env: Env) -> None:
    k = env.known
    s = scrape(get(env, "/metrics").text)
    assert sample(s, "cohort_end_to_end_seconds_count") == len(k.latencies)
    assert sample(s, "cohort_end_to_end_seconds_sum") == pytest.approx(sum(k.latencies))
    for bound in LATENCY_BUCKETS:
        expected = sum(1 for v in k.latencies if v <= bound)
        assert sample(s, "cohort_end_to_end_seconds_bucket", le=repr(float(bound))) == expected, bound
    assert sample(s, "cohort_end_to_end_seconds_bucket", le="+Inf") == len(k.latencies)
    assert sample(s, "cohort_queue_wait_seconds_count") == len(k.latencies)
    for tier, values in k.call_latencies.items():
        assert sample(s, "cohort_model_call_seconds_count", tier=tier) == len(values)
        assert sample(s, "cohort_model_call_seconds_sum", tier=tier) == pytest.approx(sum(values))
    assert sample(s, "cohort_model_call_seconds_bucket", tier="primary", le="1.0") == 10  # the 0.4 s calls
    assert sample(s, "cohort_batch_size_count") == 15
    assert sample(s, "cohort_batch_size_sum") == 35
    assert sample(s, "cohort_batch_size_bucket", le="1.0") == 5
    assert sample(s, "cohort_grouping_seconds_count") == 3  # idle ticks are not observed
    assert sample(s, "cohort_grouping_seconds_sum") == pytest.approx(0.06)
    assert sample(s, "cohort_coalesce_ratio") == pytest.approx(10 / 38)
    assert sample(s, "cohort_cache_hit_ratio") == pytest.approx(2 / 38)


def test_live_gauges_queues_circuits_budgets(env: Env, rdb: redis.Redis) -> None:
    keys = env.keys
    stream = keys.pending_stream()
    for i in range(4):
        rdb.xadd(stream, {"id": f"item-{i}"})
    rdb.xgroup_create(stream, GROUPER_CONSUMER_GROUP, id="0")
    rdb.xreadgroup(GROUPER_CONSUMER_GROUP, "c", {stream: ">"}, count=1)  # read, not acknowledged
    rdb.zadd(keys.open_pool(), {"a": 1.0, "b": 2.0})
    rdb.rpush("inference", "m1", "m2", "m3")
    rdb.rpush("gpu", "m1")
    rdb.hset(keys.circuit("secondary"), mapping={"state": "half_open"})
    rdb.set(keys.tier_disabled("long-context"), "1")
    day = time.strftime("day:%Y-%m-%d", time.gmtime())
    rdb.hset(keys.budget("global", day), mapping={"spent": 850_000_000, "reserved": 50_000_000})
    rdb.hset(keys.budget("tenant:acme", day), mapping={"spent": 50_000_000})
    try:
        s = scrape(get(env, "/metrics").text)
        queues = get(env, "/queues").json()
    finally:
        rdb.delete("inference", "gpu")
    assert queues == {"pending_stream": 4, "pending_unclaimed": 3, "pending_unacked": 1, "open_pool": 2,
                      "pending": 6, "inference": 3, "grouper": 0, "gpu": 1, "inflight_batches": 0}
    assert sample(s, "cohort_pending_items") == 6
    assert sample(s, "cohort_queue_depth", queue="inference") == 3
    assert sample(s, "cohort_queue_depth", queue="open_pool") == 2
    assert sample(s, "cohort_circuit_state", tier="secondary", state="half_open") == 1
    assert sample(s, "cohort_circuit_state", tier="primary", state="closed") == 1
    assert sample(s, "cohort_circuit_open", tier="secondary") == 1
    assert sample(s, "cohort_tier_disabled", tier="long-context") == 1
    assert sample(s, "cohort_budget_limit", scope="global", period="day") == 1.0
    assert sample(s, "cohort_budget_spent", scope="global", period="day") == pytest.approx(0.85)
    assert sample(s, "cohort_budget_remaining", scope="global", period="day") == pytest.approx(0.10)
    assert sample(s, "cohort_budget_used_ratio", scope="tenant:acme", period="day") == pytest.approx(1.0)
    assert sample(s, "cohort_redis_up") == 1


def _record_from_child(prefix: str, count: int) -> None:
    client = redis.Redis.from_url(URL)
    t = Telemetry(client, Keys(prefix))
    for _ in range(count):
        t.item_finished(tenant="acme", tier="primary", outcome="answered", cost=0.001, tokens_in=10, tokens_out=5,
                        queue_wait_s=0.1, model_call_s=0.1, end_to_end_s=0.3)
        t.upstream_call(tier="primary", tenant="acme", outcome="ok", tokens_in=10, tokens_out=5, cost=0.001,
                        latency_s=0.1, items=1)


def test_counts_from_forked_processes_add_up(rdb: redis.Redis) -> None:
    """What Celery's prefork pool does: children record at once; the monitor sees every record."""
    import multiprocessing

    prefix = f"f{uuid.uuid4().hex[:6]}"
    context = multiprocessing.get_context("fork")
    children = [context.Process(target=_record_from_child, args=(prefix, 150)) for _ in range(4)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    config = make_config(prefix)
    app = MonitorApp(monitor_settings(config, {}, demo=True, port=0), config, client=rdb)
    s = scrape(app.handle("/metrics", {})[2].decode())
    assert sample(s, "cohort_items_total", tenant="acme", tier="primary", outcome="answered") == 600
    assert sample(s, "cohort_upstream_calls_total", tier="primary", outcome="ok") == 600
    assert sample(s, "cohort_tokens_in_total", tier="primary", tenant="acme") == 6000
    assert sample(s, "cohort_cost_total", tier="primary", tenant="acme") == pytest.approx(0.6)
    assert sample(s, "cohort_end_to_end_seconds_count") == 600


# --- the report -------------------------------------------------------------------------------
def test_report_figures_are_exact(env: Env, rdb: redis.Redis) -> None:
    k = env.known
    r = report(rdb, env.keys, env.config, since_s=300)
    requests = len(k.latencies)
    answered = sum(n for (_, _, outcome), n in k.items.items() if outcome == "answered")
    assert (r["requests"], r["answered"], r["failed"]) == (requests, answered, requests - answered) == (38, 35, 3)
    assert r["error_rate"] == pytest.approx(3 / 38)
    assert r["errors"] == {"budget_exceeded": 1, "fallback_exhausted": 2}
    assert r["latency_s"]["avg"] == pytest.approx(sum(k.latencies) / requests)
    for q in (50, 95, 99):
        assert r["latency_s"][f"p{q}"] == nearest_rank(k.latencies, q / 100), q
    cost = sum(k.cost.values())
    assert r["cost_total"] == pytest.approx(cost)
    assert r["cost_per_request"] == pytest.approx(cost / requests)
    assert r["calls"] == sum(k.calls.values()) and r["failed_calls"] == 2
    assert r["tokens_in"] == sum(t[0] for t in k.tokens.values())
    assert r["cache_hit_rate"] == pytest.approx(2 / 38)
    assert r["coalescing_rate"] == pytest.approx(10 / 38)
    assert r["throughput_rps"] == pytest.approx(38 / 300)
    primary = r["tiers"]["primary"]
    assert (primary["items"], primary["calls"], primary["failed_calls"]) == (30, 12, 2)
    assert primary["share"] == pytest.approx(30 / 35)
    assert primary["cost"] == pytest.approx(k.cost[("primary", "acme")])
    assert primary["avg_call_latency_s"] == pytest.approx(sum(k.call_latencies["primary"]) / 12)
    assert r["tiers"]["secondary"]["items"] == 5
    baseline = sum(k.baseline_cost.values())
    assert r["baseline"]["cost"] == pytest.approx(baseline)
    assert r["baseline"]["savings"] == pytest.approx(baseline - cost)
    assert r["baseline"]["tier"] == "primary"
    assert r["retries"] == {"provider_unavailable": 2}
    assert r["avg_batch_size"] == pytest.approx(35 / 15)


def test_report_for_one_tenant(env: Env, rdb: redis.Redis) -> None:
    k = env.known
    r = report(rdb, env.keys, env.config, since_s=300, tenant="acme")
    acme = [v for v, t in zip(k.latencies, k.tenant_of, strict=True) if t == "acme"]
    assert (r["requests"], r["answered"], r["failed"]) == (31, 30, 1)
    assert r["latency_s"]["p50"] == nearest_rank(acme, 0.5)
    assert r["cost_total"] == pytest.approx(k.cost[("primary", "acme")])
    assert r["baseline"]["cost"] == pytest.approx(k.baseline_cost["acme"])
    assert set(r["tiers"]) == {"primary"}


def test_report_window_excludes_older_events(env: Env, rdb: redis.Redis) -> None:
    r = report(rdb, env.keys, env.config, since_s=60, now=time.time() + 3600)
    assert r["requests"] == 0 and r["cost_total"] == 0


def test_report_cli_table_and_json(env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path / "cohort.toml", {"redis": env.config["redis"]})
    assert cli_main(["report", "--since", "5m", "--json", "--config-file", str(path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["requests"], data["answered"], data["failed"]) == (38, 35, 3)
    assert cli_main(["report", "--since", "5m", "--tenant", "beta", "--config-file", str(path)]) == 0
    table = capsys.readouterr().out
    assert "tenant beta" in table
    assert [line.split()[-1] for line in table.splitlines() if line.strip().startswith("requests")] == ["7"]
    assert "one call per prompt on primary" in table
    assert cli_main(["report", "--since", "soon", "--config-file", str(path)]) == 2


def test_report_endpoint(env: Env) -> None:
    data = get(env, "/report?since=5m&tenant=beta").json()
    assert (data["requests"], data["failed"]) == (7, 2)
    assert get(env, "/report?since=never").status_code == 400


def test_dashboard_data_totals(env: Env, rdb: redis.Redis) -> None:
    k = env.known
    time.sleep(max(0.0, int(env.fed_at) + 1.05 - time.time()))  # the series ends with the last whole second
    d = dashboard_data(rdb, env.keys, env.config)
    t = d["totals"]
    assert (t["requests"], t["answered"], t["failed"]) == (38, 35, 3)
    assert t["cost"] == pytest.approx(sum(k.cost.values()))
    assert t["baseline_cost"] == pytest.approx(sum(k.baseline_cost.values()))
    assert t["savings"] == pytest.approx(sum(k.baseline_cost.values()) - sum(k.cost.values()))
    tiers = {row["name"]: row for row in d["tiers"]}
    assert tiers["primary"]["items"] == 30 and tiers["secondary"]["calls"] == 5
    assert d["errors"] == {"fallback_exhausted": 2, "budget_exceeded": 1}
    assert d["live"]["latency_s"]["items"] == 38
    assert sum(row["items"] for row in d["series"]) == 38
    page = get(env, "/dashboard")
    assert page.status_code == 200 and "static/dashboard.js" in page.text
    assert "http" not in page.text.replace("http-equiv", "")  # nothing loaded from elsewhere
    assert get(env, "/static/dashboard.js").headers["content-type"].startswith("text/javascript")
    assert get(env, "/static/../monitor/server.py").status_code == 404


# --- alerts -----------------------------------------------------------------------------------
class Hook:
    """A tiny webhook receiver on loopback that keeps what it was sent."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hook.received.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"

    def events(self) -> list[tuple[str, str]]:
        return sorted((m["event"], m["alert"]["id"]) for m in self.received)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_alerts_fire_dedup_resolve_and_post_to_the_webhook(rdb: redis.Redis, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    prefix = f"a{uuid.uuid4().hex[:6]}"
    keys = Keys(prefix)
    hook = Hook()
    config = make_config(prefix, budgets={"tenants": {"acme": {"daily": 0.05}}},
                         alerts={"min_requests": 10, "pending_growth_s": 2.0, "webhook_url": hook.url})
    settings = alert_settings(config, env={})
    t = Telemetry(rdb, keys)
    for i in range(20):  # 0.02 per request, 2.5 s each, 2 of 20 failed (10%)
        t.upstream_call(tier="primary", tenant="acme", outcome="ok", tokens_in=1000, tokens_out=333, cost=0.02,
                        latency_s=2.0, items=1)
        failed = i < 2
        t.item_finished(tenant="acme", tier=None if failed else "primary", outcome="failed" if failed else "answered",
                        cost=0.02, tokens_in=1000, tokens_out=333, queue_wait_s=0.5, model_call_s=2.0,
                        end_to_end_s=2.5, error_code="provider_rejected" if failed else None)
    rdb.hset(keys.circuit("primary"), mapping={"state": "open"})
    day = time.strftime("day:%Y-%m-%d", time.gmtime())
    rdb.hset(keys.budget("tenant:acme", day), mapping={"spent": 45_000_000})  # 90% of 0.05
    now = time.time()
    try:
        first = run_once(rdb, keys, settings, config, now=now)
        expected = {"cost_per_request", "latency", "error_rate", "circuit_open:primary",
                    "budget_warning:tenant:acme:day"}
        assert {a["id"] for a in first.fired} == expected
        assert hook.events() == sorted(("fired", i) for i in expected)

        again = run_once(rdb, keys, settings, config, now=now + 1)
        assert again.fired == [] and again.resolved == []  # deduplicated while active
        assert len(rdb.hgetall(keys.alerts())) == 5
        assert rdb.llen(keys.alert_history()) == 5
        assert len(hook.received) == 5

        path = write_config(tmp_path / "cohort.toml", {"redis": config["redis"]})
        assert cli_main(["alerts", "--json", "--config-file", str(path)]) == 0
        assert {a["id"] for a in json.loads(capsys.readouterr().out)} == expected

        # Everything clears: the circuit closes, spend drops, and the window moves past the traffic.
        rdb.hset(keys.circuit("primary"), mapping={"state": "closed"})
        rdb.hset(keys.budget("tenant:acme", day), mapping={"spent": 1_000_000})
        later = run_once(rdb, keys, settings, config, now=now + settings.window_s + 2)
        assert {a["id"] for a in later.resolved} == expected
        assert rdb.hlen(keys.alerts()) == 0
        assert hook.events() == sorted([("fired", i) for i in expected] + [("resolved", i) for i in expected])
        assert cli_main(["alerts", "--history", "--limit", "3", "--config-file", str(path)]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 3 and all("resolved" in line for line in lines)
    finally:
        hook.close()


def test_budget_exhausted_and_pending_growth(rdb: redis.Redis) -> None:
    prefix = f"p{uuid.uuid4().hex[:6]}"
    keys = Keys(prefix)
    config = make_config(prefix, budgets={"global_monthly": 2.0}, alerts={"pending_growth_s": 2.0})
    settings = alert_settings(config, env={})
    month = time.strftime("month:%Y-%m", time.gmtime())
    rdb.hset(keys.budget("global", month), mapping={"spent": 2_000_000_000})
    now = time.time()
    fired: set[str] = set()
    for step in range(4):  # one more pending item every second
        rdb.xadd(keys.pending_stream(), {"id": f"i{step}"})
        fired |= {a["id"] for a in run_once(rdb, keys, settings, config, now=now + step).fired}
        if step < 2:
            assert "pending_growing" not in fired, step
    assert fired == {"budget_warning:global:month", "budget_exhausted:global:month", "pending_growing"}
    rdb.delete(keys.pending_stream())
    resolved = run_once(rdb, keys, settings, config, now=now + 5).resolved
    assert [a["id"] for a in resolved] == ["pending_growing"]


def test_alerts_endpoint_and_metrics(env: Env, rdb: redis.Redis) -> None:
    settings = alert_settings(env.config, env={})
    rdb.hset(env.keys.circuit("secondary"), mapping={"state": "half_open"})
    rdb.set(env.keys.tier_disabled("long-context"), "1")
    run_once(rdb, env.keys, settings, env.config)
    data = get(env, "/alerts?history=10").json()
    ids = {a["id"] for a in data["active"]}
    assert "circuit_open:secondary" in ids and "tier_disabled:long-context" in ids
    assert {h["id"] for h in data["history"]} >= ids
    s = scrape(get(env, "/metrics").text)
    assert sample(s, "cohort_alerts_active") == len(ids)
    assert sample(s, "cohort_alert_active", alert="tier_disabled:long-context", rule="tier_disabled",
                  severity="critical") == 1


# --- Prometheus rules and the Grafana dashboard name only metrics that exist ------------------
def exposed_names(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names |= {f"{family.name}_total", f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"}
        names |= {s.name for s in family.samples}
    return names


def test_prometheus_rules_and_grafana_dashboard_use_existing_metrics(env: Env) -> None:
    import re

    yaml = pytest.importorskip("yaml")
    names = exposed_names(get(env, "/metrics").text)
    used: set[str] = set()
    rules = yaml.safe_load((OPS / "prometheus" / "alerts.yml").read_text())
    alert_names = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            used |= set(re.findall(r"\bcohort_[a-z0-9_]+", rule["expr"]))
            alert_names.add(rule["alert"])
            assert rule["labels"]["severity"] in ("warning", "critical")
    assert {"CohortCostPerRequestHigh", "CohortLatencyHigh", "CohortErrorRateHigh", "CohortBudgetWarning",
            "CohortBudgetExhausted", "CohortCircuitOpen", "CohortPendingGrowing"} <= alert_names
    prom = yaml.safe_load((OPS / "prometheus" / "prometheus.yml").read_text())
    assert "alerts.yml" in prom["rule_files"][0]
    dashboard = json.loads((OPS / "grafana" / "cohort-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    for expr in exprs:
        used |= set(re.findall(r"\bcohort_[a-z0-9_]+", expr))
    missing = used - names
    assert not missing, missing
    for path in (OPS / "grafana" / "provisioning").rglob("*.yml"):
        assert yaml.safe_load(path.read_text()), path


# --- a real run: figures against counts taken outside Cohort -----------------------------------
# Kept last in this module: run_cohort flushes db 14 before and after the run.
def test_real_run_matches_the_simulator_and_the_client() -> None:
    from producers import PromptResult
    from producers.settings import read_config
    from tests.support.cluster import run_cohort, wait_until

    questions = [f"How do I {verb} my {thing}?" for verb in ("block", "renew", "activate")
                 for thing in ("debit card", "credit card", "savings account", "online login")]
    entries = [{"prompt": q, "tenant": "acme"} for q in questions]
    entries += [{"prompt": questions[0], "tenant": "acme"}] * 3  # exact duplicates: coalesced
    entries += [{"prompt": f"What fee applies to a {x} transfer?", "tenant": "beta"}
                for x in ("domestic", "foreign", "instant", "scheduled")]
    alerts = {"min_requests": 5, "cost_per_request": 0.00001, "window_s": 120, "interval_s": 1.0}
    with run_cohort(db=DB, config={"alerts": alerts}) as cohort:
        started = time.time()
        handles = cohort.client.submit_many(entries)
        results = cohort.client.wait([h.id for h in handles], timeout=90)
        finished = time.time()
        # The truth, counted outside Cohort's telemetry.
        answered = [r for r in results if isinstance(r, PromptResult)]
        n, n_failed = len(entries), len(results) - len(answered)
        coalesced = sum(r.coalesced for r in answered)
        by_tier: dict[str, int] = {}
        for r in answered:
            by_tier[str(r.tier)] = by_tier.get(str(r.tier), 0) + 1
        config = read_config(cohort.config_path)
        tier_of_model = {t["model"]: t["name"] for t in config["tiers"]}
        stats = cohort.sim.stats()
        true_calls = stats["requests"]
        true_in = sum(stats["tokens_in"].values())
        true_out = sum(stats["tokens_out"].values())
        true_cost = sum(price(tier_of_model[m], stats["tokens_in"].get(m, 0), stats["tokens_out"].get(m, 0))
                        for m in set(stats["tokens_in"]) | set(stats["tokens_out"]))
        assert len(answered) == n and coalesced >= 3 and true_calls >= 1

        app = MonitorApp(monitor_settings(config, {}, demo=True, port=0), config, client=cohort.redis)

        def all_recorded() -> dict[Any, float] | None:
            s = scrape(app.handle("/metrics", {})[2].decode())
            items = sum(v for (name, _), v in s.items() if name == "cohort_items_total")
            return s if items == n else None

        s = wait_until(all_recorded, timeout=15, message="telemetry of every item")

        def total(name: str, **match: str) -> float:
            return sum(v for (sname, labels), v in s.items()
                       if sname == name and all(dict(labels).get(k) == x for k, x in match.items()))

        tolerance = 1e-9 * true_calls + 1e-12  # each call's cost is rounded up to a billionth
        assert total("cohort_items_total", outcome="answered") == len(answered)
        assert total("cohort_items_total", outcome="failed") == n_failed == 0
        for tier, count in by_tier.items():
            assert total("cohort_items_total", outcome="answered", tier=tier) == count
        assert total("cohort_items_coalesced_total") == coalesced
        assert total("cohort_upstream_calls_total") == true_calls
        assert total("cohort_tokens_in_total") == true_in
        assert total("cohort_tokens_out_total") == true_out
        assert total("cohort_cost_total") == pytest.approx(true_cost, abs=tolerance)
        assert total("cohort_end_to_end_seconds_count") == n
        assert total("cohort_batched_items_total") >= n - coalesced
        assert total("cohort_baseline_cost_total") > 0

        r = report(cohort.redis, cohort.keys, config, since_s=time.time() - started + 5)
        assert (r["requests"], r["answered"], r["failed"]) == (n, len(answered), 0)
        assert r["calls"] == true_calls
        assert (r["tokens_in"], r["tokens_out"]) == (true_in, true_out)
        assert r["cost_total"] == pytest.approx(true_cost, abs=tolerance)
        assert r["cost_per_request"] == pytest.approx(true_cost / n, abs=tolerance)
        assert r["coalescing_rate"] == pytest.approx(coalesced / n)
        assert {t: row["items"] for t, row in r["tiers"].items() if row["items"]} == by_tier
        assert 0 < r["latency_s"]["p50"] <= r["latency_s"]["p99"] <= finished - started
        beta = report(cohort.redis, cohort.keys, config, since_s=120, tenant="beta")
        assert beta["requests"] == 4

        d = dashboard_data(cohort.redis, cohort.keys, config)
        assert (d["totals"]["requests"], d["totals"]["answered"]) == (n, len(answered))
        assert d["totals"]["cost"] == pytest.approx(true_cost, abs=tolerance)

        if beat_evaluates_alerts(config):  # beat runs cohort.evaluate_alerts: wait for it to fire
            wait_until(lambda: cohort.redis.hexists(cohort.keys.alerts(), "cost_per_request"), timeout=15,
                       message="the beat's alert evaluation")
        else:
            run_once(cohort.redis, cohort.keys, alert_settings(config, env={}), config)
        active = {a["id"]: a for a in AlertStore(cohort.redis, cohort.keys).active()}
        assert active["cost_per_request"]["value"] == pytest.approx(true_cost / n, abs=tolerance)
        assert "error_rate" not in active


def beat_evaluates_alerts(config: dict[str, Any]) -> bool:
    from workers.app import app, celery_config
    from workers.settings import worker_settings

    schedule = celery_config(worker_settings(config, env={}))["beat_schedule"]
    included = "workers.alert_task" in (app.conf.include or ())
    return included and any(e.get("task") == "cohort.evaluate_alerts" for e in schedule.values())
