"""Clustering of normalized embeddings by cosine similarity, vectorised and bounded in memory.

``cluster`` groups vectors so that every member of a cluster has cosine >= ``threshold`` to its
leader (the cluster's first, oldest item) and no cluster holds more than ``max_size`` items.

Up to ``exact_limit`` vectors are clustered exactly (one similarity matrix, in row blocks).
Above it, vectors are first split into coarse cells by a few rounds of spherical k-means on a
sample (an inverted-file index, as in IVF search), and clustered exactly inside each cell: time
grows as ``N * sqrt(N) * d`` instead of ``N^2 * d``, and memory stays at one block of rows.
Pairs split across two cells can be missed; that costs a little grouping, never correctness.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np

EXACT_LIMIT = 2048
ROW_BLOCK = 1024
KMEANS_ROUNDS = 3
KMEANS_SAMPLE = 4096
ROWS_PER_CELL = 2.0  # cells hold about ROWS_PER_CELL * sqrt(N) rows


def cluster(vectors: np.ndarray, *, threshold: float, max_size: int,
            exact_limit: int = EXACT_LIMIT, seed: int = 0) -> list[list[int]]:
    """Group row indices of ``vectors`` (N x d, L2-normalized float32).

    Args:
        vectors: one normalized embedding per row, in arrival order (earlier rows lead).
        threshold: cosine similarity to the leader for an item to join its cluster.
        max_size: most items per cluster.
        exact_limit: above this many rows, cluster inside coarse cells.
        seed: seed of the coarse k-means (results are deterministic for a given seed).

    Returns:
        Clusters as lists of row indices, each in arrival order; every row is in exactly one.
    """
    n = len(vectors)
    if n == 0:
        return []
    if max_size < 1:
        raise ValueError("max_size must be at least 1")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if n <= exact_limit:
        return _leader_clusters(vectors, np.arange(n), threshold, max_size)
    cells = _coarse_cells(vectors, n_cells=max(1, int(math.sqrt(n) / ROWS_PER_CELL)), seed=seed)
    clusters: list[list[int]] = []
    for members in cells:
        if len(members):
            clusters.extend(_leader_clusters(vectors, members, threshold, max_size))
    clusters.sort(key=lambda c: c[0])
    return clusters


def _leader_clusters(vectors: np.ndarray, rows: np.ndarray, threshold: float,
                     max_size: int) -> list[list[int]]:
    """Exact greedy leader clustering of ``vectors[rows]`` in row order.

    Similar pairs are found with one thresholded matrix product per block of rows; the greedy
    pass then walks plain lists, so rows without a similar partner cost almost nothing.
    """
    sub = vectors[rows]
    m = len(rows)
    firsts: list[np.ndarray] = []
    seconds: list[np.ndarray] = []
    for start in range(0, m, ROW_BLOCK):
        stop = min(m, start + ROW_BLOCK)
        # Similarities of this block's rows to every later row: leaders only look forward.
        ii, jj = np.nonzero(sub[start:stop] @ sub[start:].T >= threshold)
        ii += start
        jj += start
        forward = jj > ii
        firsts.append(ii[forward])
        seconds.append(jj[forward])
    row_ids = rows.tolist()
    first = np.concatenate(firsts)
    if len(first) == 0:
        return [[r] for r in row_ids]
    second = np.concatenate(seconds).tolist()
    # ``first`` is sorted (row-major order), so each row's partners are one slice of ``second``.
    lo = np.searchsorted(first, np.arange(m), side="left").tolist()
    hi = np.searchsorted(first, np.arange(m), side="right").tolist()
    assigned = [False] * m
    clusters: list[list[int]] = []
    for i in range(m):
        if assigned[i]:
            continue
        assigned[i] = True
        members = [i]
        for j in second[lo[i]:hi[i]]:
            if len(members) >= max_size:
                break
            if not assigned[j]:
                assigned[j] = True
                members.append(j)
        clusters.append([row_ids[j] for j in members])
    return clusters


def _coarse_cells(vectors: np.ndarray, *, n_cells: int, seed: int) -> list[np.ndarray]:
    """Split rows into ``n_cells`` cells by spherical k-means trained on a sample."""
    rng = np.random.default_rng(seed)
    n = len(vectors)
    sample = vectors[rng.choice(n, size=min(n, KMEANS_SAMPLE), replace=False)]
    centroids = sample[rng.choice(len(sample), size=n_cells, replace=False)].copy()
    for _ in range(KMEANS_ROUNDS):
        labels = _nearest(sample, centroids)
        order = np.argsort(labels, kind="stable")
        cells, starts = np.unique(labels[order], return_index=True)
        sums = np.add.reduceat(sample[order], starts, axis=0)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        filled = norms[:, 0] > 0
        centroids[cells[filled]] = sums[filled] / norms[filled]
    labels = _nearest(vectors, centroids)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(n_cells + 1))
    return [order[bounds[c]:bounds[c + 1]] for c in range(n_cells)]


def _nearest(rows: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    labels = np.empty(len(rows), dtype=np.int64)
    for start in range(0, len(rows), 8192):
        labels[start:start + 8192] = np.argmax(rows[start:start + 8192] @ centroids.T, axis=1)
    return labels


@contextlib.contextmanager
def cpu_threads(threads: int) -> Iterator[None]:
    """Limit BLAS threads for the block (``threads <= 0``: leave the library default)."""
    if threads <= 0:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads, user_api="blas"):
        yield
