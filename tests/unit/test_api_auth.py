"""API keys: hashing, where they come from, how they are checked. No Redis needed."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import pytest

from ops.api.auth import KeyStore
from ops.api.errors import ApiError
from ops.api.settings import api_settings, hash_key
from producers.errors import ConfigError

RAW = "ck-live-0123456789abcdef"


def settings(api: dict[str, Any] | None = None, tenants: dict[str, Any] | None = None,
             env: dict[str, str] | None = None, **kwargs: Any) -> Any:
    config: dict[str, Any] = {"api": api if api is not None else {"keys": {hash_key(RAW): "acme"}}}
    if tenants is not None:
        config["tenants"] = tenants
    return api_settings(config, env or {}, **kwargs)


def test_hash_key_is_sha256_hex() -> None:
    assert hash_key(RAW) == hashlib.sha256(RAW.encode()).hexdigest()


def test_config_digests_and_env_keys_map_to_tenants() -> None:
    s = settings(api={"keys": {hash_key(RAW): "acme"}},
                 tenants={"acme": {}, "beta": {"api_keys_env": "BETA_KEYS", "rate_limit_rpm": 5}},
                 env={"BETA_KEYS": "ck-beta-one-0123456789, ck-beta-two-0123456789,,"})
    assert s.key_digests == {hash_key(RAW): "acme", hash_key("ck-beta-one-0123456789"): "beta",
                             hash_key("ck-beta-two-0123456789"): "beta"}
    assert s.rate_limit_for("beta") == 5 and s.rate_limit_for("acme") == 600
    # Only digests are kept: no raw key anywhere in the settings.
    assert "ck-beta-one" not in repr(s) and RAW not in repr(s)


@pytest.mark.parametrize(("api", "tenants", "env", "key"), [
    ({"keys": {"not-a-digest": "acme"}}, None, {}, "api.keys"),
    ({"keys": {hash_key(RAW).upper(): "acme"}}, None, {}, "api.keys"),
    ({"keys": {hash_key(RAW): "ghost"}}, {"acme": {}}, {}, "api.keys"),
    ({"keys": {hash_key(RAW): "acme"}}, {"acme": {}, "beta": {"api_keys_env": "B"}}, {"B": RAW},
     "tenants.beta.api_keys_env"),
    ({}, {"acme": {"api_keys_env": "A"}}, {"A": "tiny-key"}, "tenants.acme.api_keys_env"),
    ({"keys": {}}, None, {}, "api.keys"),
    ({"keys": {hash_key(RAW): "acme"}, "rate_limit_rpm": -1}, None, {}, "api.rate_limit_rpm"),
    ({"keys": {hash_key(RAW): "acme"}, "requireauth": False}, None, {}, "api.requireauth"),
    ({"keys": {hash_key(RAW): "acme"}, "anonymous_tenant": "a/b"}, None, {}, "api.anonymous_tenant"),
])
def test_bad_key_config_names_the_key(api: dict[str, Any], tenants: dict[str, Any] | None, env: dict[str, str],
                                      key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings(api=api, tenants=tenants, env=env)
    assert caught.value.details["key"] == key
    assert RAW not in str(caught.value) and "tiny-key" not in str(caught.value)


def test_no_keys_is_allowed_only_without_auth(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ConfigError, match="no API key"):
        settings(api={})
    assert settings(api={}, require_auth=False).require_auth is False
    caplog.set_level(logging.WARNING)
    s = settings(api={}, tenants={"acme": {"api_keys_env": "UNSET_VAR"}, "default": {}}, require_auth=False)
    assert s.key_digests == {}
    assert "UNSET_VAR" in caplog.text
    with pytest.raises(ConfigError, match="anonymous_tenant"):
        settings(api={}, tenants={"acme": {}}, require_auth=False)


def test_keystore_resolves_keys_and_refuses_others() -> None:
    store = KeyStore({hash_key(RAW): "acme", hash_key("ck-beta-0123456789abcd"): "beta"}, require_auth=True,
                     anonymous_tenant="default")
    assert store.tenant_for(RAW) == "acme"
    assert store.tenant_for("ck-beta-0123456789abcd") == "beta"
    assert store.tenant_for(RAW + "x") is None
    assert store.authenticate(f"Bearer {RAW}", None).tenant == "acme"
    assert store.authenticate(f"bearer   {RAW} ", None).tenant == "acme"
    assert store.authenticate(None, RAW).authenticated is True
    for authorization, header in ((None, None), ("Bearer ", None), ("Basic abc", None), ("Bearer nope", None),
                                  (None, "nope"), (f"Bearer {'x' * 5000}", None)):
        with pytest.raises(ApiError) as caught:
            store.authenticate(authorization, header)
        assert caught.value.status == 401
        assert RAW not in caught.value.message


def test_keystore_without_auth_falls_back_to_the_anonymous_tenant() -> None:
    store = KeyStore({hash_key(RAW): "acme"}, require_auth=False, anonymous_tenant="default")
    assert store.authenticate(None, None).tenant == "default"
    assert store.authenticate(None, None).authenticated is False
    with pytest.raises(ApiError):
        store.authenticate("Bearer wrong-key", None)
