"""The live dashboard in a real headless browser (Debian's chromium) while traffic runs.

A background thread records traffic through ``Telemetry`` at a steady pace and counts what it
recorded; the monitor serves the page; Chromium, driven over the DevTools protocol, loads it
once and the test reads the rendered numbers several times: they must move while traffic runs
and equal the writer's own counts once it stops. A screenshot is saved (``docs/dashboard.png``
when ``COHORT_DASHBOARD_SCREENSHOT`` names it, else a temporary file).

Chromium is not installed by the tests: locally the test skips without ``/usr/bin/chromium``;
in CI (``CI`` set) its absence is a failure.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from ops.monitor.server import MonitorApp, MonitorServer
from ops.monitor.settings import monitor_settings
from producers.keys import Keys
from tests.support.config import default_config, merged
from workers.alerting import alert_settings, run_once
from workers.telemetry import DispatchedBatch, Telemetry

CHROMIUM = "/usr/bin/chromium"
REDIS_HOST = os.environ.get("COHORT_TEST_REDIS", "redis://127.0.0.1:6379")
URL = f"{REDIS_HOST}/14"
PRICES = {"primary": (0.01, 0.03), "secondary": (0.0005, 0.0015), "long-context": (0.003, 0.015)}


def require_chromium() -> None:
    """Skip without Chromium locally; in CI its absence fails the test."""
    if os.path.exists(CHROMIUM):
        return
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing: CI must install Debian's chromium package (ops/install.sh)")
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium)")


class Traffic(threading.Thread):
    """Records a realistic mix through telemetry (~40 items/s) and counts it."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        super().__init__(name="traffic", daemon=True)
        self.telemetry = Telemetry(client, keys, baseline_price_in_per_1k=0.01, baseline_price_out_per_1k=0.03)
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.requests = self.answered = self.failed = 0
        self.cost = 0.0

    def run(self) -> None:
        n = 0
        while not self.stop_event.is_set():
            self.batch(n)
            n += 1
            self.stop_event.wait(0.1)

    def batch(self, n: int) -> None:
        t = self.telemetry
        tier = "primary" if n % 4 else "secondary"
        p_in, p_out = PRICES[tier]
        size = 3
        call_cost = (450 * p_in + 160 * p_out) / 1000
        t.batches_dispatched([DispatchedBatch(size, "cluster", "acme")])
        t.upstream_call(tier=tier, tenant="acme", outcome="ok", tokens_in=450, tokens_out=160, cost=call_cost,
                        latency_s=0.35 + 0.05 * (n % 5), items=size)
        for i in range(size):
            t.item_finished(tenant="acme", tier=tier, outcome="answered", cost=call_cost / size, tokens_in=150,
                            tokens_out=53, queue_wait_s=0.3, model_call_s=0.4, end_to_end_s=0.6 + 0.1 * ((n + i) % 7),
                            coalesced=i == 2, baseline_tokens_in=170, baseline_tokens_out=60)
        failed = n % 10 == 9
        if failed:
            t.retry(tier="primary", reason="provider_unavailable")
            t.item_finished(tenant="beta", tier=None, outcome="failed", cost=0.0, tokens_in=0, tokens_out=0,
                            queue_wait_s=0.2, model_call_s=1.0, end_to_end_s=2.4, error_code="fallback_exhausted")
        else:
            t.item_finished(tenant="beta", tier="secondary", outcome="answered", cost=0.0, tokens_in=0, tokens_out=0,
                            queue_wait_s=0.1, model_call_s=0.0, end_to_end_s=0.15, cached=True, coalesced=True,
                            baseline_tokens_in=120, baseline_tokens_out=50)
        with self.lock:
            self.requests += size + 1
            self.answered += size + (0 if failed else 1)
            self.failed += int(failed)
            self.cost += call_cost

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)


class Browser:
    """Headless Chromium driven over the DevTools protocol (one page)."""

    def __init__(self, profile: str) -> None:
        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-extensions", "--hide-scrollbars", "--mute-audio", f"--user-data-dir={profile}",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "--window-size=1280,900",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.port = self._devtools_port()
        pages = httpx.get(f"http://127.0.0.1:{self.port}/json/list", timeout=10).json()
        page = next(p for p in pages if p.get("type") == "page")
        from websockets.sync.client import connect

        self.ws = connect(page["webSocketDebuggerUrl"], max_size=50_000_000, open_timeout=10)
        self._id = 0

    def _devtools_port(self) -> int:
        assert self.process.stderr is not None
        deadline = time.monotonic() + 30
        lines = []
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line and self.process.poll() is not None:
                break
            lines.append(line)
            match = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if match:
                # Keep draining stderr so Chromium never blocks on a full pipe.
                threading.Thread(target=self.process.stderr.read, daemon=True).start()
                return int(match.group(1))
        raise RuntimeError("chromium did not start:\n" + "".join(lines[-20:]))

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=30))
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


