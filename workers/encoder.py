"""The sentence encoder of the grouper, with an embedding cache in Redis keyed by text hash."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import redis

from producers.keys import Keys

if TYPE_CHECKING:
    from workers.settings import GroupingSettings

EMBEDDING_TTL_S = 86400
ENCODE_BATCH = 64
DIMENSION = 384


def text_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def resolve_quantize(quantize: str) -> bool:
    """Whether ``quantize`` ("auto", "int8" or "none", checked when the settings are read) means int8
    on this CPU.

    ``auto`` is int8 where the CPU has an int8 dot product that accumulates in 32 bits (VNNI or
    AMX): there int8 keeps a mean cosine of 0.995 to float embeddings; without it, x86 int8
    kernels need 7-bit activations and the cosine drops to ~0.98, so ``auto`` stays float.
    """
    if quantize == "auto":
        from workers.encoder_loading import cpu_has_vnni

        return cpu_has_vnni()
    return quantize == "int8"


class Encoder:
    """Embeds texts with the configured encoder (name or directory), normalized float32.

    ``int8`` applies dynamic int8 quantization at load time to a float encoder (the packaged
    model or a sentence-transformers directory); a compression artifact carries its own recipe.
    """

    def __init__(self, spec: str, *, device: str = "cpu", threads: int = 0, int8: bool = False) -> None:
        self.spec = spec
        self.int8 = int8
        self._device = device
        self._threads = threads
        self._model: Any = None
        self.cache_tag = hashlib.sha1((spec + ("|int8" if int8 else "")).encode()).hexdigest()[:8]
        """Embeddings are cached per encoder: a different model or precision never reads another's."""

    @classmethod
    def for_grouping(cls, grouping: GroupingSettings) -> Encoder:
        """The grouper's encoder as configured in ``[grouping]``."""
        return cls(grouping.encoder, threads=grouping.encoder_threads, int8=resolve_quantize(grouping.encoder_quantize))

    def _load(self) -> Any:
        if self._model is None:
            from workers.encoder_loading import BERT_KEEP_FLOAT, apply_recipe, is_artifact, load_encoder

            if self._threads > 0:
                import torch

                torch.set_num_threads(self._threads)
            model = load_encoder(self.spec, device=self._device)
            if self.int8 and not is_artifact(self.spec) and self._device == "cpu":
                transformer: Any = model[0]
                # The recipe of the default int8 compression job, applied at load time.
                recipe = {"kind": "dynamic_int8", "keep_float": list(BERT_KEEP_FLOAT), "per_channel": True}
                transformer.model = apply_recipe(transformer.model, recipe)
                model.eval()
            self._model = model
        return self._model

    @property
    def dimension(self) -> int:
        return int(self._load().get_sentence_embedding_dimension())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts`` (rows L2-normalized, float32)."""
        if not texts:
            return np.zeros((0, DIMENSION), dtype=np.float32)
        vectors = self._load().encode(list(texts), batch_size=ENCODE_BATCH, convert_to_numpy=True,
                                      normalize_embeddings=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)


class EncoderPace:
    """How long the encoder takes for n texts, learnt from its recent calls (for time budgets).

    A call costs a fixed part (``call_s``, the cost of encoding one short text alone less its share)
    plus ``seconds_per_text`` for each text; every call, however small, updates the per-text
    estimate, so one slow call cannot freeze it at a rate that leaves no room for another sample.
    """

    def __init__(self, seconds_per_text: float = 0.01, *, call_s: float = 0.005, weight: float = 0.3) -> None:
        self.seconds_per_text = seconds_per_text
        self.call_s = call_s
        self._weight = weight

    def record(self, texts: int, seconds: float) -> None:
        if texts > 0:
            sample = max(seconds - self.call_s, 0.0) / texts
            self.seconds_per_text += self._weight * (sample - self.seconds_per_text)

    def affordable(self, seconds: float) -> int:
        """How many texts fit in one call of at most ``seconds``."""
        return max(0, int((seconds - self.call_s) / max(self.seconds_per_text, 1e-6)))


class CachedEncoder:
    """An ``Encoder`` in front of a Redis cache of embeddings keyed by text hash."""

    def __init__(self, encoder: Encoder, client: redis.Redis, keys: Keys) -> None:
        self.encoder = encoder
        self._redis = client
        self._keys = keys
        self.pace = EncoderPace()
        self.hits = 0
        self.misses = 0

    def _key(self, text: str) -> str:
        return self._keys.embedding(text_hash(text), self.encoder.cache_tag)

    def lookup(self, texts: Sequence[str]) -> list[np.ndarray | None]:
        """The cached embedding of each text, or ``None`` (one round trip)."""
        found = self.cached_vectors([text_hash(t) for t in texts])
        hits = sum(v is not None for v in found)
        self.hits += hits
        self.misses += len(texts) - hits
        return found

    def compute(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` with the encoder and cache the embeddings."""
        started = time.perf_counter()
        vectors = self.encoder.encode(texts)
        self.pace.record(len(texts), time.perf_counter() - started)
        if len(texts):
            pipe = self._redis.pipeline(transaction=False)
            for text, vector in zip(texts, vectors, strict=True):
                pipe.set(self._key(text), vector.tobytes(), ex=EMBEDDING_TTL_S)
            pipe.execute()
        return vectors

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts``, from the cache where present."""
        rows = self.lookup(texts)
        missing = [i for i, row in enumerate(rows) if row is None]
        if missing:
            for i, vector in zip(missing, self.compute([texts[i] for i in missing]), strict=True):
                rows[i] = vector
        if not rows:
            return np.zeros((0, DIMENSION), dtype=np.float32)
        return np.vstack([row for row in rows if row is not None]).astype(np.float32, copy=False)

    def cached_vectors(self, hashes: Sequence[str]) -> list[np.ndarray | None]:
        """The cached embeddings of text hashes, where present (one round trip)."""
        if not hashes:
            return []
        raws = self._redis.mget([self._keys.embedding(h, self.encoder.cache_tag) for h in hashes])
        return [None if raw is None else np.frombuffer(raw, dtype=np.float32) for raw in raws]
