"""The ``cohort`` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import importlib
import sys

from producers.errors import CohortError

SUBCOMMAND_MODULES = ("ops.cli_submit", "ops.cli_monitor", "ops.cli_compress")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cohort", description="Cohort: batched, budgeted LLM calls on Celery + Redis")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except CohortError as exc:
        print(f"cohort: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
