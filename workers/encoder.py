"""The sentence encoder of the grouper, with an embedding cache in Redis keyed by text hash."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import redis

from producers.keys import Keys

EMBEDDING_TTL_S = 86400
ENCODE_BATCH = 64


def text_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


class Encoder:
    """Embeds texts with the configured encoder (name or directory), normalized float32."""

    def __init__(self, spec: str, *, device: str = "cpu", threads: int = 0) -> None:
        self.spec = spec
        self._device = device
        self._threads = threads
        self._model: Any = None
        self.cache_tag = hashlib.sha1(spec.encode()).hexdigest()[:8]

    def _load(self) -> Any:
        if self._model is None:
            from workers.encoder_loading import load_encoder

            if self._threads > 0:
                import torch

                torch.set_num_threads(self._threads)
            self._model = load_encoder(self.spec, device=self._device)
        return self._model

    @property
    def dimension(self) -> int:
        return int(self._load().get_sentence_embedding_dimension())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts`` (rows L2-normalized, float32)."""
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        vectors = self._load().encode(list(texts), batch_size=ENCODE_BATCH, convert_to_numpy=True,
                                      normalize_embeddings=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)


class CachedEncoder:
    """An ``Encoder`` in front of a Redis cache of embeddings keyed by text hash."""

    def __init__(self, encoder: Encoder, client: redis.Redis, keys: Keys) -> None:
        self.encoder = encoder
        self._redis = client
        self._keys = keys
        self.hits = 0
        self.misses = 0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        hashes = [text_hash(t) for t in texts]
        keys = [self._keys.embedding(h, self.encoder.cache_tag) for h in hashes]
        cached = self._redis.mget(keys) if keys else []
        missing = [i for i, raw in enumerate(cached) if raw is None]
        rows: list[np.ndarray | None] = [
            None if raw is None else np.frombuffer(raw, dtype=np.float32) for raw in cached]
        if missing:
            fresh = self.encoder.encode([texts[i] for i in missing])
            pipe = self._redis.pipeline(transaction=False)
            for i, vector in zip(missing, fresh, strict=True):
                rows[i] = vector
                pipe.set(keys[i], vector.tobytes(), ex=EMBEDDING_TTL_S)
            pipe.execute()
        self.hits += len(texts) - len(missing)
        self.misses += len(missing)
        if not rows:
            return np.zeros((0, 384), dtype=np.float32)
        return np.vstack([row for row in rows if row is not None]).astype(np.float32, copy=False)

    def cached_vector(self, hash_: str) -> np.ndarray | None:
        """The cached embedding of a text hash, if present."""
        raw = self._redis.get(self._keys.embedding(hash_, self.encoder.cache_tag))
        return None if raw is None else np.frombuffer(raw, dtype=np.float32)
