"""``cohort compress``: submit a compression job to the gpu workers and follow its progress.

    cohort compress quantize all-MiniLM-L6-v2 --config int8.json --store var/models --wait
    cohort compress distill all-MiniLM-L6-v2 --config student.json --store var/models --wait
    cohort compress cancel <task id>

The config is validated here before anything is sent; without ``--config`` the method's
default config is used. With ``--wait`` a progress bar follows the task's ``PROGRESS`` states
until it ends, the result (artifact path and metrics) is printed as JSON, and Ctrl-C cancels the
job. Without it the task id is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from compression_jobs.configs import CONFIG_TYPES, config_from_json
from compression_jobs.tasks import TASK_NAMES
from producers.errors import CompressionError

POLL_S = 0.25
"""Seconds between two reads of the task state."""
BAR_WIDTH = 30


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("compress", help="quantize, prune, distill or evaluate a model on the gpu workers",
                                   description="Submit a compression job (Celery task on the gpu queue).")
    methods = parser.add_subparsers(dest="compress_command", required=True)
    for method in sorted(CONFIG_TYPES):
        sub = methods.add_parser(method, help=f"submit a {method} job")
        sub.add_argument("model", help="model path (sentence-transformers / Hugging Face directory, artifact, "
                                       "saved torch module) or all-MiniLM-L6-v2")
        sub.add_argument("--config", help=f"JSON file of the {method} config (default: the method's defaults)")
        sub.add_argument("--store", required=True, help="model store directory the artifact is written into")
        sub.add_argument("--wait", action="store_true", help="show progress until the job ends, print its result")
        sub.add_argument("--timeout", type=float, default=None, help="seconds to wait with --wait (default: no limit)")
        sub.set_defaults(handler=run_submit, method=method)
    cancel = methods.add_parser("cancel", help="cancel a queued or running compression job")
    cancel.add_argument("task_id")
    cancel.set_defaults(handler=run_cancel)


def load_config(method: str, path: str | None) -> dict[str, Any]:
    """The config JSON for ``method``: the file's, validated, or the defaults."""
    if path is None:
        return CONFIG_TYPES[method]().to_json()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CompressionError(f"cannot read config file {path}: {exc}") from None
    return config_from_json(text, method=method).to_json()


def _model_arg(model: str) -> str:
    local = Path(model).expanduser()
    return str(local.resolve()) if local.exists() else model


def _app() -> Any:
    from workers.app import GPU_QUEUE, app

    return app, GPU_QUEUE


def run_submit(args: argparse.Namespace) -> int:
    config = load_config(args.method, args.config)
    app, queue = _app()
    store = str(Path(args.store).expanduser().resolve())
    result = app.send_task(TASK_NAMES[args.method], args=[_model_arg(args.model), config, store], queue=queue)
    if not args.wait:
        print(json.dumps({"task_id": result.id, "method": args.method}))
        return 0
    try:
        outcome = follow(result, timeout=args.timeout)
    except KeyboardInterrupt:
        cancel(app, result.id)
        print(f"\ncancelled {args.method} job {result.id}", file=sys.stderr)
        return 130
    print(json.dumps({"task_id": result.id, **outcome}, indent=2, sort_keys=True))
    return 0


def render(meta: dict[str, Any]) -> str:
    """One progress line: a bar, the percentage, the stage and the step."""
    total = max(1, int(meta.get("total") or 1))
    step = min(total, max(0, int(meta.get("step") or 0)))
    filled = int(BAR_WIDTH * step / total)
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    return f"[{bar}] {100 * step / total:5.1f}% {meta.get('stage', '')} ({step}/{total})"


def follow(result: Any, *, timeout: float | None = None, out: TextIO | None = None) -> dict[str, Any]:
    """Draw the task's progress until it ends; return its result.

    Raises:
        CompressionError: the job failed (its message), or ``timeout`` passed.
    """
    out = out or sys.stderr
    tty = out.isatty()
    deadline = None if timeout is None else time.monotonic() + timeout
    last = ""
    while True:
        state = result.state
        if state == "PROGRESS" and isinstance(result.info, dict):
            line = render(result.info)
        elif state in ("PENDING", "RECEIVED"):
            line = "waiting for a gpu worker..."
        else:
            line = state.lower()
        if line != last:
            if tty:
                out.write("\r\033[K" + line)
            elif line.split("(")[0] != last.split("(")[0]:
                out.write(line + "\n")  # a log, not a bar: one line per stage
            out.flush()
            last = line
        if result.ready():
            break
        if deadline is not None and time.monotonic() > deadline:
            raise CompressionError(f"job {result.id} still {state.lower()} after {timeout} s (it keeps running)")
        time.sleep(POLL_S)
    if tty:
        out.write("\n")
    if result.failed():
        error = result.result
        message = getattr(error, "message", None) or str(error)
        raise CompressionError(f"job {result.id} failed: {message}")
    value = result.result
    return value if isinstance(value, dict) else {"result": value}


def cancel(app: Any, task_id: str, *, settle_s: float = 10.0) -> str:
    """Abort a running job (it stops at its next progress report) and revoke a queued one.

    A progress report written just after the abort can overwrite it, so the abort is repeated
    while the job still reports progress, for at most ``settle_s`` seconds. Returns the last state.
    """
    from celery.contrib.abortable import ABORTED, AbortableAsyncResult

    result = AbortableAsyncResult(task_id, app=app)
    if result.state in ("PENDING", "RECEIVED"):
        app.control.revoke(task_id)  # still queued: the worker drops it when it comes
    result.abort()
    deadline = time.monotonic() + settle_s
    state = result.state
    while state in ("PROGRESS", "STARTED") and time.monotonic() < deadline:
        result.abort()
        time.sleep(POLL_S)
        state = result.state
    return ABORTED if state == ABORTED else state


def run_cancel(args: argparse.Namespace) -> int:
    app, _ = _app()
    state = cancel(app, args.task_id)
    print(json.dumps({"task_id": args.task_id, "cancel": "requested", "state": state}))
    return 0
