"""Config parsing: defaults, overrides from the environment, clear errors naming the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from producers.errors import ConfigError
from producers.settings import load_producer_settings, producer_settings, read_config
from workers.settings import worker_settings


def test_packaged_config_loads_with_documented_defaults() -> None:
    config = read_config(None, env={})
    settings = worker_settings(config, env={})
    assert settings.grouping.interval_s == 0.25
    assert settings.grouping.similarity_threshold == 0.85
    assert settings.grouping.max_batch_size == 16
    assert settings.grouping.max_wait_s == 0.5
    assert settings.producer.max_prompt_chars == 32000


def test_environment_overrides_redis(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[redis]\nurl = "redis://127.0.0.1:6379/0"\n')
    settings = load_producer_settings(path, env={"COHORT_REDIS_URL": "rediss://:secret@example:6380/2",
                                                 "COHORT_KEY_PREFIX": "prod"})
    assert settings.redis.url.startswith("rediss://")
    assert settings.redis.key_prefix == "prod"


@pytest.mark.parametrize(("text", "needle"), [
    ("[grouping]\nmax_batch_size = 0\n", "grouping.max_batch_size must be at least 1"),
    ("[grouping]\nmax_wait_s = 'soon'\n", "grouping.max_wait_s must be float"),
    ("[grouping]\nmax_batchsize = 4\n", "unknown key(s) in [grouping]: grouping.max_batchsize"),
    ("[redis]\nurl = 'http://x'\n", "redis.url must start with"),
    ("[limits]\nmax_prompt_chars = true\n", "limits.max_prompt_chars must be int, got a boolean"),
    ("grouping = 3\n", "[grouping] must be a table"),
    ('[grouping]\nencoder_quantize = "fp8"\n', "grouping.encoder_quantize must be one of auto, int8, none"),
    ("[[[ not toml", "not valid TOML"),
])
def test_malformed_config_names_the_problem(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        worker_settings(read_config(path, env={}), env={})
    assert needle in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        read_config(tmp_path / "none.toml", env={})


scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5)
tables = st.dictionaries(st.sampled_from(["redis", "limits", "grouping", "delivery", "tenants", "x"]),
                         st.dictionaries(st.text(max_size=12), scalars | st.dictionaries(st.text(max_size=5), scalars),
                                         max_size=4) | scalars, max_size=4)


# Generating these tables is slow on a busy machine: that is not what this test checks.
@hypothesis_settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(tables)
def test_arbitrary_config_tables_parse_or_raise_config_error(config: dict) -> None:
    try:
        worker_settings(config, env={})
        producer_settings(config, env={})
    except ConfigError as exc:
        assert str(exc)
