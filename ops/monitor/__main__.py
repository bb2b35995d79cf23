"""``python -m ops.monitor [--port 9808] [--demo] [--evaluate-alerts]``: serve metrics and the dashboard."""

from __future__ import annotations

import argparse
import logging
import sys

from ops.monitor.server import MonitorApp, MonitorServer
from ops.monitor.settings import monitor_settings
from producers.errors import ConfigError
from producers.settings import read_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.monitor", description=__doc__)
    parser.add_argument("--config", help="config file (default: COHORT_CONFIG or ops/cohort.toml)")
    parser.add_argument("--host", help="address to bind (default: [monitor] host)")
    parser.add_argument("--port", type=int, help="port to bind, 0 for any free one (default: [monitor] port)")
    parser.add_argument("--demo", action="store_true", default=None,
                        help="allow running without COHORT_MONITOR_USER/PASSWORD (no authentication)")
    parser.add_argument("--evaluate-alerts", action="store_true",
                        help="also evaluate alerts every [alerts] interval_s (where no beat runs them)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = read_config(args.config)
        settings = monitor_settings(config, demo=args.demo, host=args.host, port=args.port)
    except ConfigError as exc:
        print(f"cohort monitor: {exc.message}", file=sys.stderr)
        return 2
    server = MonitorServer(MonitorApp(settings, config), evaluate_alerts=args.evaluate_alerts)
    auth = "basic auth" if settings.auth_required else "NO authentication (demo)"
    print(f"cohort monitor on {server.url}/dashboard  (metrics: {server.url}/metrics, {auth})", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
