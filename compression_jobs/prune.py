"""Pruning: L1 unstructured (per layer or global), and structured pruning of attention heads or
FFN channels of BERT-like layers, which physically shrinks the matrices. Masks are always made
permanent (``torch.nn.utils.prune.remove``): the saved weights carry no mask.

Unstructured pruning only zeroes weights: dense kernels do the same work on zeros, so the
report gives sparsity and never a speed-up; speed is measured by the evaluate job.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.utils import prune as torch_prune

from compression_jobs.configs import PruneConfig
from compression_jobs.models import LoadedModel, parameter_count
from compression_jobs.registry import JobContext, Outcome, register
from producers.errors import CompressionError
from workers.encoder_loading import matches_any


def selected_linears(body: torch.nn.Module, config: PruneConfig) -> list[tuple[str, torch.nn.Linear]]:
    chosen = [(n, m) for n, m in body.named_modules() if type(m) is torch.nn.Linear
              and (not config.include or matches_any(n, config.include))
              and not matches_any(n, config.exclude)]
    if not chosen:
        raise CompressionError("PruneConfig.include/exclude select no Linear layer of the model", field="include")
    return chosen


def sparsity(tensor: torch.Tensor) -> float:
    return float((tensor == 0).sum()) / max(1, tensor.numel())


def bert_layers(body: torch.nn.Module) -> list[tuple[str, Any]]:
    """Layers with BERT-style attention (``attention.self.query``) and FFN (``intermediate.dense``)."""
    layers: list[tuple[str, Any]] = []
    for name, module in body.named_modules():
        attn = getattr(module, "attention", None)
        if (attn is not None and hasattr(getattr(attn, "self", None), "query")
                and hasattr(getattr(attn, "output", None), "dense")
                and hasattr(getattr(module, "intermediate", None), "dense")
                and hasattr(getattr(module, "output", None), "dense")):
            layers.append((name, module))
    return layers


def _keep_rows(linear: torch.nn.Linear, index: torch.Tensor) -> torch.nn.Linear:
    new = torch.nn.Linear(linear.in_features, len(index), bias=linear.bias is not None)
    with torch.no_grad():
        new.weight.copy_(linear.weight[index])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[index])
    return new.to(linear.weight.device)


def _keep_columns(linear: torch.nn.Linear, index: torch.Tensor) -> torch.nn.Linear:
    new = torch.nn.Linear(len(index), linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        new.weight.copy_(linear.weight[:, index])
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new.to(linear.weight.device)


def _count_to_remove(total: int, amount: float, what: str) -> int:
    n = int(round(total * amount))
    if n < 1:
        raise CompressionError(f"PruneConfig.amount {amount} removes no {what} of {total}", field="amount")
    if n >= total:
        raise CompressionError(f"PruneConfig.amount {amount} would remove all {total} {what}s", field="amount")
    return n


def prune_heads(layer: Any, amount: float) -> int:
    """Remove the heads of lowest L1 weight mass; returns the heads kept."""
    attn = layer.attention
    heads, size = attn.self.num_attention_heads, attn.self.attention_head_size
    drop = _count_to_remove(heads, amount, "head")
    score: torch.Tensor = sum(getattr(attn.self, p).weight.abs().reshape(heads, size, -1).sum(dim=(1, 2))
                              for p in ("query", "key", "value"))
    score = score + attn.output.dense.weight.abs().reshape(-1, heads, size).sum(dim=(0, 2))
    kept_heads = torch.sort(torch.argsort(score, descending=True)[: heads - drop]).values
    index = (kept_heads[:, None] * size + torch.arange(size)[None, :]).reshape(-1)
    for proj in ("query", "key", "value"):
        setattr(attn.self, proj, _keep_rows(getattr(attn.self, proj), index))
    attn.output.dense = _keep_columns(attn.output.dense, index)
    attn.self.num_attention_heads = heads - drop
    attn.self.all_head_size = len(index)
    return heads - drop


def prune_ffn(layer: Any, amount: float) -> int:
    """Remove the FFN channels of lowest L1 weight mass; returns the channels kept."""
    inter, out = layer.intermediate.dense, layer.output.dense
    width = inter.out_features
    drop = _count_to_remove(width, amount, "FFN channel")
    score = inter.weight.abs().sum(1) + out.weight.abs().sum(0)
    index = torch.sort(torch.argsort(score, descending=True)[: width - drop]).values
    layer.intermediate.dense = _keep_rows(inter, index)
    layer.output.dense = _keep_columns(out, index)
    return width - drop


@register(PruneConfig)
def prune(model: LoadedModel, config: PruneConfig, ctx: JobContext) -> Outcome:
    """Prune ``model`` in place as ``config`` says; masks are removed, shapes shrink when structured."""
    if model.recipe:
        raise CompressionError(f"the model is {model.recipe.get('kind')}: prune its float parent instead")
    body: Any = model.body
    before = parameter_count(body)
    metrics: dict[str, Any] = {"kind": config.kind, "amount": config.amount, "parameters_before": before}
    if config.kind in ("l1_unstructured", "global_l1_unstructured"):
        chosen = selected_linears(body, config)
        ctx.progress(0, len(chosen) + 1, "pruning")
        if config.kind == "global_l1_unstructured":
            torch_prune.global_unstructured([(m, "weight") for _, m in chosen],
                                            pruning_method=torch_prune.L1Unstructured, amount=config.amount)
        for step, (_, module) in enumerate(chosen, 1):
            if config.kind == "l1_unstructured":
                torch_prune.l1_unstructured(module, "weight", amount=config.amount)
            torch_prune.remove(module, "weight")
            ctx.progress(step, len(chosen) + 1, "pruning")
        zeros = sum(int((m.weight == 0).sum()) for _, m in chosen)
        total = sum(m.weight.numel() for _, m in chosen)
        metrics.update(
            layers={n: round(sparsity(m.weight), 6) for n, m in chosen},
            sparsity_pruned_layers=round(zeros / total, 6),
            sparsity_all_parameters=round(
                sum(int((p == 0).sum()) for p in body.parameters()) / max(1, before), 6),
            shapes_changed=False,
            speed_note="unstructured: weights are zeroed, matrices keep their shapes; dense kernels do "
                       "the same work, so no speed-up is claimed (measure with an evaluate job)",
        )
    else:
        layers = bert_layers(body)
        if not layers:
            raise CompressionError(f"PruneConfig.kind {config.kind!r} needs BERT-like layers (attention.self."
                                   "query/key/value, intermediate.dense, output.dense); the model has none",
                                   field="kind")
        structure = dict(model.structure or {})
        kept: dict[str, int] = dict(structure.get("heads" if config.kind == "heads" else "intermediate") or {})
        for step, (name, layer) in enumerate(layers):
            ctx.progress(step, len(layers), f"pruning {config.kind}")
            kept[name] = prune_heads(layer, config.amount) if config.kind == "heads" else prune_ffn(
                layer, config.amount)
        if config.kind == "heads":
            structure["heads"] = kept
        elif len(set(kept.values())) == 1 and hasattr(getattr(body, "config", None), "intermediate_size"):
            body.config.intermediate_size = next(iter(kept.values()))  # the saved config says it all
        else:
            structure["intermediate"] = kept
        model.structure = structure or None
        metrics.update(kept={name: n for name, n in kept.items()}, shapes_changed=True,
                       speed_note="structured: matrices are smaller; measure the speed with an evaluate job")
    metrics["parameters_after"] = parameter_count(body)
    ctx.progress(1, 1, "done")
    return Outcome(model=model, metrics=metrics)
