"""The model store: artifact directories written atomically, each with a manifest; no torch.

An artifact is built in a hidden temporary directory of the store (``.tmp-<name>-<random>``),
every file is fsynced, the manifest (config, parent, metrics, sha256 of every file) is written
last, and the directory is renamed into place: a reader sees a whole artifact or none. A job
that fails or is cancelled (any exception, including Celery's time limits) removes its
temporary directory; one killed outright leaves only a ``.tmp-`` directory, which no reader
takes for an artifact and ``remove_stale`` deletes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from producers.errors import CompressionError
from workers.encoder_loading import (
    ARTIFACT_FORMAT,
    ARTIFACT_FORMAT_VERSION,
    MANIFEST_NAME,
    read_manifest,
    sha256_file,
    verify_files,
)

TMP_PREFIX = ".tmp-"
_SUFFIX = re.compile(r"-\d{8}T\d{6}-[0-9a-f]{8}$")

__all__ = ["TMP_PREFIX", "artifact_name", "list_artifacts", "read_manifest", "remove_stale",
           "verify_files", "write_artifact"]


def artifact_name(job: str, parent: str) -> str:
    """A unique, sortable directory name: ``<job>-<parent stem>-<UTC time>-<random>``."""
    stem = _SUFFIX.sub("", Path(parent.rstrip("/")).name)  # an artifact parent: drop its time and id
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.")[:48] or "model"
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return f"{job}-{stem}-{stamp}-{uuid.uuid4().hex[:8]}"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_and_sync(root: Path) -> dict[str, str]:
    files: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            raise CompressionError(f"artifact files must be regular files, {path.name} is a link")
        if path.is_file():
            # Some writers (safetensors) create 0600 files; an artifact is read by other workers.
            os.chmod(path, 0o644)
            _fsync_path(path)
            files[path.relative_to(root).as_posix()] = sha256_file(path)
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _fsync_path(folder)
    return files


def write_artifact(store: str | os.PathLike[str], *, name: str, populate: Callable[[Path], None],
                   manifest: Mapping[str, Any]) -> Path:
    """Write an artifact atomically and return its final path.

    Args:
        store: the model store directory (created if absent).
        name: the artifact's directory name (see ``artifact_name``).
        populate: writes the artifact's files into the directory it is given.
        manifest: job, config, parent, metrics, model; ``files`` and the format are added here.

    Raises:
        CompressionError: the artifact exists already or the store cannot be written;
            any exception of ``populate`` propagates after the temporary directory is removed.
    """
    root = Path(store).expanduser()
    if MANIFEST_NAME in name or "/" in name or name.startswith("."):
        raise CompressionError(f"invalid artifact name {name!r}")
    final = root / name
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CompressionError(f"cannot create model store {root}: {exc}", path=str(root)) from None
    if final.exists():
        raise CompressionError(f"artifact {final} exists already", path=str(final))
    tmp = root / f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        populate(tmp)
        files = _hash_and_sync(tmp)
        document = {
            "format": ARTIFACT_FORMAT,
            "format_version": ARTIFACT_FORMAT_VERSION,
            "name": name,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            **dict(manifest),
            "files": files,
        }
        manifest_path = tmp / MANIFEST_NAME
        with open(manifest_path, "w", encoding="utf-8") as fh:
            json.dump(document, fh, indent=2, sort_keys=True, allow_nan=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_path(tmp)
        os.rename(tmp, final)
        _fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def list_artifacts(store: str | os.PathLike[str]) -> list[Path]:
    """Complete artifacts of the store (directories with a manifest), oldest name first."""
    root = Path(store)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST_NAME).is_file())


def remove_stale(store: str | os.PathLike[str], *, older_than_s: float = 3600.0) -> list[Path]:
    """Delete temporary directories left by killed jobs; returns what was removed."""
    root = Path(store)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    now = time.time()
    for path in root.iterdir():
        if path.name.startswith(TMP_PREFIX) and path.is_dir() and now - path.stat().st_mtime > older_than_s:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
