"""The Celery app of every Cohort role: ``celery -A workers.app ...``.

The app is configured lazily, on first use, from ``load_worker_settings()``: importing this
module reads no environment variable.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from workers.alerting import alert_settings
from workers.settings import WorkerSettings, load_worker_settings

INFERENCE_QUEUE = "inference"
GROUPER_QUEUE = "grouper"
GPU_QUEUE = "gpu"

class CohortCelery(Celery):
    """Celery configured from Cohort's settings when first used.

    ``on_configure`` is a method here, not a signal receiver: Celery's signal dispatch logs and
    swallows a receiver's exception, and a worker with a malformed config must stop, naming the
    bad key, rather than run on Celery's defaults.
    """

    def on_configure(self) -> None:
        self.conf.update(celery_config(load_worker_settings()))


app = CohortCelery("cohort", set_as_current=False,
                   include=["workers.tasks", "workers.submit_task", "workers.alert_task", "compression_jobs.tasks"])


def celery_config(settings: WorkerSettings) -> dict[str, Any]:
    """Celery settings that make delivery at-least-once with exactly one final result.

    - ``task_acks_late`` + ``task_reject_on_worker_lost``: a batch is acknowledged only when it
      ends, so a worker killed mid-batch leaves it to be redelivered; the batch task skips items
      that already have a final result, so a redelivery never pays twice for them.
    - ``visibility_timeout`` above ``task_time_limit``: a slow batch is never redelivered while it runs.
    - ``worker_prefetch_multiplier=1``: a worker holds no more batches than it runs.
    - JSON only: no pickle anywhere.
    """
    url = settings.producer.redis.url
    delivery = settings.delivery
    transport = {"visibility_timeout": delivery.visibility_timeout_s}
    return {
        "broker_url": url,
        "result_backend": url,
        "broker_transport_options": transport,
        "result_backend_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": delivery.task_time_limit_s,
        # The soft limit leaves a batch most of its time and a moment to record what it did.
        "task_soft_time_limit": delivery.task_time_limit_s - max(1, min(10, delivery.task_time_limit_s // 10)),
        "result_expires": settings.producer.result_ttl_s,
        "result_extended": False,
        "result_backend_thread_safe": True,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_default_queue": INFERENCE_QUEUE,
        "task_routes": {
            "cohort.run_batch": {"queue": INFERENCE_QUEUE},
            "cohort.submit": {"queue": INFERENCE_QUEUE},
            "cohort.group": {"queue": GROUPER_QUEUE},
            "cohort.evaluate_alerts": {"queue": GROUPER_QUEUE},
            "cohort.compress.*": {"queue": GPU_QUEUE},
        },
        "beat_schedule": beat_schedule(settings),
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
    }


def beat_schedule(settings: WorkerSettings) -> dict[str, Any]:
    """The grouping tick, and the alert evaluation when alerts are enabled."""
    schedule: dict[str, Any] = {
        "cohort-group": {
            "task": "cohort.group",
            "schedule": settings.grouping.interval_s,
            # A tick not started within a few periods is dropped: the next one does its work.
            "options": {"queue": GROUPER_QUEUE, "expires": max(1.0, 4 * settings.grouping.interval_s)},
        },
    }
    alerts = alert_settings(settings.config)
    if alerts.enabled:
        schedule["cohort-alerts"] = {
            "task": "cohort.evaluate_alerts",
            "schedule": alerts.interval_s,
            "options": {"queue": GROUPER_QUEUE, "expires": 2 * alerts.interval_s},
        }
    return schedule
