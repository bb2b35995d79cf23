"""Tier, routing and budget config parsing: good configs parse, bad keys are named."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import workers.tiers as tiers_pkg
from producers.errors import ConfigError
from producers.settings import read_config
from workers.tiers.config import (
    TierConfig,
    load_secrets,
    parse_budgets,
    parse_routing,
    resolve_keys,
)


def tier(name: str, **over: Any) -> dict[str, Any]:
    base = {"name": name, "provider": "openai", "base_url": "http://127.0.0.1:1/v1", "model": f"m-{name}",
            "api_key_env": "KEY", "price_in_per_1k": 0.01, "price_out_per_1k": 0.03, "context_window": 8192,
            "timeout_s": 30.0, "max_retries": 2}
    return {**base, **over}


def config(**routing: Any) -> dict[str, Any]:
    return {"tiers": [tier("primary"), tier("secondary", price_in_per_1k=0.001, context_window=4096),
                      tier("long", context_window=128000)], "routing": routing}


def test_default_config_file_parses() -> None:
    raw = read_config(None, {})
    routing = parse_routing(raw, {})
    assert [t.name for t in routing.tiers] == ["primary", "secondary", "long-context"]
    assert routing.tier("primary").strength > routing.tier("long-context").strength > routing.tier("secondary").strength
    assert routing.medium_start in routing.names
    assert routing.max_attempts_per_item >= 1
    parse_budgets(raw)


def test_defaults_and_strength_order() -> None:
    routing = parse_routing(config(), {})
    assert [t.strength for t in routing.tiers] == [3, 2, 1]  # first listed is strongest
    assert routing.medium_start == "secondary"  # median strength
    assert routing.tiers[0].rpm is None and routing.tiers[0].tpm is None
    assert routing.tiers[0].auth_header == "Authorization"


def test_integer_prices_become_floats_and_optional_limits_parse() -> None:
    raw = config()
    raw["tiers"][0].update(price_in_per_1k=1, rpm=60, tpm=1000, strength=10)
    t = parse_routing(raw, {}).tiers[0]
    assert t.price_in_per_1k == 1.0 and isinstance(t.price_in_per_1k, float)
    assert (t.rpm, t.tpm, t.strength) == (60, 1000, 10)


@pytest.mark.parametrize(("mutate", "key"), [
    (lambda c: c["tiers"][1].update(price_in_per_1k="cheap"), "tiers[1].price_in_per_1k"),
    (lambda c: c["tiers"][1].update(price_in_per_1k=-1), "tiers[1].price_in_per_1k"),
    (lambda c: c["tiers"][1].update(price_out_per_1k=float("nan")), "tiers[1].price_out_per_1k"),
    (lambda c: c["tiers"][2].pop("context_window"), "tiers[2].context_window"),
    (lambda c: c["tiers"][0].update(provider="cohere"), "tiers[0].provider"),
    (lambda c: c["tiers"][0].update(base_url="ftp://x"), "tiers[0].base_url"),
    (lambda c: c["tiers"][0].update(timeout_s=0), "tiers[0].timeout_s"),
    (lambda c: c["tiers"][0].update(max_retries=True), "tiers[0].max_retries"),
    (lambda c: c["tiers"][0].update(rpm=0), "tiers[0].rpm"),
    (lambda c: c["tiers"][0].update(name="has space"), "tiers[0].name"),
    (lambda c: c["tiers"][0].update(api_key_env="NOT-A-VAR"), "tiers[0].api_key_env"),
    (lambda c: c["tiers"][0].update(colour="red"), "tiers[0].colour"),
    (lambda c: c["tiers"][1].update(name="primary"), "tiers[1].name"),
    (lambda c: c["routing"].update(medium_start="nowhere"), "routing.medium_start"),
    (lambda c: c["routing"].update(max_attempts_per_item=0), "routing.max_attempts_per_item"),
    (lambda c: c["routing"].update(backoff_base_s=5.0, backoff_max_s=1.0), "routing.backoff_max_s"),
    (lambda c: c["routing"].update(circuit_failure_ratio=1.5), "routing.circuit_failure_ratio"),
    (lambda c: c["routing"].update(retries=3), "routing.retries"),
    (lambda c: c.update(tiers=[]), "tiers"),
    (lambda c: c.update(tiers={"name": "x"}), "tiers"),
    (lambda c: c.pop("tiers"), "tiers"),
    (lambda c: c.update(routing=[1]), "routing"),
])
def test_bad_values_name_the_key(mutate: Any, key: str) -> None:
    raw = copy.deepcopy(config())
    mutate(raw)
    with pytest.raises(ConfigError) as info:
        parse_routing(raw, {})
    assert info.value.details["key"] == key
    assert key.split(".")[-1].split("[")[0] in info.value.message


def test_missing_secrets_file_is_a_config_error(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="COHORT_SECRETS_FILE"):
        parse_routing(config(), {"COHORT_SECRETS_FILE": str(tmp_path / "nope")})


def test_keys_come_from_env_then_secrets_file(tmp_path: Any) -> None:
    secrets = tmp_path / "secrets"
    secrets.write_text("# comment\nKEY=from-file\nexport OTHER='quoted'\n")
    raw = config()
    raw["tiers"][1]["api_key_env"] = "OTHER"
    raw["tiers"][2].pop("api_key_env")
    routing = parse_routing(raw, {"COHORT_SECRETS_FILE": str(secrets)})
    keys = resolve_keys(routing, {"COHORT_SECRETS_FILE": str(secrets)})
    assert keys == {"primary": "from-file", "secondary": "quoted", "long": None}
    keys = resolve_keys(routing, {"COHORT_SECRETS_FILE": str(secrets), "KEY": "from-env"})
    assert keys["primary"] == "from-env"
    secrets.write_text("not a pair\n")
    with pytest.raises(ConfigError, match="line 1"):
        load_secrets({"COHORT_SECRETS_FILE": str(secrets)})


def test_tier_config_repr_holds_no_key() -> None:
    routing = parse_routing(config(), {"KEY": "sk-secret-value"})
    assert "sk-secret-value" not in repr(routing)


def test_cost_is_exact_integer_billionths_rounded_up() -> None:
    t = TierConfig(name="t", provider="openai", base_url="http://x/v1", model="m", api_key_env=None,
                   price_in_per_1k=0.0005, price_out_per_1k=0.0015, context_window=4096, timeout_s=1, max_retries=0)
    assert t.cost_nanos(1000, 1000) == 2_000_000
    assert t.cost_nanos(1, 0) == 500  # 0.0005 / 1000 * 1e9
    t2 = TierConfig(name="t", provider="openai", base_url="http://x/v1", model="m", api_key_env=None,
                    price_in_per_1k=1e-9, price_out_per_1k=0, context_window=4096, timeout_s=1, max_retries=0)
    assert t2.cost_nanos(1, 0) == 1  # a fraction of a billionth rounds up, never down to free


def test_budgets_parse_and_wildcard_tenant() -> None:
    budgets = parse_budgets({"budgets": {"global_daily": 10, "tenants": {"acme": {"daily": 1.5},
                                                                          "*": {"monthly": 3}}}})
    assert budgets.global_daily == 10.0 and budgets.global_monthly is None
    assert budgets.tenant("acme").daily == 1.5
    assert budgets.tenant("other").monthly == 3.0
    assert parse_budgets({}).tenant("x").daily is None


@pytest.mark.parametrize(("raw", "key"), [
    ({"budgets": {"global_daily": "lots"}}, "budgets.global_daily"),
    ({"budgets": {"global_daily": -1}}, "budgets.global_daily"),
    ({"budgets": {"global_weekly": 1}}, "budgets.global_weekly"),
    ({"budgets": {"tenants": {"acme": {"daily": float("inf")}}}}, "budgets.tenants.acme.daily"),
    ({"budgets": {"tenants": {"acme": {"hourly": 1}}}}, "budgets.tenants.acme.hourly"),
    ({"budgets": {"tenants": {"a b": {"daily": 1}}}}, "budgets.tenants.a b"),
    ({"budgets": {"tenants": {"acme": 5}}}, "budgets.tenants.acme"),
    ({"budgets": {"tenants": [1]}}, "budgets.tenants"),
])
def test_bad_budgets_name_the_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_budgets(raw)
    assert info.value.details["key"] == key


# TOML can only produce these value shapes: the property test draws from the same space.
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                     st.text(max_size=12))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
_tier_keys = st.sampled_from(sorted({"name", "provider", "base_url", "model", "api_key_env", "price_in_per_1k",
                                     "price_out_per_1k", "context_window", "timeout_s", "max_retries", "rpm",
                                     "tpm", "strength", "junk"}))
_tier = st.dictionaries(_tier_keys, st.one_of(_values, st.sampled_from(["openai", "anthropic", "http://h/v1"])),
                        max_size=14)
_configs = st.fixed_dictionaries({}, optional={
    "tiers": st.one_of(_values, st.lists(st.one_of(_tier, st.builds(lambda t: {**tier("a"), **t}, _tier)),
                                         max_size=3)),
    "routing": st.one_of(_values, st.dictionaries(st.sampled_from(["medium_start", "max_attempts_per_item",
                                                                   "backoff_base_s", "backoff_max_s", "x"]),
                                                  _values, max_size=4)),
    "budgets": st.one_of(_values, st.dictionaries(st.sampled_from(["global_daily", "tenants", "y"]), _values,
                                                  max_size=3)),
})


@settings(max_examples=300, deadline=None)
@given(_configs)
def test_junk_never_crashes_with_anything_but_config_error(raw: dict[str, Any]) -> None:
    for parse in (lambda: parse_routing(raw, {}), lambda: parse_budgets(raw)):
        try:
            parse()
        except ConfigError as exc:
            assert exc.details.get("key"), exc.message


def test_exported_members_are_grouped_and_importable() -> None:
    names = tiers_pkg.__all__
    assert len(names) == len(set(names))
    for name in names:
        assert hasattr(tiers_pkg, name), name
    public = {n for n in dir(tiers_pkg) if not n.startswith("_") and n[0].isupper()}
    assert public <= set(names) | {"annotations"}
