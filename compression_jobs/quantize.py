"""Quantization: dynamic or static int8 of Linear layers, or a float16/bfloat16 cast.

The artifact keeps the float weights and records a recipe that ``apply_recipe`` (in
``workers.encoder_loading``) applies at load time: quantized modules do not save as a
sentence-transformers directory. Static int8 also stores the calibrated activation ranges.

Why the encoder default keeps one layer in float and uses 8-bit activations: on all-MiniLM-L6-v2,
per-tensor int8 of every Linear gives a mean cosine of 0.95 to fp32; per-channel weights 0.977;
per-channel with 8-bit (not 7-bit) activations 0.994; the same with the first layer's FFN output
(``encoder.layer.0.output.dense``, the input with the widest activation range) in float 0.995.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from compression_jobs.configs import QuantizeConfig
from compression_jobs.forward import agreement, forward, model_inputs
from compression_jobs.models import LoadedModel, parameter_count
from compression_jobs.registry import JobContext, Outcome, register
from producers.errors import CompressionError
from workers.encoder_loading import (
    BERT_KEEP_FLOAT,
    RANGES_NAME,
    apply_recipe,
    matches_any,
    quantize_static_linears,
    resolve_reduce_range,
)


def linear_names(body: torch.nn.Module) -> list[str]:
    return [n for n, m in body.named_modules() if type(m) is torch.nn.Linear]


def default_keep_float(names: list[str]) -> tuple[str, ...]:
    """The family default: BERT-like bodies keep ``BERT_KEEP_FLOAT``; others keep nothing."""
    return tuple(p for p in BERT_KEEP_FLOAT if any(matches_any(n, (p,)) for n in names))


def build_recipe(config: QuantizeConfig, names: list[str]) -> dict[str, Any]:
    """The load-time recipe for ``config`` on a body with these Linear layers.

    Raises:
        CompressionError: no Linear to quantize, or a keep_float pattern matching nothing.
    """
    if config.kind in ("fp16", "bf16"):
        return {"kind": config.kind}
    if not names:
        raise CompressionError("the model has no Linear layers to quantize")
    if config.keep_float is None:
        keep = default_keep_float(names)
    else:
        keep = config.keep_float
        for pattern in keep:
            if not any(matches_any(n, (pattern,)) for n in names):
                raise CompressionError(f"QuantizeConfig.keep_float pattern {pattern!r} matches no Linear layer "
                                       f"(e.g. {', '.join(names[:3])})", field="keep_float")
    if all(matches_any(n, keep) for n in names):
        raise CompressionError("QuantizeConfig.keep_float keeps every Linear layer in float: nothing to quantize",
                               field="keep_float")
    return {"kind": config.kind, "keep_float": list(keep), "per_channel": config.per_channel,
            "reduce_range": config.reduce_range, "engine": config.engine}


def calibrate_ranges(model: LoadedModel, inputs: Any, names: list[str], *, batch_size: int = 32,
                     device: str = "cpu") -> dict[str, dict[str, list[float]]]:
    """Min/max of the inputs and outputs of the named Linear layers over the calibration inputs.

    Raises:
        CompressionError: a layer saw NaN or infinite activations.
    """
    body = model.body
    ranges: dict[str, dict[str, list[float]]] = {}
    bad: list[str] = []

    def hook(name: str):
        def record(_mod: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            x = args[0].detach()
            if not (torch.isfinite(x).all() and torch.isfinite(out).all()):
                bad.append(name)
                return
            entry = ranges.setdefault(name, {"in": [0.0, 0.0], "out": [0.0, 0.0]})
            for key, t in (("in", x), ("out", out.detach())):
                entry[key][0] = min(entry[key][0], float(t.min()))
                entry[key][1] = max(entry[key][1], float(t.max()))
        return record

    handles = [body.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        forward(model, inputs, batch_size=batch_size, device=device)
    finally:
        for h in handles:
            h.remove()
    if bad:
        raise CompressionError(f"calibration produced NaN or infinite activations at {bad[0]}", layer=bad[0])
    missing = [n for n in names if n not in ranges]
    if missing:
        raise CompressionError(f"calibration never reached layer {missing[0]}", layer=missing[0])
    return ranges


def _check(model: LoadedModel, config: QuantizeConfig, recipe: dict[str, Any], files: dict[str, bytes],
           inputs: Any, ctx: JobContext) -> dict[str, Any]:
    """Outputs of the quantized model against the float parent on a few inputs."""
    candidate = model.clone()
    if ranges_file := files.get(RANGES_NAME):
        candidate.body = quantize_static_linears(candidate.body, json.loads(ranges_file),
                                                 per_channel=config.per_channel,
                                                 reduce_range=resolve_reduce_range(config.reduce_range))
    else:
        candidate.body = apply_recipe(candidate.body, recipe)
    device = ctx.device if config.kind in ("fp16", "bf16") else "cpu"
    reference = forward(model, inputs)
    if device != "cpu":
        candidate.module.to(device)
    return {"inputs": len(inputs), **agreement(reference, forward(candidate, inputs, device=device),
                                               classes=model.kind != "sentence_transformer")}


@register(QuantizeConfig)
def quantize(model: LoadedModel, config: QuantizeConfig, ctx: JobContext) -> Outcome:
    """Record the quantization recipe for ``model`` and report how the result compares."""
    if model.recipe:
        raise CompressionError(f"the model is already {model.recipe.get('kind')}: quantize its parent instead")
    if config.kind in ("dynamic_int8", "static_int8") and ctx.device != "cpu":
        ctx = JobContext(ctx.progress, "cpu", ctx.workdir)  # int8 kernels are CPU kernels
    ctx.progress(0, 3, "preparing")
    body = model.body
    names = linear_names(body)
    recipe = build_recipe(config, names)
    files: dict[str, bytes] = {}
    check_inputs = None
    sources = config.calibration or (("banking77",) if model.kind != "torch" else ())
    if config.kind == "static_int8":
        ctx.progress(1, 3, "calibrating")
        inputs = model_inputs(model, config.calibration, limit=config.calibration_limit)
        targets = [n for n in names if not matches_any(n, recipe["keep_float"])]
        ranges = calibrate_ranges(model, inputs, targets)
        files[RANGES_NAME] = json.dumps(ranges, sort_keys=True).encode()
        check_inputs = inputs[: config.check_limit]
    elif config.check_limit and sources:
        try:
            check_inputs = model_inputs(model, sources, limit=config.check_limit)
        except CompressionError:
            if config.calibration:
                raise
            check_inputs = None  # the default check data is optional
    ctx.progress(2, 3, "checking")
    metrics: dict[str, Any] = {
        "kind": config.kind,
        "linear_layers": len(names),
        "parameters": parameter_count(body),
    }
    if config.kind in ("dynamic_int8", "static_int8"):
        kept = [n for n in names if matches_any(n, recipe["keep_float"])]
        metrics.update(quantized_layers=len(names) - len(kept), kept_float=kept,
                       reduce_range_here=resolve_reduce_range(config.reduce_range))
    if check_inputs is not None and len(check_inputs):
        try:
            metrics["check"] = _check(model, config, recipe, files, check_inputs, ctx)
        except CompressionError as exc:
            if config.calibration:
                raise
            metrics["check"] = {"skipped": exc.message}  # the default check data is optional
    ctx.progress(3, 3, "done")
    return Outcome(model=model, metrics=metrics, recipe=recipe, files=files)
