"""Evaluation: size, parameters, latency, throughput and quality against a reference, one report.

The model and its reference are timed in the same process, in alternating rounds (medians of
``repeats``), so that their ratio is not skewed by what else the machine is doing.
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compression_jobs import data
from compression_jobs.configs import EvaluateConfig
from compression_jobs.forward import agreement, forward, model_inputs
from compression_jobs.models import HF, ST, TORCH, LoadedModel, load_model, model_size_bytes, parameter_count
from compression_jobs.registry import JobContext, Outcome, register
from producers.errors import CompressionError
from workers.encoder_loading import PACKAGED_ALIASES


def serialized_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's state as ``torch.save`` writes it (int8 weights count as int8)."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.tell()


def measure_throughput(models: Mapping[str, LoadedModel], inputs: Any, *, batch_size: int, repeats: int,
                       device: str = "cpu") -> dict[str, dict[str, float]]:
    """Inputs per second of each model (median of ``repeats`` alternating rounds) and one-input latency."""
    times: dict[str, list[float]] = {name: [] for name in models}
    latency: dict[str, list[float]] = {name: [] for name in models}
    single = inputs[:1]
    for model in models.values():  # warm-up: first calls allocate and pack
        forward(model, inputs[: min(len(inputs), batch_size)], batch_size=batch_size, device=device)
    for _ in range(repeats):
        for name, model in models.items():
            started = time.perf_counter()
            forward(model, inputs, batch_size=batch_size, device=device)
            times[name].append(time.perf_counter() - started)
            for _ in range(5):
                started = time.perf_counter()
                forward(model, single, batch_size=1, device=device)
                latency[name].append(time.perf_counter() - started)
    return {name: {"per_second": round(len(inputs) / statistics.median(times[name]), 2),
                   "latency_ms": round(1000 * statistics.median(latency[name]), 3)} for name in models}


def stsb_spearman(model: LoadedModel, *, batch_size: int = 64, device: str = "cpu") -> float:
    """Spearman correlation of the encoder's cosine with the STS-B dev scores."""
    from scipy.stats import spearmanr

    pairs = data.stsb_dev()
    a = forward(model, pairs.first, batch_size=batch_size, device=device)
    b = forward(model, pairs.second, batch_size=batch_size, device=device)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1).numpy()
    return float(spearmanr(cos, np.asarray(pairs.scores)).statistic)


def _reference_spec(model: LoadedModel, config: EvaluateConfig) -> str | None:
    if config.reference:
        return config.reference
    parent = (model.manifest or {}).get("parent") or {}
    return parent.get("path")


def linear_sparsity(module: torch.nn.Module) -> float:
    """Share of zero weights in the float Linear layers (what unstructured pruning leaves)."""
    weights = [m.weight for m in module.modules() if type(m) is torch.nn.Linear]
    total = sum(w.numel() for w in weights)
    return round(sum(int((w == 0).sum()) for w in weights) / total, 6) if total else 0.0


def _describe(model: LoadedModel) -> dict[str, Any]:
    body = model.body
    return {"path": model.path, "kind": model.kind, "recipe": (model.recipe or {}).get("kind", "float32"),
            "parameters": parameter_count(body), "linear_sparsity": linear_sparsity(body),
            "size_on_disk_bytes": model_size_bytes(model.path), "serialized_bytes": serialized_bytes(body)}


@register(EvaluateConfig)
def evaluate(model: LoadedModel, config: EvaluateConfig, ctx: JobContext) -> Outcome:
    """Report on ``model`` and, when a reference is known, compare with it."""
    previous_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _evaluate(model, config, ctx)
    finally:
        torch.set_num_threads(previous_threads)


def _evaluate(model: LoadedModel, config: EvaluateConfig, ctx: JobContext) -> Outcome:
    device = "cpu" if (model.recipe or {}).get("kind", "").endswith("int8") else ctx.device
    total = 5
    ctx.progress(0, total, "loading reference")
    ref_spec = _reference_spec(model, config)
    reference: LoadedModel | None = None
    notes: list[str] = []
    if ref_spec:
        if not Path(ref_spec).exists() and config.reference is None and ref_spec not in PACKAGED_ALIASES:
            notes.append(f"parent {ref_spec} no longer exists: no quality comparison")
        else:
            reference = load_model(ref_spec)
    if model.kind in (ST, HF):
        inputs = model_inputs(model, config.sentences, limit=config.limit)
    elif config.data:
        inputs = model_inputs(model, (config.data,), limit=config.limit)
    else:
        raise CompressionError("EvaluateConfig.data must name an .npz/.npy file to evaluate a torch module",
                               field="data")
    report: dict[str, Any] = {"inputs": len(inputs), "batch_size": config.batch_size, "repeats": config.repeats,
                              "threads": torch.get_num_threads(), "device": device,
                              "model": _describe(model)}
    if reference is not None:
        report["reference"] = _describe(reference)
    ctx.progress(1, total, "timing")
    models = {"model": model, **({"reference": reference} if reference is not None else {})}
    for m in models.values():
        if not (m.recipe or {}).get("kind", "").endswith("int8"):
            m.module.to(device)
    speed = measure_throughput(models, inputs, batch_size=config.batch_size, repeats=config.repeats,
                               device=device)
    for name, figures in speed.items():
        report[name].update(figures)
    if reference is not None:
        report["throughput_ratio"] = round(speed["model"]["per_second"] / speed["reference"]["per_second"], 3)
        ctx.progress(2, total, "comparing outputs")
        report["agreement"] = agreement(forward(reference, inputs, device=device),
                                        forward(model, inputs, device=device),
                                        classes=model.kind != ST)
    ctx.progress(3, total, "quality")
    if model.kind == ST and config.stsb:
        try:
            report["model"]["stsb_dev_spearman"] = round(stsb_spearman(model, device=device), 6)
            if reference is not None and reference.kind == ST:
                report["reference"]["stsb_dev_spearman"] = round(stsb_spearman(reference, device=device), 6)
                report["stsb_ratio"] = round(report["model"]["stsb_dev_spearman"]
                                             / report["reference"]["stsb_dev_spearman"], 6)
        except CompressionError as exc:
            notes.append(f"STS-B skipped: {exc.message}")
    if model.kind == TORCH and config.data:
        arrays = data.read_arrays(config.data)
        if "y" in arrays:
            x = torch.as_tensor(arrays["x"][: config.limit], dtype=torch.float32)
            y = torch.as_tensor(arrays["y"][: config.limit]).long()
            for name, m in models.items():
                with torch.inference_mode():
                    report[name]["accuracy"] = round(float((m.module(x).argmax(1) == y).float().mean()), 6)
    if notes:
        report["notes"] = notes
    ctx.progress(total, total, "done")
    return Outcome(model=None, metrics=report)
