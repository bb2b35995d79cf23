"""The alternatives Cohort is measured against, as real Celery apps, and the harness that measures them.

- ``ops.baselines.per_prompt``: one Celery task per prompt, each one HTTP call (what a team writes first).
- ``ops.baselines.batched``: celery-batches with fixed-size batches (Cohort's ``max_batch_size`` and
  ``max_wait_s``), each batch packed into one call with Cohort's packed format.
- ``ops.baselines.launch``: starting their workers on this machine and submitting prompts to them.
- ``ops.baselines.measure``: submitting a workload to any of the systems, timing every answer,
  and totalling calls, tokens and cost from the provider simulator's own counters.

Both baselines call one tier of the Cohort config (``COHORT_BASELINE_TIER``, default the first),
so that they pay the same simulator prices as Cohort. Workers::

    COHORT_CONFIG=... COHORT_BASELINE_REDIS_URL=redis://127.0.0.1:6379/7 \\
        celery -A ops.baselines.per_prompt worker -Q baseline -P threads -c 16
"""

from ops.baselines.launch import BaselineCluster, BaselineKind, run_baseline
from ops.baselines.settings import BaselineSettings, load_baseline_settings

__all__ = [
    # processes
    "BaselineCluster",
    "BaselineKind",
    "run_baseline",
    # settings
    "BaselineSettings",
    "load_baseline_settings",
]
