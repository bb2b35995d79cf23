"""Feeding inputs to any loaded model and comparing outputs: shared by the jobs' checks.

Encoders (sentence-transformers) take texts and give normalized embeddings; Hugging Face
models take texts through their own tokenizer and give logits or mean-pooled hidden states;
torch modules take the ``x`` array of a ``.npy``/``.npz`` file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compression_jobs import data
from compression_jobs.models import HF, ST, LoadedModel
from producers.errors import CompressionError


def model_inputs(model: LoadedModel, sources: Sequence[str], *, limit: int, seed: int = 0) -> Any:
    """Inputs for ``model`` from config sources: texts, or the ``x`` array of the first file."""
    if not sources:
        raise CompressionError("no input sources given")
    if model.kind in (ST, HF):
        numeric = [s for s in sources if s.lower().endswith((".npy", ".npz"))]
        if numeric:
            raise CompressionError(f"{model.kind} models take texts, not arrays ({numeric[0]})")
        return data.sentences(sources, limit=limit, seed=seed)
    texts = [s for s in sources if not s.lower().endswith((".npy", ".npz"))]
    if texts:
        raise CompressionError(f"a torch module takes arrays (.npy/.npz with x), not texts ({texts[0]})")
    arrays = [data.read_arrays(s)["x"] for s in sources]
    try:
        x = np.concatenate(arrays, axis=0)
    except ValueError as exc:
        raise CompressionError(f"input arrays do not stack: {exc}") from None
    return x[:limit]


def forward(model: LoadedModel, inputs: Any, *, batch_size: int = 64, device: str = "cpu") -> torch.Tensor:
    """Outputs of ``model`` for ``inputs`` as one float32 CPU tensor (rows = inputs)."""
    module = model.module
    with torch.inference_mode():
        if model.kind == ST:
            out = module.encode(list(inputs), batch_size=batch_size, convert_to_tensor=True,
                                show_progress_bar=False, normalize_embeddings=True)
            return out.float().cpu()
        if model.kind == HF:
            return _hf_forward(model, list(inputs), batch_size=batch_size, device=device)
        rows = []
        dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
        for start in range(0, len(inputs), batch_size):
            batch = torch.as_tensor(np.asarray(inputs[start:start + batch_size]))
            if batch.is_floating_point():
                batch = batch.to(dtype)
            result = module(batch.to(device))
            if isinstance(result, tuple | list):
                result = result[0]
            rows.append(result.float().cpu())
        return torch.cat(rows) if rows else torch.zeros(0)


def _hf_forward(model: LoadedModel, texts: list[str], *, batch_size: int, device: str) -> torch.Tensor:
    from transformers import AutoTokenizer

    source = model.path
    if model.manifest:
        source = str(Path(model.path) / model.manifest["model"].get("path", "model"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise CompressionError(f"the Hugging Face model at {model.path} has no tokenizer to read texts: {exc}") \
            from None
    rows = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items()}
        out = model.module(**enc)
        if getattr(out, "logits", None) is not None:
            rows.append(out.logits.float().cpu())
        else:
            hidden = out.last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            rows.append(((hidden * mask).sum(1) / mask.sum(1).clamp_min(1)).cpu())
    return torch.cat(rows)


def agreement(reference: torch.Tensor, candidate: torch.Tensor, *, classes: bool = False) -> dict[str, float]:
    """How close ``candidate`` outputs are to ``reference`` (same inputs, same order); with
    ``classes``, also how often their argmax (the predicted class) agrees."""
    if reference.shape != candidate.shape:
        raise CompressionError(f"outputs differ in shape: {tuple(reference.shape)} vs {tuple(candidate.shape)}")
    ref = reference.reshape(len(reference), -1).float()
    cand = candidate.reshape(len(candidate), -1).float()
    if not torch.isfinite(cand).all():
        raise CompressionError("the compressed model produced NaN or infinite outputs")
    cos = torch.nn.functional.cosine_similarity(ref, cand, dim=1)
    result = {
        "cosine_mean": round(float(cos.mean()), 6),
        "cosine_min": round(float(cos.min()), 6),
        "max_abs_diff": round(float((ref - cand).abs().max()), 6),
    }
    if classes and ref.shape[1] > 1:
        result["argmax_agreement"] = round(float((ref.argmax(1) == cand.argmax(1)).float().mean()), 6)
    return result
