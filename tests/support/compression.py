"""Small models built locally (no download) and a real gpu-queue worker for compression tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ops.launcher import wait_until  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPRESSION_REDIS_URL = "redis://127.0.0.1:6379/12"
"""Redis db of the compression tests alone."""


def poll(condition: Callable[[], Any], *, timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    """Return the first truthy ``condition()``; raise ``TimeoutError`` after ``timeout`` seconds."""
    return wait_until(condition, timeout=timeout, interval=interval, message=what)


def tiny_bert_config(**overrides: Any) -> Any:
    from transformers import BertConfig

    values = {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 64, "max_position_embeddings": 128}
    values.update(overrides)
    return BertConfig(**values)


def tiny_bert(seed: int = 0, **overrides: Any) -> Any:
    import torch
    from transformers import BertModel

    torch.manual_seed(seed)
    return BertModel(tiny_bert_config(**overrides)).eval()


def tiny_encoder_dir(dest: Path, *, seed: int = 0, **overrides: Any) -> Path:
    """A sentence-transformers directory with a tiny random BERT and the packaged tokenizer."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer

    from workers.encoder_loading import packaged_encoder_path

    hf_dir = dest.parent / f"{dest.name}-hf"
    tiny_bert(seed, **overrides).save_pretrained(str(hf_dir))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        source = packaged_encoder_path() / name
        if source.exists():
            shutil.copy(source, hf_dir / name)
    transformer = Transformer(str(hf_dir), max_seq_length=64)
    width = getattr(transformer, "get_embedding_dimension", None) or transformer.get_word_embedding_dimension
    pooling = Pooling(width(), pooling_mode="mean")
    SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu").save(str(dest))
    return dest


def tiny_mlp(sizes: list[int], seed: int = 0) -> Any:
    """A ``torch.nn.Sequential`` MLP: saved with ``torch.save``, it loads without test code."""
    import torch

    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers).eval()


def blobs(n: int, dim: int, classes: int, seed: int = 0, noise: float = 1.0) -> tuple[Any, Any]:
    """A separable classification set: Gaussian blobs around random class centres."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (classes, dim))
    y = rng.integers(0, classes, n)
    x = centres[y] + rng.normal(0, noise, (n, dim))
    return x.astype("float32"), y.astype("int64")


def worker_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"COHORT_REDIS_URL": COMPRESSION_REDIS_URL, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    env.pop("COHORT_CONFIG", None)
    env.update(extra)
    return env


def client_app() -> Any:
    """A Celery client of db 12 alone (the shared ``workers.app`` is left as other tests set it)."""
    from celery import Celery

    client = Celery("cohort-compression-tests", broker=COMPRESSION_REDIS_URL, backend=COMPRESSION_REDIS_URL,
                    set_as_current=False)
    client.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                       result_accept_content=["json"], broker_connection_retry_on_startup=True)
    return client


@contextmanager
def gpu_worker(log_path: Path, *, ready_timeout: float = 120.0, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """A real Celery worker of the gpu queue (solo pool) as a subprocess, stopped on exit."""
    import redis

    node = f"gpu-test-{os.getpid()}@%h"
    # Flushing is safe before the worker starts only: it would delete kombu's bindings.
    redis.Redis.from_url(COMPRESSION_REDIS_URL).flushdb()
    log = open(log_path, "wb")  # noqa: SIM115 - closed in the finally below
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", "gpu", "-c", "1", "-P", "solo",
         "-n", node, "--without-gossip", "--without-mingle", "-l", "info"],
        cwd=REPO_ROOT, env=worker_env(**env), stdout=log, stderr=subprocess.STDOUT)
    try:
        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"worker exited with {process.returncode}: {log_path.read_text()[-2000:]}")
            return b"ready." in log_path.read_bytes()

        poll(ready, timeout=ready_timeout, interval=0.2, what="the gpu worker")
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        log.close()
