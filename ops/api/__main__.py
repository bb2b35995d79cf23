"""``python -m ops.api [--host H] [--port P] [--config PATH] [--demo]``: serve the API with uvicorn.

``--demo`` turns key checks off (keyless requests act as ``[api] anonymous_tenant``); it is meant for
the loopback demo only. Host and port default to ``[api] host`` / ``port``.
"""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from ops.api.app import create_app
from ops.api.settings import load_api_settings
from producers.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.api", description="Cohort's HTTP API")
    parser.add_argument("--host", help="address to bind (default [api] host)")
    parser.add_argument("--port", type=int, help="port to bind (default [api] port)")
    parser.add_argument("--config", help="config file (default $COHORT_CONFIG, then ops/cohort.toml)")
    parser.add_argument("--demo", action="store_true", help="no API keys required (demo only)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--no-access-log", action="store_true", help="do not log each request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_api_settings(args.config, require_auth=False if args.demo else None)
    except ConfigError as exc:
        print(f"cohort api: {exc}", file=sys.stderr)
        return 2
    if not settings.require_auth:
        logging.getLogger("cohort.api").warning("API keys are not required: demo mode, keyless requests act "
                                                "as tenant %s", settings.anonymous_tenant)
    uvicorn.run(create_app(settings), host=args.host or settings.host,
                port=settings.port if args.port is None else args.port,
                log_level=args.log_level, access_log=not args.no_access_log, proxy_headers=False,
                server_header=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
