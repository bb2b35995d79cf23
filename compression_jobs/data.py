"""Readers of the data the jobs train, calibrate and evaluate on; no torch.

The shared data folder defaults to ``../shared/data`` relative to the repository root and is
overridden by the environment variable ``COHORT_DATA_DIR`` (read when a reader runs).

A source is a data set name (``DATASETS``) or a file: ``.txt`` (one text a line), ``.jsonl``
(``text``, ``prompt`` or ``instruction`` key), ``.csv`` (``text`` column), ``.npy`` / ``.npz``
(numeric arrays, for torch modules).
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from producers.errors import CompressionError

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir(env: Mapping[str, str] | None = None) -> Path:
    """The shared data folder: ``COHORT_DATA_DIR`` or ``<repo>/../shared/data``."""
    env = os.environ if env is None else env
    configured = env.get("COHORT_DATA_DIR")
    return Path(configured).expanduser() if configured else (REPO_ROOT.parent / "shared" / "data")


def _require(path: Path) -> Path:
    if not path.is_file():
        raise CompressionError(f"data file not found: {path} (set COHORT_DATA_DIR to the shared data folder)",
                               path=str(path))
    return path


@dataclass(frozen=True)
class StsPairs:
    """Sentence pairs with human similarity scores (0-5)."""

    scores: list[float]
    first: list[str]
    second: list[str]


def read_sts(path: str | os.PathLike[str]) -> StsPairs:
    """STS Benchmark file: tab-separated, no header, score in field 5, sentences in 6 and 7."""
    scores: list[float] = []
    first: list[str] = []
    second: list[str] = []
    with open(_require(Path(path)), encoding="utf-8", newline="") as fh:
        for row in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) < 7:
                continue
            scores.append(float(row[4]))
            first.append(row[5])
            second.append(row[6])
    return StsPairs(scores, first, second)


def stsb_dev(env: Mapping[str, str] | None = None) -> StsPairs:
    """STS-B dev: evaluation only."""
    return read_sts(data_dir(env) / "stsb" / "sts-dev.csv")


def read_banking77(env: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """Banking77 training rows as (text, intent), in file order."""
    with open(_require(data_dir(env) / "banking77" / "train.csv"), encoding="utf-8", newline="") as fh:
        return [(row["text"], row["category"]) for row in csv.DictReader(fh)]


def _jsonl_texts(path: Path, keys: Sequence[str] = ("text", "prompt", "instruction", "turns")) -> list[str]:
    texts: list[str] = []
    with open(_require(path), encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise CompressionError(f"{path} line {number} is not JSON: {exc}", path=str(path)) from None
            for key in keys:
                value = row.get(key)
                if isinstance(value, list):
                    value = next((v for v in value if isinstance(v, str)), None)
                if isinstance(value, str) and value.strip():
                    texts.append(value)
                    break
    return texts


def _paws(env: Mapping[str, str] | None) -> list[str]:
    with open(_require(data_dir(env) / "paws_wiki" / "dev.tsv"), encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence1"] for r in rows] + [r["sentence2"] for r in rows]


def _stsb_sentences(name: str, env: Mapping[str, str] | None) -> list[str]:
    pairs = read_sts(data_dir(env) / "stsb" / name)
    return pairs.first + pairs.second


def _self_instruct(env: Mapping[str, str] | None) -> list[str]:
    folder = data_dir(env) / "self_instruct"
    return (_jsonl_texts(folder / "seed_tasks.jsonl")
            + _jsonl_texts(folder / "user_oriented_instructions.jsonl"))


DATASETS: dict[str, Callable[[Mapping[str, str] | None], list[str]]] = {
    "banking77": lambda env: [text for text, _ in read_banking77(env)],
    "paws_wiki": _paws,
    "stsb_train": lambda env: _stsb_sentences("sts-train.csv", env),
    "stsb_dev": lambda env: _stsb_sentences("sts-dev.csv", env),
    "self_instruct": _self_instruct,
    "arena_hard": lambda env: _jsonl_texts(data_dir(env) / "arena_hard" / "arena-hard-v0.1_question.jsonl"),
    "mt_bench": lambda env: _jsonl_texts(data_dir(env) / "mt_bench" / "mt_bench_question.jsonl"),
}
"""Text sources by name: a function of the environment returning the texts."""


def read_texts(source: str, env: Mapping[str, str] | None = None) -> list[str]:
    """Texts of one source (data set name or text file).

    Raises:
        CompressionError: unknown source, missing file, or a file that holds no text.
    """
    if source in DATASETS:
        return DATASETS[source](env)
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if suffix == ".txt":
        texts = [line.rstrip("\n") for line in _require(path).read_text(encoding="utf-8").splitlines()]
    elif suffix == ".jsonl":
        texts = _jsonl_texts(path)
    elif suffix == ".csv":
        with open(_require(path), encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "text" not in reader.fieldnames:
                raise CompressionError(f"{path} has no 'text' column", path=str(path))
            texts = [row["text"] for row in reader]
    else:
        raise CompressionError(f"source {source!r} is not a data set ({', '.join(sorted(DATASETS))}) "
                               "nor a .txt, .jsonl or .csv file", source=source)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CompressionError(f"source {source!r} holds no text", source=source)
    return texts


def sentences(sources: Iterable[str], *, limit: int | None = None, seed: int | None = None,
              env: Mapping[str, str] | None = None) -> list[str]:
    """Deduplicated texts of several sources; shuffled with ``seed`` when given, then cut to ``limit``."""
    merged: dict[str, None] = {}
    for source in sources:
        for text in read_texts(source, env):
            merged.setdefault(text, None)
    texts = list(merged)
    if seed is not None:
        random.Random(seed).shuffle(texts)
    return texts[:limit] if limit is not None else texts


def read_arrays(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Numeric arrays of a ``.npy`` (as ``x``) or ``.npz`` file, checked finite.

    Raises:
        CompressionError: missing or unreadable file, no ``x``, or NaN / infinite values.
    """
    import numpy as np

    file = _require(Path(path))
    try:
        if file.suffix.lower() == ".npy":
            arrays = {"x": np.load(file, allow_pickle=False)}
        elif file.suffix.lower() == ".npz":
            with np.load(file, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        else:
            raise CompressionError(f"{file} is not a .npy or .npz file", path=str(file))
    except CompressionError:
        raise
    except Exception as exc:
        raise CompressionError(f"cannot read arrays from {file}: {exc}", path=str(file)) from None
    if "x" not in arrays:
        raise CompressionError(f"{file} has no array named 'x' (found: {', '.join(arrays) or 'none'})",
                               path=str(file))
    for name, array in arrays.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            bad = int((~np.isfinite(array)).sum())
            raise CompressionError(f"{file}: array {name!r} holds {bad} NaN or infinite values", path=str(file))
    return arrays
