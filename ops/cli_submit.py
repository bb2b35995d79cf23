"""``cohort submit``: read prompts (lines or JSONL, file or stdin), print answers as JSONL."""

from __future__ import annotations

import argparse
import io
import json
import sys
from dataclasses import asdict
from typing import Any, TextIO

from producers import CohortClient, CohortError, InvalidPrompt, PromptResult


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("submit", help="submit prompts and print their answers as JSONL",
                                   description="Each input line is a prompt, or with --jsonl a JSON object with "
                                               "'prompt' and optional submit fields (tenant, complexity, params, "
                                               "context, system, metadata, deadline, coalesce, max_cost).")
    parser.add_argument("file", nargs="?", default="-", help="input file ('-' or absent: stdin)")
    parser.add_argument("--jsonl", action="store_true", help="input lines are JSON objects")
    parser.add_argument("--tenant", default="default")
    parser.add_argument("--complexity", choices=["simple", "medium", "complex"])
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for all answers")
    parser.add_argument("--no-wait", action="store_true", help="print ids only, do not wait")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # Undecodable bytes become lone surrogates, which the schema refuses as invalid UTF-8 for that
    # line alone: one bad line never stops the others.
    stream: TextIO = (io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="surrogateescape")
                      if args.file == "-" else open(args.file, encoding="utf-8", errors="surrogateescape"))  # noqa: SIM115
    with stream:
        entries = list(read_entries(stream, jsonl=args.jsonl))
    client = CohortClient.from_env()
    common: dict[str, Any] = {"tenant": args.tenant}
    if args.complexity:
        common["complexity"] = args.complexity
    if args.max_tokens is not None:
        common["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        common["temperature"] = args.temperature
    slots: list[dict[str, Any]] = []
    valid: list[tuple[int, Any]] = []
    for line_number, entry in entries:
        if isinstance(entry, CohortError):
            slots.append({"line": line_number, "error": entry.to_dict()})
            continue
        try:
            handle = client.submit_many([entry], **common)[0]
        except CohortError as exc:
            slots.append({"line": line_number, "error": exc.to_dict()})
            continue
        slots.append({"line": line_number, "id": handle.id})
        valid.append((len(slots) - 1, handle.id))
    if not args.no_wait and valid:
        outcomes = client.wait([item_id for _, item_id in valid], timeout=args.timeout, raise_on_timeout=False)
        for (slot, _), outcome in zip(valid, outcomes, strict=True):
            slots[slot].update(_outcome(outcome))
    for slot in slots:
        print(json.dumps(slot))
    client.close()
    return 0 if all("error" not in s for s in slots) else 1


def read_entries(stream: TextIO, *, jsonl: bool) -> Any:
    """``(line number, prompt or submit mapping)`` per non-empty line; bad lines yield an error."""
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        if not jsonl:
            yield number, line.rstrip("\n")
            continue
        try:
            entry = json.loads(line)
        except ValueError as exc:
            yield number, InvalidPrompt(f"line {number} is not valid JSON: {exc.msg}", line=number)
            continue
        if not isinstance(entry, dict):
            yield number, InvalidPrompt(f"line {number} must be a JSON object", line=number)
            continue
        yield number, entry


def _outcome(outcome: PromptResult | CohortError) -> dict[str, Any]:
    if isinstance(outcome, PromptResult):
        data = asdict(outcome)
        data.pop("id", None)
        return data
    return {"error": outcome.to_dict()}
