"""The monitor's HTTP server: one process that reads Cohort's figures from Redis.

    python -m ops.monitor --port 9808            # COHORT_MONITOR_USER / COHORT_MONITOR_PASSWORD set
    python -m ops.monitor --demo                 # no auth (loopback demo)

Endpoints (all GET; basic auth when credentials are set, ``/healthz`` always open):

=====================  ================================================================
``/metrics``           Prometheus exposition (``metrics_auth = false`` leaves it open)
``/dashboard``         the live dashboard page (static files from ``ops/static``, no CDN)
``/dashboard/data``    the JSON the page polls every ``refresh_ms``
``/alerts``            ``{"active": [...], "history": [...]}`` (``?history=N``, default 50)
``/queues``            queue depths: pending stream, open pool, Celery queues, in-flight batches
``/report``            the savings report as JSON (``?since=15m&tenant=acme``)
``/healthz``           ``{"ok": true, "redis": true}``
=====================  ================================================================

The standard library's threading HTTP server is enough here: a scrape every few seconds and a
few dashboards polling once a second. Redis is the only state.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import threading
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ops.monitor.dashboard import dashboard_data
from ops.monitor.metrics import make_registry
from ops.monitor.report import parse_duration, report
from ops.monitor.settings import MonitorSettings
from workers.alerting import AlertStore, queue_depths, run_once

log = logging.getLogger("cohort.monitor")

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
STATIC_FILES = {
    "dashboard.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'",
}


class MonitorApp:
    """Route handling, independent of the HTTP server (so tests can call it directly)."""

    def __init__(self, settings: MonitorSettings, config: Mapping[str, Any],
                 client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.config = config
        self.redis = client or redis.Redis.from_url(settings.redis.url, socket_timeout=5,
                                                    socket_connect_timeout=5)
        self.keys = settings.redis.keys
        self.registry = make_registry(self.redis, self.keys, config, settings.alerts)
        self._routes: dict[str, Callable[[dict[str, list[str]]], tuple[int, str, bytes]]] = {
            "/metrics": self._metrics,
            "/dashboard": lambda q: self._static("dashboard.html"),
            "/dashboard/data": self._dashboard_data,
            "/alerts": self._alerts,
            "/queues": self._queues,
            "/report": self._report,
            "/healthz": self._health,
        }

    def authorized(self, path: str, header: str | None) -> bool:
        """Whether a request may see ``path`` with this ``Authorization`` header."""
        if not self.settings.auth_required or path == "/healthz":
            return True
        if path == "/metrics" and not self.settings.metrics_auth:
            return True
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        ok_user = hmac.compare_digest(user.encode(), (self.settings.user or "").encode())
        ok_password = hmac.compare_digest(password.encode(), (self.settings.password or "").encode())
        return ok_user and ok_password

    def handle(self, path: str, query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        """(status, content type, body) of a GET."""
        if path in ("/", "/dashboard/"):
            return HTTPStatus.FOUND, "/dashboard", b""
        if path.startswith("/static/"):
            return self._static(path.removeprefix("/static/"))
        route = self._routes.get(path)
        if route is None:
            return _json(HTTPStatus.NOT_FOUND, {"error": "not found", "path": path})
        try:
            return route(query)
        except ValueError as exc:
            return _json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        except redis.RedisError as exc:
            log.warning("%s: cannot read Redis: %s", path, exc)
            return _json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "redis unavailable"})

    # --- routes -------------------------------------------------------------------------------
    def _metrics(self, query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        return HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(self.registry)

    def _static(self, name: str) -> tuple[int, str, bytes]:
        if name not in STATIC_FILES:
            return _json(HTTPStatus.NOT_FOUND, {"error": "not found"})
        return HTTPStatus.OK, STATIC_FILES[name], (STATIC_DIR / name).read_bytes()

    def _dashboard_data(self, query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        data = dashboard_data(self.redis, self.keys, self.config, refresh_ms=self.settings.refresh_ms,
                              flower_url=self.settings.flower_url)
        return _json(HTTPStatus.OK, data)

    def _alerts(self, query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        limit = _int(query, "history", 50, maximum=10_000)
        store = AlertStore(self.redis, self.keys)
        return _json(HTTPStatus.OK, {"active": store.active(), "history": store.history(limit)})

    def _queues(self, query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        return _json(HTTPStatus.OK, queue_depths(self.redis, self.keys))

    def _report(self, query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        since = parse_duration(query.get("since", ["15m"])[0])
        tenant = query.get("tenant", [None])[0] or None
        return _json(HTTPStatus.OK, report(self.redis, self.keys, self.config, since_s=since, tenant=tenant))

    def _health(self, query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        try:
            up = bool(self.redis.ping())
        except redis.RedisError:
            up = False
        return _json(HTTPStatus.OK if up else HTTPStatus.SERVICE_UNAVAILABLE, {"ok": up, "redis": up})


def _int(query: dict[str, list[str]], name: str, default: int, *, maximum: int) -> int:
    if name not in query:
        return default
    try:
        value = int(query[name][0])
    except ValueError:
        raise ValueError(f"{name} must be an integer") from None
    if not 0 <= value <= maximum:
        raise ValueError(f"{name} must be between 0 and {maximum}")
    return value


def _json(status: int, data: Any) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(data, separators=(",", ":"), default=str).encode()


def _handler(app: MonitorApp) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "cohort-monitor"
        sys_version = ""

        def do_GET(self) -> None:  # noqa: N802 - the http.server protocol
            parts = urlsplit(self.path)
            if not app.authorized(parts.path, self.headers.get("Authorization")):
                body = b'{"error":"authentication required"}'
                self.send_response(HTTPStatus.UNAUTHORIZED)
                self.send_header("WWW-Authenticate", 'Basic realm="cohort", charset="UTF-8"')
                self._send_body("application/json", body)
                return
            status, content_type, body = app.handle(parts.path, parse_qs(parts.query))
            self.send_response(status)
            if status == HTTPStatus.FOUND:
                self.send_header("Location", content_type)
                self._send_body("text/plain", b"")
                return
            self._send_body(content_type, body)

        def do_HEAD(self) -> None:  # noqa: N802
            self.do_GET()

        def _send_body(self, content_type: str, body: bytes) -> None:
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in SECURITY_HEADERS.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug("%s %s", self.address_string(), format % args)

    return Handler


class MonitorServer:
    """The HTTP server plus, optionally, an alert evaluation loop (for deployments without beat).

    Use ``start()`` / ``stop()`` (tests, the demo) or ``serve_forever()``.
    """

    def __init__(self, app: MonitorApp, *, evaluate_alerts: bool = False) -> None:
        self.app = app
        self.httpd = ThreadingHTTPServer((app.settings.host, app.settings.port), _handler(app))
        self.httpd.daemon_threads = True
        self._evaluate = evaluate_alerts
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.app.settings.host}:{self.port}"

    def _alert_loop(self) -> None:
        settings = self.app.settings.alerts
        while not self._stop.wait(settings.interval_s):
            try:
                run_once(self.app.redis, self.app.keys, settings, self.app.config)
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("alert evaluation failed")

    def start(self) -> MonitorServer:
        serve = threading.Thread(target=self.httpd.serve_forever, name="cohort-monitor", daemon=True)
        self._threads.append(serve)
        if self._evaluate and self.app.settings.alerts.enabled:
            self._threads.append(threading.Thread(target=self._alert_loop, name="cohort-alerts", daemon=True))
        for thread in self._threads:
            thread.start()
        return self

    def serve_forever(self) -> None:
        self.start()
        try:
            while not self._stop.wait(3600):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def stop(self) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
