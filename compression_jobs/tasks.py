"""Celery tasks of the compression jobs, routed to the ``gpu`` queue (``cohort.compress.*``).

Start a worker for them with ``celery -A workers.app worker -Q gpu -c 1``. Every task takes
JSON only: ``(model_path, config, store)`` with ``config`` the job config's JSON form, and
returns ``{"artifact", "name", "method", "metrics"}``. Progress is the task state ``PROGRESS``
with ``{"step", "total", "stage", "method"}`` (Flower shows it; ``cohort compress`` draws it).

Cancel with ``AbortableAsyncResult(task_id, app=app).abort()`` (``cohort compress cancel``): the
job stops at its next progress report and leaves no artifact; a job still queued is revoked.

Inference workers import this module too (``include`` of the app): it imports no torch; the
job code is imported inside the task bodies.
"""

from __future__ import annotations

from typing import Any

from celery.contrib.abortable import ABORTED, AbortableTask

from compression_jobs.configs import CONFIG_TYPES
from producers.errors import CompressionError
from workers.app import app

TASK_NAMES = {method: f"cohort.compress.{method}" for method in CONFIG_TYPES}
"""Celery task name of each job method."""

SOFT_TIME_LIMIT_S = 6 * 3600
"""A job running longer than this is stopped (and leaves no artifact)."""

_OPTIONS: dict[str, Any] = {
    "bind": True,
    "base": AbortableTask,
    # Acknowledge on start: a job runs longer than the broker's visibility timeout, and a lost
    # job must fail rather than run twice.
    "acks_late": False,
    "soft_time_limit": SOFT_TIME_LIMIT_S,
    "time_limit": SOFT_TIME_LIMIT_S + 120,
    "track_started": True,
}


class JobCancelled(CompressionError):
    """The job was aborted by a client."""


def _progress(task: AbortableTask, method: str):
    def report(step: int, total: int, stage: str) -> None:
        request_id = getattr(task.request, "id", None)
        if not request_id:
            return  # called eagerly outside a worker
        if task.is_aborted():
            raise JobCancelled(f"{method} job {request_id} was cancelled during {stage!r}", stage=stage)
        task.update_state(state="PROGRESS", meta={"step": int(step), "total": int(total), "stage": stage,
                                                  "method": method})

    return report


def _run(task: AbortableTask, method: str, model_path: Any, config: Any, store: Any) -> dict[str, Any]:
    if not isinstance(config, dict):
        raise CompressionError(f"{method}: config must be a JSON object, got {type(config).__name__}")
    from compression_jobs.jobs import run_job  # imports torch: only in the worker that runs jobs

    try:
        return run_job(method, model_path, config, store, progress=_progress(task, method))
    except CompressionError:
        raise
    except MemoryError:
        raise CompressionError(f"{method} job ran out of memory") from None
    except Exception as exc:
        if type(exc).__name__ == "SoftTimeLimitExceeded":
            raise CompressionError(f"{method} job ran past its time limit ({SOFT_TIME_LIMIT_S} s)") from None
        # Anything else is a failed job; keep its cause readable for JSON clients.
        raise CompressionError(f"{method} job failed: {type(exc).__name__}: {exc}") from None


@app.task(name=TASK_NAMES["quantize"], **_OPTIONS)
def quantize(self: AbortableTask, model_path: str, config: dict[str, Any], store: str) -> dict[str, Any]:
    """Quantize a model (``QuantizeConfig``) into an artifact of ``store``."""
    return _run(self, "quantize", model_path, config, store)


@app.task(name=TASK_NAMES["prune"], **_OPTIONS)
def prune(self: AbortableTask, model_path: str, config: dict[str, Any], store: str) -> dict[str, Any]:
    """Prune a model (``PruneConfig``) into an artifact of ``store``."""
    return _run(self, "prune", model_path, config, store)


@app.task(name=TASK_NAMES["distill"], **_OPTIONS)
def distill(self: AbortableTask, model_path: str, config: dict[str, Any], store: str) -> dict[str, Any]:
    """Distill a student from the teacher at ``model_path`` (``DistillConfig``)."""
    return _run(self, "distill", model_path, config, store)


@app.task(name=TASK_NAMES["evaluate"], **_OPTIONS)
def evaluate(self: AbortableTask, model_path: str, config: dict[str, Any], store: str) -> dict[str, Any]:
    """Evaluate a model (``EvaluateConfig``); the report is written as an artifact of ``store``."""
    return _run(self, "evaluate", model_path, config, store)


__all__ = ["ABORTED", "SOFT_TIME_LIMIT_S", "TASK_NAMES", "JobCancelled", "distill", "evaluate", "prune",
           "quantize"]
