"""The ``cohort report`` and ``cohort alerts`` commands.

    cohort report [--since 15m] [--tenant acme] [--json]
    cohort alerts [--history] [--limit 50] [--json]
    cohort alerts --evaluate            # run one evaluation now and print what changed

``ops.cli`` calls ``register(subparsers)``; each command sets ``handler(args) -> int``. The config
file comes from ``args.config`` when the main parser defines ``--config``, else ``COHORT_CONFIG``.
``python -m ops.cli_monitor report ...`` runs the same commands on their own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import redis

from ops.monitor.report import parse_duration, render_table, report
from producers.errors import ConfigError
from producers.settings import read_config, redis_settings
from workers.alerting import AlertStore, alert_settings, run_once


def register(subparsers: Any) -> None:
    """Add ``report`` and ``alerts`` to the main CLI's subparsers."""
    p = subparsers.add_parser("report", help="what Cohort did, cost and saved over a time window",
                              description="Requests, latency, throughput, cost, cache and coalescing rates, "
                                          "tier utilization, errors, and the cost of one call per prompt on "
                                          "the primary tier, from the telemetry event stream.")
    p.add_argument("--since", default="15m", help="window length ending now: 90s, 15m, 2h, 1d (default 15m)")
    p.add_argument("--tenant", help="only this tenant's items and calls")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _config_option(p)
    p.set_defaults(handler=cmd_report)

    a = subparsers.add_parser("alerts", help="active alerts and their history",
                              description="Active alerts (deduplicated while active), or the history of "
                                          "fired and resolved transitions.")
    a.add_argument("--history", action="store_true", help="show fired/resolved transitions, newest first")
    a.add_argument("--limit", type=int, default=50, help="history entries to show (default 50)")
    a.add_argument("--evaluate", action="store_true", help="evaluate the rules once now, then list")
    a.add_argument("--json", action="store_true", help="print JSON")
    _config_option(a)
    a.set_defaults(handler=cmd_alerts)


def _config_option(parser: argparse.ArgumentParser) -> None:
    # The main parser may define --config already; a subcommand option of the same name would
    # overwrite it with None, hence the different dest.
    parser.add_argument("--config-file", dest="monitor_config", default=None,
                        help="config file (default: the main --config, COHORT_CONFIG or ops/cohort.toml)")


def _context(args: argparse.Namespace) -> tuple[dict[str, Any], redis.Redis, Any]:
    config = read_config(getattr(args, "monitor_config", None) or getattr(args, "config", None))
    settings = redis_settings(config)
    return config, redis.Redis.from_url(settings.url, socket_timeout=10), settings.keys


def cmd_report(args: argparse.Namespace) -> int:
    """Print the report; 2 on a bad argument or config, 1 if Redis cannot be read."""
    try:
        since = parse_duration(args.since)
        config, client, keys = _context(args)
        data = report(client, keys, config, since_s=since, tenant=args.tenant)
    except (ValueError, ConfigError) as exc:
        print(f"cohort report: {exc}", file=sys.stderr)
        return 2
    except redis.RedisError as exc:
        print(f"cohort report: cannot read Redis: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2) if args.json else render_table(data))
    return 0


def cmd_alerts(args: argparse.Namespace) -> int:
    """List active alerts or their history; 2 on a bad config, 1 if Redis cannot be read."""
    try:
        config, client, keys = _context(args)
        settings = alert_settings(config)
        if args.evaluate:
            evaluation = run_once(client, keys, settings, config)
            if evaluation.skipped:
                print(f"evaluation skipped: {evaluation.skipped}", file=sys.stderr)
        store = AlertStore(client, keys, history_max=settings.history_max)
        rows = store.history(max(1, args.limit)) if args.history else store.active()
    except ConfigError as exc:
        print(f"cohort alerts: {exc}", file=sys.stderr)
        return 2
    except redis.RedisError as exc:
        print(f"cohort alerts: cannot read Redis: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no alert history" if args.history else "no active alerts")
        return 0
    for alert in rows:
        if args.history:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(alert.get("at", 0)))
            print(f"{when}  {alert.get('event', ''):8}  {alert.get('severity', ''):8}  {alert.get('id')}: "
                  f"{alert.get('message', '')}")
        else:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(alert.get("fired_at", 0)))
            print(f"{alert.get('severity', ''):8}  {alert.get('id')}  since {since}: {alert.get('message', '')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cohort")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
