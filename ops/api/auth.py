"""API keys mapped to tenants.

A key arrives as ``Authorization: Bearer <key>`` (what every OpenAI SDK sends) or ``X-API-Key: <key>``.
Only sha256 digests of keys are kept (from ``[api.keys]``, or hashed at start-up from the variables
named by ``[tenants.NAME] api_keys_env``); the presented key is hashed and compared with every
stored digest through ``hmac.compare_digest``. Keys are never logged, stored, or put in task
arguments or metric labels.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from ops.api.errors import unauthorized
from ops.api.settings import hash_key

MAX_KEY_CHARS = 512


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant, and whether a key proved it."""

    tenant: str
    authenticated: bool


class KeyStore:
    """Resolves a presented key to its tenant."""

    def __init__(self, digests: Mapping[str, str], *, require_auth: bool, anonymous_tenant: str) -> None:
        self._entries = [(bytes.fromhex(digest), tenant) for digest, tenant in digests.items()]
        self.require_auth = require_auth
        self.anonymous_tenant = anonymous_tenant

    def tenant_for(self, key: str) -> str | None:
        """The tenant of ``key``, or ``None`` if it is unknown. Compares every digest, found or not."""
        presented = bytes.fromhex(hash_key(key))
        found: str | None = None
        for digest, tenant in self._entries:
            if hmac.compare_digest(presented, digest):
                found = tenant
        return found

    def authenticate(self, authorization: str | None, api_key: str | None) -> Principal:
        """The caller of a request, from its ``Authorization`` and ``X-API-Key`` headers.

        Raises:
            ApiError: 401 when a key is missing (and required), malformed or unknown.
        """
        key = _presented_key(authorization, api_key)
        if key is None:
            if self.require_auth:
                raise unauthorized("Missing API key. Send it as 'Authorization: Bearer <key>'.")
            return Principal(self.anonymous_tenant, authenticated=False)
        tenant = self.tenant_for(key) if len(key) <= MAX_KEY_CHARS else None
        if tenant is None:
            raise unauthorized("Incorrect API key provided.")
        return Principal(tenant, authenticated=True)


def _presented_key(authorization: str | None, api_key: str | None) -> str | None:
    if api_key:
        return api_key.strip() or None
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise unauthorized("The Authorization header must be 'Bearer <key>'.")
    return value.strip()
