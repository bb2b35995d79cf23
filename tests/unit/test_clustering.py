"""Clustering: every row in exactly one cluster, threshold and size respected, exact and coarse paths agree."""

from __future__ import annotations

import numpy as np
import pytest

from workers.clustering import cluster


def _normalized(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _noisy_copies(rng: np.random.Generator, centers: int, copies: int, noise: float) -> np.ndarray:
    base = rng.standard_normal((centers, 64))
    rows = np.repeat(base, copies, axis=0) + noise * rng.standard_normal((centers * copies, 64))
    return _normalized(rows[rng.permutation(len(rows))])


def test_every_row_is_in_exactly_one_cluster() -> None:
    vectors = _noisy_copies(np.random.default_rng(0), centers=50, copies=5, noise=0.05)
    clusters = cluster(vectors, threshold=0.85, max_size=16)
    assert sorted(i for c in clusters for i in c) == list(range(len(vectors)))


def test_members_are_similar_to_their_leader_and_sizes_are_bounded() -> None:
    vectors = _noisy_copies(np.random.default_rng(1), centers=10, copies=40, noise=0.05)
    clusters = cluster(vectors, threshold=0.9, max_size=16)
    for members in clusters:
        assert len(members) <= 16
        assert members == sorted(members)
        leader = vectors[members[0]]
        assert all(float(vectors[m] @ leader) >= 0.9 for m in members)
    # 10 groups of 40 near-copies: each needs 3 clusters of at most 16.
    assert len(clusters) == 30


def test_dissimilar_rows_stay_alone() -> None:
    vectors = _normalized(np.eye(8, dtype=np.float32))
    assert cluster(vectors, threshold=0.5, max_size=4) == [[i] for i in range(8)]


def _pairs(clusters: list[list[int]]) -> set[tuple[int, int]]:
    return {(a, b) for c in clusters for a in c for b in c if a < b}


def test_coarse_path_keeps_almost_every_group_of_the_exact_path() -> None:
    vectors = _noisy_copies(np.random.default_rng(2), centers=300, copies=10, noise=0.02)
    exact = cluster(vectors, threshold=0.9, max_size=16, exact_limit=10**9)
    coarse = cluster(vectors, threshold=0.9, max_size=16, exact_limit=100)
    assert sorted(i for c in coarse for i in c) == list(range(len(vectors)))
    exact_pairs, coarse_pairs = _pairs(exact), _pairs(coarse)
    assert coarse_pairs <= exact_pairs  # never merges what the exact path keeps apart
    assert len(coarse_pairs) >= 0.9 * len(exact_pairs)


def test_empty_input_and_bad_size() -> None:
    assert cluster(np.zeros((0, 8), dtype=np.float32), threshold=0.8, max_size=4) == []
    with pytest.raises(ValueError):
        cluster(_normalized(np.ones((2, 8))), threshold=0.8, max_size=0)
