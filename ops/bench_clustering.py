"""Clustering benchmark: time and peak memory of ``workers.clustering.cluster`` against the naive
full similarity matrix, and the quality of the clusters on Banking77 intents.

Usage: ``python -m ops.bench_clustering [--repeats 5] [--sizes 1000,10000,100000] [--out PATH]``.

Vectors (384-d, L2-normalized float32):

- ``real``: all-MiniLM-L6-v2 embeddings (the grouper's default encoder) of 10,000 real sentences
  (6,000 Banking77 queries, 2,000 PAWS-Wiki dev sentences, 2,000 STS-B dev sentences, shuffled
  with a fixed seed), embedded once and cached under ``--cache-dir``. The 100,000 set tiles them
  ten times with Gaussian noise (sigma 0.015 per dimension, renormalized; the cosine between two noisy copies
  of one sentence is printed): each sentence comes back as ten near-copies, 10,000 rows apart.
- ``random``: Gaussian random directions (no two rows similar: the no-partner case).

Methods, both at threshold 0.85 and clusters of at most 16:

- ``cohort``: ``workers.clustering.cluster`` (exact leader clustering up to 2,048 rows, coarse
  cells above).
- ``naive``: the full N x N similarity matrix, then a greedy leader pass over its rows (run up to
  10,000 rows only: at 100,000 the matrix alone would take 40 GB).

Both run twice: with numpy's default BLAS threads (two here) and with BLAS limited to one
thread (``threadpoolctl``), because on two shared cores the threads of a small matrix product
wait for each other whenever the other core is busy (the encoder, the workers, Redis).

Time is the median of ``--repeats`` runs after one warm-up. Peak memory is measured in a separate,
untimed run with ``tracemalloc`` (numpy reports its array allocations to it): the peak of
memory allocated during the call above what was allocated before it (the input excluded).

Quality: Banking77 queries (all 10,003, shuffled with a fixed seed, because the file is sorted by
intent), cut into consecutive pending windows of 200 and 1,000 items, each window clustered as the
grouper does it. Reported per threshold: mean cluster size, clusters per prompt (the calls if each
cluster were one call), purity (share of prompts in their cluster's majority intent), the share of
multi-prompt clusters that mix intents, and the same two figures for the batches of at most 16 the
grouper forms by packing whole clusters side by side (as ``Grouper._flush_partition`` does when
the wait runs out): each question of such a batch is answered on its own (one call, or one
numbered question of a packed call where packing pays), so batches may mix intents by design.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import hashlib
import os
import random
import statistics
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ops.workloads import banking77, data_dir
from workers.clustering import cluster

THRESHOLD = 0.85
MAX_SIZE = 16
TILE_SIGMA = 0.015
DEFAULT_CACHE = Path("/tmp/grouping-bench/embeddings")
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "clustering.md"
NAIVE_LIMIT = 10_000


# --- embeddings, cached per text -------------------------------------------------------------
def embed_cached(texts: Sequence[str], cache_dir: Path = DEFAULT_CACHE, *, log: bool = True) -> np.ndarray:
    """Embeddings of ``texts`` by the grouper's default encoder, reusing vectors cached in ``cache_dir``
    (a directory per encoder and precision).

    The cache holds ``.npz`` chunks of (text sha1, vector); texts not found are embedded and
    written as a new chunk. Used by every grouping benchmark so that each text is embedded once.
    """
    from workers.encoder import Encoder
    from workers.settings import GroupingSettings

    encoder = Encoder.for_grouping(GroupingSettings())  # the default encoder, int8 where the CPU has VNNI
    cache_dir = cache_dir / encoder.cache_tag
    cache_dir.mkdir(parents=True, exist_ok=True)
    known: dict[str, np.ndarray] = {}
    for chunk in sorted(cache_dir.glob("chunk-*.npz")):
        with np.load(chunk) as data:
            known.update(zip(data["hashes"].tolist(), data["vectors"], strict=True))
    hashes = [hashlib.sha1(t.encode()).hexdigest() for t in texts]
    missing = list(dict.fromkeys(h for h in hashes if h not in known))
    if missing:
        by_hash = dict(zip(hashes, texts, strict=True))
        started = time.perf_counter()
        vectors = encoder.encode([by_hash[h] for h in missing])
        if log:
            print(f"embedded {len(missing)} texts in {time.perf_counter() - started:.1f} s "
                  f"(cached in {cache_dir})", file=sys.stderr)
        name = cache_dir / f"chunk-{int(time.time() * 1000)}-{os.getpid()}.npz"
        np.savez(name, hashes=np.array(missing), vectors=vectors)
        known.update(zip(missing, vectors, strict=True))
    return np.vstack([known[h] for h in hashes]).astype(np.float32)


def paws_dev() -> list[tuple[str, str, int]]:
    """PAWS-Wiki dev pairs: (sentence1, sentence2, label 1 = paraphrase)."""
    with (data_dir() / "paws_wiki" / "dev.tsv").open(encoding="utf-8", newline="") as fh:
        return [(r["sentence1"], r["sentence2"], int(r["label"]))
                for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]


def stsb_dev() -> list[tuple[str, str, float]]:
    """STS-B dev pairs: (sentence1, sentence2, score 0-5)."""
    rows = []
    with (data_dir() / "stsb" / "sts-dev.csv").open(encoding="utf-8", newline="") as fh:
        for fields in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            rows.append((fields[5], fields[6], float(fields[4])))
    return rows


def real_sentences(seed: int = 0) -> list[str]:
    """10,000 real sentences: 6,000 Banking77, 2,000 PAWS dev, 2,000 STS-B dev, shuffled."""
    texts = [p.text for p in banking77()][:6000]
    texts += [s1 for s1, _s2, _label in paws_dev()[:2000]]
    stsb = stsb_dev()
    texts += [s1 for s1, _s2, _score in stsb] + [s2 for _s1, s2, _score in stsb[:500]]
    random.Random(seed).shuffle(texts)
    return texts[:10_000]


def normalized(rows: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rows / np.linalg.norm(rows, axis=1, keepdims=True), dtype=np.float32)


def tiled(base: np.ndarray, n: int, *, sigma: float = TILE_SIGMA, seed: int = 0) -> np.ndarray:
    """``n`` rows: copies of ``base`` with Gaussian noise, renormalized (copy after copy)."""
    rng = np.random.default_rng(seed)
    copies = -(-n // len(base))
    rows = np.tile(base, (copies, 1))[:n]
    return normalized(rows + rng.standard_normal(rows.shape, dtype=np.float32) * sigma)


def random_vectors(n: int, dim: int = 384, *, seed: int = 0) -> np.ndarray:
    return normalized(np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32))


# --- the baseline --------------------------------------------------------------------------
def naive_cluster(vectors: np.ndarray, *, threshold: float, max_size: int) -> list[list[int]]:
    """Full N x N similarity matrix, then greedy leaders in row order (the textbook approach)."""
    sims = vectors @ vectors.T
    n = len(vectors)
    assigned = np.zeros(n, dtype=bool)
    clusters: list[list[int]] = []
    for i in range(n):
        if assigned[i]:
            continue
        assigned[i] = True
        partners = np.flatnonzero(sims[i, i + 1:] >= threshold) + i + 1
        partners = partners[~assigned[partners]][:max_size - 1]
        assigned[partners] = True
        clusters.append([i, *partners.tolist()])
    return clusters


# --- measurement -----------------------------------------------------------------------------
def timed(fn: Callable[[], list[list[int]]], repeats: int) -> tuple[float, list[list[int]]]:
    """Median seconds of ``repeats`` calls after one warm-up, and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of memory allocated during ``fn()`` above what was allocated before (tracemalloc)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def blas_threads(limit: int | None) -> contextlib.AbstractContextManager[object]:
    """Limit numpy's BLAS threads inside the block (``None``: leave numpy's default)."""
    if limit is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=limit, user_api="blas")


