"""Compression methods on tiny models built here (no download): what each method does to a model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compression_jobs import store
from compression_jobs.configs import DistillConfig, EvaluateConfig, PruneConfig, QuantizeConfig
from compression_jobs.jobs import run_job
from compression_jobs.models import HF, TORCH, LoadedModel, load_model
from compression_jobs.registry import apply
from producers.errors import CompressionError
from tests.support.compression import blobs, tiny_bert, tiny_encoder_dir, tiny_mlp
from workers.encoder_loading import load_encoder, read_manifest, sha256_file, verify_files

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _mlp_model(sizes=(8, 16, 4)) -> LoadedModel:
    return LoadedModel(TORCH, tiny_mlp(list(sizes)), "memory")


def _types(module: torch.nn.Module) -> dict[str, str]:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return {n: "DynamicQuantizedLinear" if isinstance(m, DynamicLinear) else type(m).__name__
            for n, m in module.named_modules() if n}


# --- quantize ----------------------------------------------------------------------------------
def test_dynamic_int8_replaces_linears_and_honours_keep_float(tmp_path: Path) -> None:
    torch.save(tiny_mlp([8, 16, 16, 4]), tmp_path / "mlp.pt")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(32, 8)).astype("float32"))
    cfg = QuantizeConfig(keep_float=("4",), calibration=(str(tmp_path / "x.npy"),))
    result = run_job("quantize", str(tmp_path / "mlp.pt"), cfg.to_json(), str(tmp_path / "store"))
    loaded = load_model(result["artifact"])
    kinds = _types(loaded.module)
    assert kinds["0"] == kinds["2"] == "DynamicQuantizedLinear"
    assert kinds["4"] == "Linear"
    assert result["metrics"]["kept_float"] == ["4"]
    assert result["metrics"]["check"]["cosine_mean"] > 0.99


def test_bert_default_keeps_the_first_ffn_output_in_float() -> None:
    model = LoadedModel(HF, tiny_bert(), "memory")
    outcome = apply(model, QuantizeConfig(check_limit=0))
    assert outcome.recipe["keep_float"] == ["encoder.layer.0.output.dense"]
    from workers.encoder_loading import apply_recipe

    body = apply_recipe(model.clone().module, outcome.recipe)
    kinds = _types(body)
    assert kinds["encoder.layer.0.output.dense"] == "Linear"
    assert kinds["encoder.layer.1.output.dense"] == "DynamicQuantizedLinear"
    assert kinds["encoder.layer.0.attention.self.query"] == "DynamicQuantizedLinear"


def test_keep_float_pattern_matching_nothing_is_an_error() -> None:
    with pytest.raises(CompressionError, match="matches no Linear"):
        apply(_mlp_model(), QuantizeConfig(keep_float=("encoder.*",), check_limit=0))


def test_static_int8_is_calibrated_and_close_to_float(tmp_path: Path) -> None:
    model = tiny_mlp([8, 32, 4])
    torch.save(model, tmp_path / "mlp.pt")
    x = np.random.default_rng(1).normal(size=(64, 8)).astype("float32")
    np.save(tmp_path / "calib.npy", x)
    cfg = QuantizeConfig(kind="static_int8", calibration=(str(tmp_path / "calib.npy"),))
    result = run_job("quantize", str(tmp_path / "mlp.pt"), cfg.to_json(), str(tmp_path / "store"))
    artifact = Path(result["artifact"])
    ranges = json.loads((artifact / "quant_ranges.json").read_text())
    assert set(ranges) == {"0", "2"}
    loaded = load_model(str(artifact))
    assert "Quantize" in _types(loaded.module).values()
    with torch.inference_mode():
        out, ref = loaded.module(torch.as_tensor(x)), model(torch.as_tensor(x))
    assert torch.nn.functional.cosine_similarity(out, ref).mean() > 0.98


def test_nan_in_calibration_data_is_a_clear_error(tmp_path: Path) -> None:
    torch.save(tiny_mlp([8, 16, 4]), tmp_path / "mlp.pt")
    x = np.ones((16, 8), dtype="float32")
    x[3, 2] = np.nan
    np.save(tmp_path / "calib.npy", x)
    cfg = QuantizeConfig(kind="static_int8", calibration=(str(tmp_path / "calib.npy"),))
    with pytest.raises(CompressionError, match="NaN"):
        run_job("quantize", str(tmp_path / "mlp.pt"), cfg.to_json(), str(tmp_path / "store"))
    assert store.list_artifacts(tmp_path / "store") == []


# --- prune -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["l1_unstructured", "global_l1_unstructured"])
def test_unstructured_pruning_reaches_the_target_sparsity_permanently(kind: str) -> None:
    model = _mlp_model((32, 64, 64, 8))
    outcome = apply(model, PruneConfig(kind=kind, amount=0.6))
    linears = [m for m in model.module.modules() if isinstance(m, torch.nn.Linear)]
    total = sum(m.weight.numel() for m in linears)
    zeros = sum(int((m.weight == 0).sum()) for m in linears)
    assert zeros / total == pytest.approx(0.6, abs=0.01)
    if kind == "l1_unstructured":
        for m in linears:
            assert float((m.weight == 0).float().mean()) == pytest.approx(0.6, abs=0.02)
    assert outcome.metrics["sparsity_pruned_layers"] == pytest.approx(0.6, abs=0.01)
    assert outcome.metrics["shapes_changed"] is False and "no speed-up" in outcome.metrics["speed_note"]
    for m in linears:  # masks removed: plain parameters, no hooks
        assert not hasattr(m, "weight_orig") and not m._forward_pre_hooks


def test_head_and_ffn_pruning_shrink_matrices_and_the_model_still_runs() -> None:
    model = LoadedModel(HF, tiny_bert(), "memory")
    ids = torch.randint(1000, 2000, (2, 7))
    apply(model, PruneConfig(kind="heads", amount=0.5))
    attn = model.module.encoder.layer[0].attention
    assert attn.self.query.weight.shape == (16, 32)
    assert attn.output.dense.weight.shape == (32, 16)
    outcome = apply(model, PruneConfig(kind="ffn", amount=0.25))
    layer = model.module.encoder.layer[1]
    assert layer.intermediate.dense.weight.shape == (48, 32)
    assert layer.output.dense.weight.shape == (32, 48)
    assert outcome.metrics["parameters_after"] < outcome.metrics["parameters_before"]
    with torch.inference_mode():
        out = model.module(input_ids=ids).last_hidden_state
    assert out.shape == (2, 7, 32) and torch.isfinite(out).all()


def test_head_pruned_encoder_artifact_reloads_with_its_structure(tmp_path: Path) -> None:
    encoder = tiny_encoder_dir(tmp_path / "tiny")
    result = run_job("prune", str(encoder), PruneConfig(kind="heads", amount=0.25).to_json(),
                     str(tmp_path / "store"))
    manifest = read_manifest(result["artifact"])
    assert manifest["model"]["structure"]["heads"] == {"encoder.layer.0": 3, "encoder.layer.1": 3}
    reloaded = load_encoder(result["artifact"])
    assert reloaded[0].model.encoder.layer[1].attention.self.key.weight.shape == (24, 32)
    vectors = reloaded.encode(["a card payment", "my card has not arrived"], convert_to_numpy=True)
    assert vectors.shape == (2, 32) and np.isfinite(vectors).all()


def test_structured_pruning_needs_a_bert_like_model() -> None:
    with pytest.raises(CompressionError, match="BERT-like"):
        apply(_mlp_model(), PruneConfig(kind="heads", amount=0.5))


# --- distill -----------------------------------------------------------------------------------
def test_classifier_distillation_improves_the_student(tmp_path: Path) -> None:
    x, y = blobs(1200, 16, 5, seed=3, noise=2.0)
    np.savez(tmp_path / "train.npz", x=x, y=y)
    teacher = tiny_mlp([16, 64, 5], seed=1)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(teacher(xt), yt)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save(teacher.eval(), tmp_path / "teacher.pt")
    cfg = DistillConfig(kind="classifier", data=str(tmp_path / "train.npz"), student_hidden=(8,), epochs=15,
                        lr=1e-2, temperature=2.0, alpha=0.7, batch_size=64)
    result = run_job("distill", str(tmp_path / "teacher.pt"), cfg.to_json(), str(tmp_path / "store"))
    metrics = result["metrics"]
    student = load_model(result["artifact"]).module
    _, held = np.split(np.random.default_rng(0).permutation(len(x)), [len(x) - 240])
    untrained = tiny_mlp([16, 8, 5], seed=0)
    with torch.inference_mode():
        before = float((untrained(xt[held]).argmax(1) == yt[held]).float().mean())
    assert metrics["held_out_rows"] == 240
    assert metrics["accuracy_student"] > before + 0.3
    assert metrics["accuracy_student"] >= metrics["accuracy_teacher"] - 0.05
    assert metrics["parameters_student"] < metrics["parameters_teacher"]
    assert isinstance(student, torch.nn.Sequential)


def test_embedding_distillation_builds_a_smaller_encoder(tmp_path: Path) -> None:
    teacher = tiny_encoder_dir(tmp_path / "teacher", num_hidden_layers=3)
    (tmp_path / "sentences.txt").write_text("\n".join(f"sentence number {i} about cards" for i in range(700)))
    cfg = DistillConfig(num_layers=2, layer_selection="uniform", ffn_fraction=0.5, epochs=1, batch_size=32,
                        sources=(str(tmp_path / "sentences.txt"),), max_sentences=200, lr=1e-3, device="cpu")
    result = run_job("distill", str(teacher), cfg.to_json(), str(tmp_path / "store"))
    assert result["metrics"]["layers_kept"] == [0, 2]
    assert result["metrics"]["parameters_student"] < result["metrics"]["parameters_teacher"]
    student = load_encoder(result["artifact"])
    assert len(student[0].model.encoder.layer) == 2
    assert student[0].model.encoder.layer[1].intermediate.dense.weight.shape == (32, 32)
    assert student.encode(["hello"]).shape == (1, 32)


# --- evaluate ----------------------------------------------------------------------------------
def test_evaluate_reports_size_speed_and_quality_against_the_parent(tmp_path: Path) -> None:
    x, y = blobs(200, 8, 3)
    np.savez(tmp_path / "eval.npz", x=x, y=y)
    torch.save(tiny_mlp([8, 32, 3]), tmp_path / "mlp.pt")
    quantized = run_job("quantize", str(tmp_path / "mlp.pt"), QuantizeConfig(check_limit=0).to_json(),
                        str(tmp_path / "store"))
    report = run_job("evaluate", quantized["artifact"],
                     EvaluateConfig(data=str(tmp_path / "eval.npz"), repeats=2, stsb=False).to_json(),
                     str(tmp_path / "store"))["metrics"]
    assert report["model"]["recipe"] == "dynamic_int8" and report["reference"]["recipe"] == "float32"
    for side in ("model", "reference"):
        assert {"parameters", "size_on_disk_bytes", "per_second", "latency_ms", "accuracy"} <= set(report[side])
    assert report["throughput_ratio"] > 0
    assert report["agreement"]["argmax_agreement"] > 0.9


# --- bad input and the store ---------------------------------------------------------------------
def test_bad_inputs_fail_with_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CompressionError, match="does not exist"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "corrupt.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(CompressionError, match="cannot read"):
        load_model(str(tmp_path / "corrupt.pt"))
    torch.save(tiny_mlp([4, 2]).state_dict(), tmp_path / "state.pt")
    with pytest.raises(CompressionError, match="not a torch module"):
        load_model(str(tmp_path / "state.pt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CompressionError, match="not a model directory"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(CompressionError, match="not found"):
        load_encoder(str(tmp_path / "nowhere"))
    with pytest.raises(CompressionError, match="not an encoder"):
        load_encoder(str(tmp_path / "empty"))
    with pytest.raises(CompressionError, match="amount"):
        run_job("prune", str(tmp_path / "state.pt"), {"method": "prune", "version": 1, "amount": 2},
                str(tmp_path / "store"))


def test_a_failure_while_writing_leaves_nothing_in_the_store(tmp_path: Path) -> None:
    def populate(folder: Path) -> None:
        (folder / "weights.bin").write_bytes(b"x" * 1000)
        raise KeyboardInterrupt  # a cancellation mid-write, not only an Exception

    with pytest.raises(KeyboardInterrupt):
        store.write_artifact(tmp_path / "store", name="quantize-x", populate=populate, manifest={"job": "quantize"})
    assert list((tmp_path / "store").iterdir()) == []


def test_a_failing_job_after_saving_the_model_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    torch.save(tiny_mlp([4, 8, 2]), tmp_path / "mlp.pt")

    def broken(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(store, "_hash_and_sync", broken)
    with pytest.raises(OSError, match="disk full"):
        run_job("prune", str(tmp_path / "mlp.pt"), PruneConfig().to_json(), str(tmp_path / "store"))
    assert list((tmp_path / "store").iterdir()) == []


def test_manifest_lists_every_file_with_its_hash_and_detects_corruption(tmp_path: Path) -> None:
    torch.save(tiny_mlp([4, 8, 2]), tmp_path / "mlp.pt")
    result = run_job("prune", str(tmp_path / "mlp.pt"), PruneConfig(amount=0.5).to_json(), str(tmp_path / "store"))
    artifact = Path(result["artifact"])
    manifest = read_manifest(artifact)
    assert manifest["job"] == "prune" and manifest["config"]["amount"] == 0.5
    assert manifest["parent"]["path"] == str((tmp_path / "mlp.pt").resolve())
    assert manifest["files"] == {"model/model.pt": sha256_file(artifact / "model" / "model.pt")}
    verify_files(artifact, manifest)
    (artifact / "model" / "model.pt").write_bytes(b"changed")
    with pytest.raises(CompressionError, match="corrupt"):
        load_model(str(artifact))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["fp16", "bf16"])
def test_half_precision_cast_runs_on_the_gpu(tmp_path: Path, kind: str) -> None:
    encoder = tiny_encoder_dir(tmp_path / "tiny")
    (tmp_path / "s.txt").write_text("a card payment\nmy card has not arrived\n")
    result = run_job("quantize", str(encoder), QuantizeConfig(kind=kind, calibration=(str(tmp_path / "s.txt"),))
                     .to_json(), str(tmp_path / "store"))
    assert result["metrics"]["check"]["cosine_mean"] > 0.99
    model = load_encoder(result["artifact"], device="cuda")
    assert next(model.parameters()).dtype == (torch.float16 if kind == "fp16" else torch.bfloat16)