READ = """(() => { try { const raw = (id) => document.getElementById(id).dataset.raw; return JSON.stringify({
  updates: window.cohortUpdates || 0,
  status: document.getElementById('status-text').textContent,
  requests: raw('requests'),
  answered: raw('answered'),
  failed: raw('failed'),
  cost: raw('cost'),
  savings: raw('savings'),
  throughput: raw('throughput'),
  p95: raw('lat-p95'),
  tiers: Array.from(document.querySelectorAll('#tiers tbody tr')).map(r => r.dataset.tier),
  alerts: Array.from(document.querySelectorAll('#alerts li[data-alert]')).map(li => li.dataset.alert),
  text: document.getElementById('requests').textContent
}); } catch (e) { return JSON.stringify({updates: 0, error: String(e)}); } })()"""


@pytest.fixture
def browser() -> Iterator[Browser]:
    require_chromium()
    profile = tempfile.mkdtemp(prefix="cohort-chromium-")
    b = Browser(profile)
    try:
        yield b
    finally:
        b.close()
        shutil.rmtree(profile, ignore_errors=True)


def read(browser: Browser) -> dict[str, Any]:
    return json.loads(browser.evaluate(READ) or '{"updates": 0}')


def wait_for(browser: Browser, check: Any, *, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        state = read(browser)
        if state.get("updates") and check(state):
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"dashboard never reached the expected state: {state}")
        time.sleep(0.2)


def test_dashboard_updates_live_in_chromium(browser: Browser, tmp_path: Path) -> None:
    prefix = f"b{uuid.uuid4().hex[:6]}"
    config = merged(default_config(), {"redis": {"url": URL, "key_prefix": prefix},
                                       "alerts": {"min_requests": 5}})
    client = redis.Redis.from_url(URL)
    keys = Keys(prefix)
    client.set(keys.tier_disabled("long-context"), "1")  # shows an active alert
    server = MonitorServer(MonitorApp(monitor_settings(config, {}, demo=True, port=0), config)).start()
    traffic = Traffic(client, keys)
    try:
        traffic.start()
        browser.send("Page.enable")
        browser.send("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
        browser.send("Page.navigate", url=f"{server.url}/dashboard")
        first = wait_for(browser, lambda s: s["updates"] >= 1 and s["requests"] not in ("", "0"))
        assert first["status"] == "live"
        assert set(first["tiers"]) >= {"primary", "secondary", "long-context"}
        run_once(client, keys, alert_settings(config, env={}), config)
        second = wait_for(browser, lambda s: s["updates"] >= first["updates"] + 2
                          and float(s["requests"]) > float(first["requests"]) and s["alerts"])
        # The numbers move while traffic runs, in one page that was never reloaded.
        assert float(second["cost"]) > float(first["cost"])
        assert float(second["throughput"]) > 0
        assert second["p95"] not in ("", None)
        assert "tier_disabled:long-context" in second["alerts"]
        # Let the charts fill for the screenshot (longer when it is the one the README shows).
        time.sleep(20.0 if os.environ.get("COHORT_DASHBOARD_SCREENSHOT") else 1.0)
        shot = browser.send("Page.captureScreenshot", format="png")
    finally:
        traffic.stop()
    # Once traffic stops the page settles on exactly what the writer recorded.
    final = wait_for(browser, lambda s: s["requests"] and float(s["requests"]) == traffic.requests, timeout=10)
    assert float(final["answered"]) == traffic.answered
    assert float(final["failed"]) == traffic.failed
    assert float(final["cost"]) == pytest.approx(traffic.cost)
    assert final["text"] == f"{traffic.requests:,}"
    assert float(final["savings"]) > 0
    target = Path(os.environ.get("COHORT_DASHBOARD_SCREENSHOT") or tmp_path / "dashboard.png")
    target.write_bytes(base64.b64decode(shot["data"]))
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    server.stop()
    client.close()
