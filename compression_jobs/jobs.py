"""Running one compression job end to end: load, apply the config, write the artifact.

Used by the Celery tasks and directly by scripts and tests (``run_job``).
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from compression_jobs.configs import DistillConfig, JobConfig, config_from_json
from compression_jobs.models import LoadedModel, load_model, resolve_path, save_model
from compression_jobs.registry import JobContext, Outcome, Progress, _no_progress, apply
from compression_jobs.store import artifact_name, write_artifact
from producers.errors import CompressionError
from workers.encoder_loading import sha256_file

REPORT_NAME = "report.json"


def pick_device(config: JobConfig) -> str:
    """CUDA when present (unless the config asks for the CPU)."""
    wanted = getattr(config, "device", "auto")
    if wanted == "cuda" and not torch.cuda.is_available():
        raise CompressionError("DistillConfig.device is cuda but CUDA is not available here", field="device")
    if wanted == "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def tree_digest(path: Path) -> str:
    """sha256 over the sorted (relative path, file sha256) pairs of a file or directory."""
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def parent_info(spec: str, model: LoadedModel) -> dict[str, Any]:
    path = resolve_path(spec)
    info: dict[str, Any] = {"path": spec if spec == "all-MiniLM-L6-v2" else str(path.resolve()),
                            "kind": model.kind, "sha256": tree_digest(path)}
    if model.manifest:
        info.update(artifact=model.manifest.get("name"), job=model.manifest.get("job"),
                    recipe=model.recipe)
    return info


def _json_safe(metrics: Mapping[str, Any]) -> dict[str, Any]:
    def check(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            raise CompressionError(f"a metric is not a finite number: {value}")
        if isinstance(value, Mapping):
            return {str(k): check(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [check(v) for v in value]
        return value

    return check(dict(metrics))


def run_job(method: str, model_path: str, config: Mapping[str, Any] | JobConfig, store: str, *,
            progress: Progress = _no_progress) -> dict[str, Any]:
    """Run one job and write its artifact into ``store``.

    Returns:
        ``{"artifact": path, "name", "method", "metrics"}`` (JSON-safe).

    Raises:
        CompressionError: bad input, bad config, or a failed job; no artifact is left behind.
    """
    if not isinstance(model_path, str) or not model_path:
        raise CompressionError(f"model path must be a non-empty string, got {model_path!r}")
    if not isinstance(store, str) or not store:
        raise CompressionError(f"store must be a directory path, got {store!r}")
    cfg = config if isinstance(config, JobConfig) else config_from_json(config, method=method)
    if cfg.method != method:
        raise CompressionError(f"a {cfg.method} config was given to the {method} job")
    progress(0, 1, "loading model")
    model = load_model(model_path)
    parent = parent_info(model_path, model)
    with tempfile.TemporaryDirectory(prefix="cohort-job-") as workdir:
        ctx = JobContext(progress=progress, device=pick_device(cfg), workdir=workdir)
        outcome: Outcome = apply(model, cfg, ctx)
    metrics = _json_safe(outcome.metrics)
    produced = outcome.model
    manifest: dict[str, Any] = {
        "job": method,
        "config": cfg.to_json(),
        "parent": parent,
        "metrics": metrics,
        "recipe": outcome.recipe,
        "model": None if produced is None else {
            "kind": produced.kind, "path": "model", "structure": produced.structure},
        "torch_version": torch.__version__,
    }
    if isinstance(cfg, DistillConfig) and produced is not None:
        manifest["teacher"] = parent

    def populate(tmp: Path) -> None:
        progress(0, 1, "writing artifact")
        if produced is not None:
            save_model(produced, tmp / "model")
        for rel, content in outcome.files.items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        if produced is None:
            (tmp / REPORT_NAME).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    path = write_artifact(store, name=artifact_name(method, model_path), populate=populate, manifest=manifest)
    progress(1, 1, "done")
    return {"artifact": str(path), "name": path.name, "method": method, "metrics": metrics}
