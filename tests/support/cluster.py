"""A whole Cohort as real processes for a test: see ``ops.launcher``."""

from ops.launcher import REPO_ROOT, Cohort, run_cohort, wait_until

__all__ = ["REPO_ROOT", "Cohort", "run_cohort", "wait_until"]
