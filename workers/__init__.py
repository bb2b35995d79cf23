"""Cohort."""
