"""Distillation: a smaller student learns from a teacher.

- ``embedding``: the student is the teacher encoder with fewer layers (the first ones, or spread
  out), trained to match the teacher's normalized sentence embeddings (MSE) on unlabeled
  sentences. Batches group sentences of similar length so little time goes to padding.
- ``classifier``: a student MLP learns from soft targets (teacher logits at a temperature,
  KL divergence scaled by T^2, weight ``alpha``) plus hard labels (cross-entropy, ``1 - alpha``).
  The student is a ``torch.nn.Sequential``: it loads without any Cohort class.
"""

from __future__ import annotations

import copy
import math
import random
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from compression_jobs import data
from compression_jobs.configs import DistillConfig
from compression_jobs.models import ST, TORCH, LoadedModel, parameter_count
from compression_jobs.registry import JobContext, Outcome, register
from producers.errors import CompressionError

HELD_OUT_SENTENCES = 500
"""Training sentences set aside to report the student's cosine to the teacher."""


def select_layers(total: int, keep: int, how: str) -> list[int]:
    """Indices of the teacher layers the student keeps."""
    if keep >= total:
        raise CompressionError(f"DistillConfig.num_layers {keep} must be below the teacher's {total} layers",
                               field="num_layers")
    if how == "first":
        return list(range(keep))
    return sorted({round(i * (total - 1) / max(1, keep - 1)) for i in range(keep)}) if keep > 1 else [0]


def make_student(teacher: LoadedModel, layers: list[int], max_seq_length: int) -> LoadedModel:
    student = teacher.clone()
    body: Any = student.body
    encoder = getattr(body, "encoder", None)
    if encoder is None or not hasattr(encoder, "layer"):
        raise CompressionError("embedding distillation needs a BERT-like encoder (encoder.layer)", field="kind")
    encoder.layer = nn.ModuleList([encoder.layer[i] for i in layers])
    body.config.num_hidden_layers = len(layers)
    student.module.max_seq_length = max_seq_length
    student.structure = None if not teacher.structure else _renumber(teacher.structure, layers)
    return student


def _renumber(structure: dict[str, Any], layers: list[int]) -> dict[str, Any]:
    mapping = {f"encoder.layer.{old}": f"encoder.layer.{new}" for new, old in enumerate(layers)}
    return {kind: {mapping[name]: n for name, n in table.items() if name in mapping}
            for kind, table in structure.items()}


def embedding_dimension(encoder: Any) -> int:
    """Output width of a sentence-transformers model (the method's name changed in 6.x)."""
    method = getattr(encoder, "get_embedding_dimension", None) or encoder.get_sentence_embedding_dimension
    return int(method())


def _preprocess(encoder: Any, texts: list[str]) -> dict[str, Any]:
    method = getattr(encoder, "preprocess", None) or encoder.tokenize
    return method(texts)