def speed_table(sets: dict[str, dict[int, np.ndarray]], repeats: int,
                thread_settings: Sequence[int | None]) -> tuple[list[str], dict[tuple[str, int, int | None], float]]:
    rows = ["| vectors | N | BLAS threads | cohort `cluster` ms | cohort peak MiB | naive N x N ms | naive peak MiB | "
            "speed-up | clusters (cohort / naive) |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    medians: dict[tuple[str, int, int | None], float] = {}
    for threads in thread_settings:
        label = "numpy default" if threads is None else str(threads)
        for name, by_size in sets.items():
            for n, vectors in by_size.items():
                reps = repeats if n <= 10_000 else max(1, repeats // 2)
                ours_fn = functools.partial(cluster, vectors, threshold=THRESHOLD, max_size=MAX_SIZE)
                naive_fn = functools.partial(naive_cluster, vectors, threshold=THRESHOLD, max_size=MAX_SIZE)
                with blas_threads(threads):
                    ours_s, ours = timed(ours_fn, reps)
                    ours_mem = peak_bytes(ours_fn)
                    if n <= NAIVE_LIMIT:
                        base_s, base = timed(naive_fn, max(1, reps // 2 + 1))
                        base_mem = peak_bytes(naive_fn)
                medians[(name, n, threads)] = ours_s
                if n <= NAIVE_LIMIT:
                    naive_cells = (f"{base_s * 1000:.1f}", _mib(base_mem), f"{base_s / ours_s:.1f}x",
                                   f"{len(ours)} / {len(base)}")
                else:
                    naive_cells = ("not run", f"~{n * n * 4 / 2**30:.0f} GiB (matrix alone)", "-",
                                   f"{len(ours)} / -")
                rows.append(f"| {name} | {n:,} | {label} | {ours_s * 1000:.1f} | {_mib(ours_mem)} | {naive_cells[0]} | "
                            f"{naive_cells[1]} | {naive_cells[2]} | {naive_cells[3]} |")
                print(rows[-1], file=sys.stderr)
    return rows, medians


# --- quality -----------------------------------------------------------------------------------
def _mixing(groups: list[list[int]], labels: list[str]) -> tuple[float, float, int]:
    """(purity over prompts, share of multi-prompt groups mixing labels, number of multi-prompt groups)."""
    majority = 0
    multi = mixed = 0
    for g in groups:
        counts = Counter(labels[i] for i in g)
        majority += counts.most_common(1)[0][1]
        if len(g) > 1:
            multi += 1
            mixed += len(counts) > 1
    total = sum(len(g) for g in groups)
    return majority / total, (mixed / multi if multi else 0.0), multi


def packed_batches(clusters: list[list[int]], size: int) -> list[list[int]]:
    """Whole clusters side by side, in order of their oldest item, into batches of at most ``size``.

    Mirrors the grouper's flush of a partition whose wait ran out: full clusters go alone, the
    rest are packed in arrival order of their leaders.
    """
    batches = [c for c in clusters if len(c) == size]
    rest = sorted((c for c in clusters if len(c) < size), key=lambda c: c[0])
    current: list[int] = []
    for c in rest:
        if len(current) + len(c) > size:
            batches.append(current)
            current = []
        current = current + c
    if current:
        batches.append(current)
    return batches


def quality_table(vectors: np.ndarray, labels: list[str], thresholds: Sequence[float],
                  windows: Sequence[int]) -> list[str]:
    rows = ["| threshold | window | mean cluster size | clusters per prompt | cluster purity | "
            "multi-prompt clusters mixing intents | batches (<=16) per prompt | batch purity | "
            "batches mixing intents |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for window in windows:
        for threshold in thresholds:
            clusters: list[list[int]] = []
            batches: list[list[int]] = []
            for start in range(0, len(vectors) - window + 1, window):
                local = cluster(vectors[start:start + window], threshold=threshold, max_size=MAX_SIZE)
                shifted = [[start + i for i in c] for c in local]
                clusters += shifted
                batches += packed_batches(shifted, MAX_SIZE)
            n = sum(len(c) for c in clusters)
            purity, mixed, multi = _mixing(clusters, labels)
            b_purity, b_mixed, _ = _mixing(batches, labels)
            mark = " (default)" if threshold == THRESHOLD else ""
            rows.append(f"| {threshold:.2f}{mark} | {window:,} | {n / len(clusters):.2f} | {len(clusters) / n:.3f} | "
                        f"{purity:.3f} | {mixed:.1%} of {multi:,} | {len(batches) / n:.3f} | {b_purity:.3f} | "
                        f"{b_mixed:.1%} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="pending vectors per run (comma-separated)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure (median reported)")
    parser.add_argument("--thresholds", default="0.6,0.7,0.8,0.85,0.9,0.95", help="quality thresholds")
    parser.add_argument("--windows", default="200,1000", help="pending windows for the quality table")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="embedding cache directory")
    parser.add_argument("--no-single-thread", dest="single_thread", action="store_false",
                        help="skip the second pass with numpy's BLAS limited to one thread")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown report to write")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]

    real = embed_cached(real_sentences(), args.cache_dir)
    shuffled = banking77()
    random.Random(0).shuffle(shuffled)
    b77 = embed_cached([p.text for p in shuffled], args.cache_dir)
    real_sets = {n: real[:n] if n <= len(real) else tiled(real, n) for n in sizes}
    copies = tiled(real[:2000], 4000, seed=1)
    copy_cos = float(np.median(np.sum(copies[:2000] * copies[2000:], axis=1)))
    random_sets = {n: random_vectors(n) for n in sizes}

    thread_settings: list[int | None] = [None]
    if args.single_thread:
        thread_settings.append(1)
    table, medians = speed_table({"real": real_sets, "random": random_sets}, args.repeats, thread_settings)

    lines = [
        "# Clustering benchmark",
        "",
        f"`python -m ops.bench_clustering --sizes {args.sizes} --repeats {args.repeats}` on "
        f"{os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f} at the start: the cores are shared), "
        f"numpy {np.__version__}. "
        f"Threshold {THRESHOLD}, clusters of at most {MAX_SIZE}. Time: median of {args.repeats} runs "
        "(half as many at 100,000 and for the naive baseline) after a warm-up. Peak memory: tracemalloc, "
        "allocations during the call above the input, in a separate untimed run.",
        "",
        "`real`: all-MiniLM-L6-v2 embeddings of 6,000 Banking77 + 2,000 PAWS dev + 2,000 STS-B dev sentences "
        f"(shuffled); above 10,000 they are tiled with noise sigma {TILE_SIGMA} per dimension "
        f"(median cosine between two noisy copies of one sentence: {copy_cos:.3f}). `random`: Gaussian directions.",
        "",
        *table,
        "",
    ]
    for threads in thread_settings:
        if ("real", 10_000, threads) in medians:
            ms = medians[("real", 10_000, threads)] * 1000
            label = "numpy's default BLAS threads" if threads is None else f"BLAS limited to {threads} thread"
            lines.append(f"Floor: 10,000 real vectors in under 100 ms, {label}: {ms:.1f} ms, "
                         f"**{'met' if ms < 100 else 'MISSED'}**.")
    lines.append("")
    thresholds = [float(t) for t in args.thresholds.split(",")]
    windows = [int(w) for w in args.windows.split(",")]
    lines += [
        "## Cluster quality on Banking77 intents",
        "",
        f"All {len(shuffled):,} Banking77 train queries, shuffled (seed 0; the file is sorted by intent), cut into "
        "consecutive pending windows; each window clustered by `cluster` (clusters of at most 16). "
        "Purity: share of prompts in their group's majority intent. Batches: whole clusters packed side by side "
        "into batches of at most 16 as the grouper flushes a partition whose wait ran out; each question of a "
        "batch is answered on its own (its own call, or a numbered question of a packed call where packing pays), "
        "so mixing intents there costs nothing in correctness.",
        "",
        *quality_table(b77, [p.label or "" for p in shuffled], thresholds, windows),
        "",
    ]
    report = "\n".join(lines)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
