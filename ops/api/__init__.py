"""Cohort's HTTP API: native prompt endpoints, OpenAI-compatible chat completions, probes.

Run it with ``python -m ops.api --host 127.0.0.1 --port 8000`` (``--demo`` for no keys).
"""

from ops.api.app import create_app, create_app_from_env
from ops.api.settings import ApiSettings, api_settings, hash_key, load_api_settings

__all__ = [
    "ApiSettings",
    "api_settings",
    "create_app",
    "create_app_from_env",
    "hash_key",
    "load_api_settings",
]