def _length_batches(texts: list[str], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of indices, each of texts of similar length."""
    order = list(range(len(texts)))
    rng.shuffle(order)
    chunk = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: len(texts[i]))
        batches.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
    rng.shuffle(batches)
    return batches


def _schedule(optimizer: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, int(0.05 * total))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * max(0.0, (total - step) / total))


def distill_embedding(teacher: LoadedModel, config: DistillConfig, ctx: JobContext) -> Outcome:
    if teacher.kind != ST:
        raise CompressionError(f"embedding distillation needs a sentence-transformers teacher, got {teacher.kind}",
                               field="kind")
    if teacher.recipe:
        raise CompressionError(f"the teacher is {teacher.recipe.get('kind')}: distill from a float model")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    texts = data.sentences(config.sources, limit=config.max_sentences + HELD_OUT_SENTENCES, seed=config.seed)
    held_out, texts = texts[:HELD_OUT_SENTENCES], texts[HELD_OUT_SENTENCES:]
    if len(texts) < config.batch_size:
        raise CompressionError(f"DistillConfig.sources give {len(texts)} training sentences, fewer than one batch",
                               field="sources")
    device = ctx.device
    teacher.module.to(device)
    teacher_length = teacher.module.max_seq_length
    # Targets from the same truncated text the student sees while training.
    teacher.module.max_seq_length = min(teacher_length or config.max_seq_length, config.max_seq_length)
    ctx.progress(0, 1, "teacher embeddings")
    targets = torch.empty(len(texts), embedding_dimension(teacher.module))
    step = 4096
    for start in range(0, len(texts), step):
        with torch.inference_mode():
            targets[start:start + step] = teacher.module.encode(
                texts[start:start + step], batch_size=128, convert_to_tensor=True, normalize_embeddings=True,
                show_progress_bar=False).float().cpu()
        ctx.progress(min(start + step, len(texts)), len(texts), "teacher embeddings")
    teacher.module.max_seq_length = teacher_length
    teacher_body: Any = teacher.body
    layers = select_layers(len(teacher_body.encoder.layer), config.num_layers, config.layer_selection)
    student = make_student(teacher, layers, config.max_seq_length)
    student_body: Any = student.body
    if config.ffn_fraction < 1.0:
        from compression_jobs.prune import bert_layers, prune_ffn

        widths = {prune_ffn(layer, 1.0 - config.ffn_fraction) for _, layer in bert_layers(student.body)}
        if len(widths) == 1:
            student_body.config.intermediate_size = widths.pop()
        else:
            raise CompressionError("DistillConfig.ffn_fraction needs layers of one FFN width", field="ffn_fraction")
    module = student.module.to(device)
    if config.freeze_embeddings:
        for param in student_body.embeddings.word_embeddings.parameters():
            param.requires_grad_(False)
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    per_epoch = math.ceil(len(texts) / config.batch_size)
    total = per_epoch * config.epochs
    scheduler = _schedule(optimizer, total)
    done, losses, started = 0, [], time.perf_counter()
    module.train()
    for epoch in range(config.epochs):
        for batch in _length_batches(texts, config.batch_size, rng):
            features = _preprocess(module, [texts[i] for i in batch])
            features = {k: v.to(device) for k, v in features.items() if isinstance(v, torch.Tensor)}
            out = module(features)["sentence_embedding"]
            loss = nn.functional.mse_loss(out, targets[batch].to(device))
            if not torch.isfinite(loss):
                raise CompressionError(f"distillation diverged (loss {loss.item()}) at step {done}; lower the lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            done += 1
            losses.append(float(loss.detach()))
            if done % 20 == 0 or done == total:
                ctx.progress(done, total, f"training epoch {epoch + 1}/{config.epochs}")
    module.eval()
    module.max_seq_length = teacher_length
    for param in module.parameters():
        param.requires_grad_(True)
    seconds = time.perf_counter() - started
    with torch.inference_mode():
        a = teacher.module.encode(held_out, convert_to_tensor=True, normalize_embeddings=True,
                                  show_progress_bar=False).float().cpu()
        b = module.encode(held_out, convert_to_tensor=True, normalize_embeddings=True,
                          show_progress_bar=False).float().cpu()
    module.to("cpu")
    teacher.module.to("cpu")
    metrics = {
        "kind": "embedding",
        "layers_kept": layers,
        "ffn_width": int(student_body.config.intermediate_size),
        "training_sentences": len(texts),
        "epochs": config.epochs,
        "steps": done,
        "final_loss": round(float(np.mean(losses[-50:])), 8),
        "training_seconds": round(seconds, 1),
        "device": device,
        "held_out_cosine_to_teacher": round(float((a * b).sum(1).mean()), 6),
        "parameters_teacher": parameter_count(teacher.body),
        "parameters_student": parameter_count(student.body),
    }
    return Outcome(model=student, metrics=metrics)


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers of the given sizes with ReLU between them."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def accuracy(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.inference_mode():
        return float((module(x).argmax(1) == y).float().mean())


def split_rows(n: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, held-out) row indices."""
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * holdout_fraction))
    return order[cut:], order[:cut]


