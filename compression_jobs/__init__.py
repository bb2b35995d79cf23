"""Cohort's compression jobs: quantize, prune, distill and evaluate models as Celery tasks.

Importing the package imports no torch: the configs, the registry and the store are pure
Python; the methods (``quantize``, ``prune``, ``distill``, ``evaluate``) load with the first
``apply`` or job run.
"""

from compression_jobs.configs import (
    CONFIG_TYPES,
    CONFIG_VERSION,
    DistillConfig,
    EvaluateConfig,
    JobConfig,
    PruneConfig,
    QuantizeConfig,
    config_from_json,
)
from compression_jobs.registry import JobContext, Outcome, apply, register
from compression_jobs.store import list_artifacts, read_manifest, remove_stale, write_artifact

__all__ = [
    # configs
    "CONFIG_TYPES",
    "CONFIG_VERSION",
    "DistillConfig",
    "EvaluateConfig",
    "JobConfig",
    "PruneConfig",
    "QuantizeConfig",
    "config_from_json",
    # applying configs
    "JobContext",
    "Outcome",
    "apply",
    "register",
    # the model store
    "list_artifacts",
    "read_manifest",
    "remove_stale",
    "write_artifact",
]
