"""Cohort's monitor: Prometheus metrics, the live dashboard, alerts and the savings report.

Everything is read from Redis, where every role records through ``workers.telemetry``.
"""

from ops.monitor.dashboard import dashboard_data
from ops.monitor.metrics import CohortCollector, make_registry
from ops.monitor.report import build_report, parse_duration, render_table, report
from ops.monitor.server import MonitorApp, MonitorServer
from ops.monitor.settings import MonitorSettings, monitor_settings

__all__ = [
    # metrics
    "CohortCollector",
    "make_registry",
    # report
    "build_report",
    "parse_duration",
    "render_table",
    "report",
    # dashboard and server
    "MonitorApp",
    "MonitorServer",
    "MonitorSettings",
    "dashboard_data",
    "monitor_settings",
]
