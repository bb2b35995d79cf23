"""Compression configs: validation names the bad field; JSON round-trips; the package stays light."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import compression_jobs
from compression_jobs.configs import (
    CONFIG_TYPES,
    DATASET_NAMES,
    DistillConfig,
    EvaluateConfig,
    PruneConfig,
    QuantizeConfig,
    config_from_json,
)
from producers.errors import CompressionError
from tests.support.compression import REPO_ROOT


def test_exported_members_are_sorted_and_importable() -> None:
    names = compression_jobs.__all__
    assert len(names) == len(set(names))
    for name in names:
        assert hasattr(compression_jobs, name), name


def test_importing_the_package_and_tasks_loads_no_torch() -> None:
    code = ("import sys, compression_jobs, compression_jobs.tasks, workers.encoder_loading, ops.cli_compress; "
            "heavy = [m for m in ('torch', 'sentence_transformers', 'transformers') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_defaults_are_valid_and_versioned() -> None:
    for cls in CONFIG_TYPES.values():
        cfg = cls()
        assert cfg.version == 1
        assert cfg.to_json()["method"] == cls.method


@pytest.mark.parametrize(
    ("factory", "field"),
    [
        (lambda: QuantizeConfig(kind="int4"), "kind"),
        (lambda: QuantizeConfig(kind="static_int8"), "calibration"),
        (lambda: QuantizeConfig(kind="fp16", keep_float=("x",)), "keep_float"),
        (lambda: QuantizeConfig(engine="tpu"), "engine"),
        (lambda: QuantizeConfig(per_channel="yes"), "per_channel"),
        (lambda: QuantizeConfig(calibration=("stsb_dev",)), "calibration"),
        (lambda: QuantizeConfig(calibration=("no_such_set",)), "calibration"),
        (lambda: QuantizeConfig(keep_float=("",)), "keep_float"),
        (lambda: QuantizeConfig(calibration_limit=0), "calibration_limit"),
        (lambda: PruneConfig(amount=1.0), "amount"),
        (lambda: PruneConfig(amount=0), "amount"),
        (lambda: PruneConfig(amount=float("nan")), "amount"),
        (lambda: PruneConfig(kind="heads", include=("encoder.*",)), "include"),
        (lambda: DistillConfig(epochs=0), "epochs"),
        (lambda: DistillConfig(alpha=1.5), "alpha"),
        (lambda: DistillConfig(temperature=0), "temperature"),
        (lambda: DistillConfig(sources=("stsb_dev",)), "sources"),
        (lambda: DistillConfig(kind="classifier"), "data"),
        (lambda: DistillConfig(student_hidden=(0,)), "student_hidden"),
        (lambda: DistillConfig(device="tpu"), "device"),
        (lambda: EvaluateConfig(repeats=0), "repeats"),
        (lambda: EvaluateConfig(batch_size=True), "batch_size"),
        (lambda: QuantizeConfig(version=2), "version"),
    ],
)
def test_bad_values_raise_naming_the_field(factory, field: str) -> None:
    with pytest.raises(CompressionError) as info:
        factory()
    assert field in str(info.value)
    assert info.value.details["field"] == field


def test_from_json_rejects_unknown_keys_other_methods_and_missing_version() -> None:
    with pytest.raises(CompressionError, match="keep_floats"):
        QuantizeConfig.from_json({"method": "quantize", "version": 1, "keep_floats": []})
    with pytest.raises(CompressionError, match="method"):
        QuantizeConfig.from_json({"method": "prune", "version": 1})
    with pytest.raises(CompressionError, match="version"):
        QuantizeConfig.from_json({"method": "quantize"})
    with pytest.raises(CompressionError, match="not valid JSON"):
        QuantizeConfig.from_json("{nope")
    with pytest.raises(CompressionError, match="unknown compression method"):
        config_from_json({"method": "sparsify", "version": 1})
    with pytest.raises(CompressionError, match="not 'prune'"):
        config_from_json({"method": "quantize", "version": 1}, method="prune")


def test_lists_become_tuples_and_configs_are_frozen() -> None:
    cfg = QuantizeConfig.from_json({"method": "quantize", "version": 1, "keep_float": ["a.*"]})
    assert cfg.keep_float == ("a.*",)
    with pytest.raises(AttributeError):
        cfg.kind = "fp16"  # type: ignore[misc]
    assert hash(cfg) == hash(QuantizeConfig(keep_float=("a.*",)))


_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._*?", min_size=1, max_size=20).filter(
    lambda s: s.strip() != "")
_sources = st.lists(st.sampled_from(sorted(DATASET_NAMES - {"stsb_dev"})) | st.just("/data/x.txt"),
                    max_size=3).map(tuple)
_unit = st.floats(min_value=0.001, max_value=0.999, allow_nan=False)

_quantize = st.builds(
    QuantizeConfig,
    kind=st.sampled_from(["dynamic_int8", "static_int8"]),
    keep_float=st.none() | st.lists(_names, max_size=3).map(tuple),
    per_channel=st.booleans(),
    reduce_range=st.none() | st.booleans(),
    engine=st.none() | st.sampled_from(["x86", "fbgemm", "onednn", "qnnpack"]),
    calibration=_sources.filter(bool),
    calibration_limit=st.integers(1, 10_000),
)
_prune = st.builds(PruneConfig, kind=st.sampled_from(["l1_unstructured", "global_l1_unstructured"]),
                   amount=_unit, include=st.lists(_names, max_size=2).map(tuple),
                   exclude=st.lists(_names, max_size=2).map(tuple)) | st.builds(
    PruneConfig, kind=st.sampled_from(["heads", "ffn"]), amount=_unit)
_distill = st.builds(
    DistillConfig, kind=st.just("embedding"), epochs=st.integers(1, 10), batch_size=st.integers(1, 512),
    lr=st.floats(1e-6, 0.5), alpha=st.floats(0, 1), temperature=st.floats(0.1, 20), num_layers=st.integers(1, 12),
    layer_selection=st.sampled_from(["first", "uniform"]), sources=_sources.filter(bool),
    student_hidden=st.lists(st.integers(1, 512), max_size=3).map(tuple), seed=st.integers(0, 2**31),
) | st.builds(DistillConfig, kind=st.just("classifier"), data=st.just("/data/train.npz"),
              holdout_fraction=st.floats(0, 0.9))
_evaluate = st.builds(EvaluateConfig, reference=st.none() | st.just("/models/parent"),
                      sentences=_sources, limit=st.integers(1, 5000), repeats=st.integers(1, 9),
                      stsb=st.booleans(), threads=st.none() | st.integers(1, 8))


@settings(max_examples=60, deadline=None)
@given(st.one_of(_quantize, _prune, _distill, _evaluate))
def test_json_round_trip(cfg) -> None:
    text = json.dumps(cfg.to_json())
    again = config_from_json(json.loads(text))
    assert again == cfg
    assert type(again).from_json(text) == cfg
    assert again.to_json() == cfg.to_json()


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(["kind", "amount", "include", "exclude", "version", "bogus"]),
                       st.none() | st.integers(-3, 3) | st.floats(allow_nan=True) | st.text(max_size=5)
                       | st.lists(st.text(max_size=3), max_size=2)))
def test_arbitrary_json_either_builds_or_raises_compression_error(values) -> None:
    try:
        cfg = PruneConfig.from_json({"method": "prune", **values})
    except CompressionError as exc:
        assert exc.message
    else:
        assert 0 < cfg.amount < 1


def test_cli_validates_the_config_file_before_submitting(tmp_path) -> None:
    from ops.cli_compress import load_config, render

    assert load_config("quantize", None) == QuantizeConfig().to_json()
    good = tmp_path / "int8.json"
    good.write_text(json.dumps({"method": "quantize", "version": 1, "keep_float": ["encoder.layer.0.*"]}))
    assert load_config("quantize", str(good))["keep_float"] == ["encoder.layer.0.*"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"method": "quantize", "version": 1, "kind": "int2"}))
    with pytest.raises(CompressionError, match="QuantizeConfig.kind"):
        load_config("quantize", str(bad))
    with pytest.raises(CompressionError, match="for method 'quantize', not 'prune'"):
        load_config("prune", str(good))
    line = render({"step": 15, "total": 60, "stage": "training epoch 1/3"})
    assert line.startswith("[" + "#" * 7 + ".") and "25.0%" in line and "(15/60)" in line
