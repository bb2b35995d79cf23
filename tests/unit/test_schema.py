"""The message schema: every bad input is refused with an error naming the problem."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from producers.errors import InvalidPrompt
from producers.schema import ModelParams, PromptItem, build_item, normalize_text


def test_a_valid_item_round_trips_through_json() -> None:
    item = build_item("Hello there", tenant="acme", params={"max_tokens": 64, "temperature": 0.2},
                      complexity="simple", context="Doc", metadata={"ticket": 7}, deadline=30, max_cost=0.5,
                      now=1000.0)
    again = PromptItem.from_json(item.to_json())
    assert again == item
    assert again.deadline == 1030.0
    assert item.partition.startswith("acme/")


@pytest.mark.parametrize(("prompt", "fields", "needle"), [
    ("", {}, "empty"),
    ("   \n\t", {}, "whitespace"),
    ("x" * 32001, {}, "above the maximum of 32000"),
    (b"\xff\xfe bad", {}, "not valid UTF-8"),
    (42, {}, "must be a string"),
    ("ok", {"tenant": ""}, "tenant"),
    ("ok", {"tenant": "a/b"}, "tenant"),
    ("ok", {"params": {"max_tokens": -1}}, "max_tokens must be between"),
    ("ok", {"params": {"max_tokens": 10**9}}, "max_tokens must be between"),
    ("ok", {"params": {"max_tokens": "10"}}, "max_tokens must be an integer"),
    ("ok", {"params": {"temperature": math.nan}}, "temperature"),
    ("ok", {"params": {"bogus": 1}}, "unknown model parameter"),
    ("ok", {"complexity": "hard"}, "complexity"),
    ("ok", {"metadata": {"x": object()}}, "metadata"),
    ("ok", {"metadata": "nope"}, "metadata"),
    ("ok", {"deadline": -5}, "deadline"),
    ("ok", {"max_cost": 0}, "max_cost"),
    ("ok", {"coalesce": "yes"}, "coalesce"),
    ("bad \x00 nul", {}, "NUL"),
])
def test_bad_input_is_refused_with_a_clear_error(prompt: object, fields: dict, needle: str) -> None:
    with pytest.raises(InvalidPrompt) as info:
        build_item(prompt, **fields)
    assert needle in str(info.value)


def test_params_partition_differs_when_params_differ() -> None:
    assert ModelParams(max_tokens=10).partition_key() != ModelParams(max_tokens=11).partition_key()
    assert ModelParams().partition_key() == ModelParams.from_dict({}).partition_key()
    # Every field takes part in the key (to_dict lists them by hand).
    assert set(ModelParams().to_dict()) == {f.name for f in dataclasses.fields(ModelParams)}
    params = ModelParams(max_tokens=7, temperature=0.5, top_p=0.9, stop=("x",), model="primary")
    assert ModelParams.from_dict(params.to_dict()) == params


def test_normalization() -> None:
    assert normalize_text("  Hello   WORLD?! ") == "hello world"


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                           max_leaves=8)


@given(prompt=json_values, tenant=json_values, params=json_values, complexity=json_values,
       metadata=json_values, deadline=json_values)
def test_arbitrary_submissions_either_build_or_raise_invalid_prompt(prompt, tenant, params, complexity,
                                                                     metadata, deadline) -> None:
    try:
        item = build_item(prompt, tenant=tenant, params=params, complexity=complexity, metadata=metadata,
                          deadline=deadline)
    except InvalidPrompt as exc:
        assert str(exc)
        return
    assert PromptItem.from_json(item.to_json()) == item


@given(st.binary(max_size=200))
def test_stored_garbage_never_decodes_silently(raw: bytes) -> None:
    try:
        item = PromptItem.from_json(raw)
    except InvalidPrompt:
        return
    assert json.loads(raw)["version"] == 1 and item.prompt