def distill_classifier(teacher: LoadedModel, config: DistillConfig, ctx: JobContext) -> Outcome:
    if teacher.kind != TORCH:
        raise CompressionError(f"classifier distillation needs a torch module teacher, got {teacher.kind}",
                               field="kind")
    arrays = data.read_arrays(str(config.data))
    if "y" not in arrays:
        raise CompressionError(f"{config.data} has no labels: classifier distillation needs an array 'y'",
                               field="data")
    x = torch.as_tensor(arrays["x"], dtype=torch.float32)
    y = torch.as_tensor(arrays["y"]).long()
    if x.ndim != 2 or len(x) != len(y):
        raise CompressionError(f"{config.data}: x must be 2-D with one label per row "
                               f"(x {tuple(x.shape)}, y {tuple(y.shape)})", field="data")
    train, held = split_rows(len(x), config.holdout_fraction, config.seed)
    t_module = teacher.module.eval()
    with torch.inference_mode():
        try:
            t_logits = t_module(x)
        except Exception as exc:
            raise CompressionError(f"the teacher cannot read {config.data}: {type(exc).__name__}: {exc}") from None
    if t_logits.ndim != 2 or int(y.max()) >= t_logits.shape[1] or int(y.min()) < 0:
        raise CompressionError(f"labels of {config.data} do not fit the teacher's {t_logits.shape[-1]} outputs",
                               field="data")
    torch.manual_seed(config.seed)
    device = ctx.device
    student = mlp([x.shape[1], *config.student_hidden, t_logits.shape[1]]).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    per_epoch = math.ceil(len(train) / config.batch_size)
    total = per_epoch * config.epochs
    scheduler = _schedule(optimizer, total)
    temp, alpha = config.temperature, config.alpha
    generator = torch.Generator().manual_seed(config.seed)
    train_idx = torch.as_tensor(train)
    done = 0
    for epoch in range(config.epochs):
        student.train()
        for batch in train_idx[torch.randperm(len(train_idx), generator=generator)].split(config.batch_size):
            xb, yb, tb = x[batch].to(device), y[batch].to(device), t_logits[batch].to(device)
            logits = student(xb)
            soft = nn.functional.kl_div(nn.functional.log_softmax(logits / temp, dim=1),
                                        nn.functional.softmax(tb / temp, dim=1), reduction="batchmean")
            loss = alpha * temp * temp * soft + (1 - alpha) * nn.functional.cross_entropy(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            done += 1
        ctx.progress(done, total, f"training epoch {epoch + 1}/{config.epochs}")
    student = student.cpu().eval()
    held_idx = torch.as_tensor(held)
    metrics: dict[str, Any] = {
        "kind": "classifier",
        "train_rows": len(train),
        "held_out_rows": len(held),
        "temperature": temp,
        "alpha": alpha,
        "parameters_teacher": parameter_count(t_module),
        "parameters_student": parameter_count(student),
    }
    if len(held):
        metrics["accuracy_teacher"] = round(accuracy(t_module, x[held_idx], y[held_idx]), 6)
        metrics["accuracy_student"] = round(accuracy(student, x[held_idx], y[held_idx]), 6)
        with torch.inference_mode():
            agree = (student(x[held_idx]).argmax(1) == t_logits[held_idx].argmax(1)).float().mean()
        metrics["agreement_with_teacher"] = round(float(agree), 6)
    return Outcome(model=LoadedModel(TORCH, student, teacher.path), metrics=metrics)


@register(DistillConfig)
def distill(model: LoadedModel, config: DistillConfig, ctx: JobContext) -> Outcome:
    """Train a student from ``model`` (the teacher)."""
    if config.kind == "embedding":
        return distill_embedding(model, config, ctx)
    return distill_classifier(copy.copy(model), config, ctx)
