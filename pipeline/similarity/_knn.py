"""Mutual k-nearest-neighbour alignment (Huh et al. 2024, "The Platonic Representation
Hypothesis"): for each row, the share of its k nearest neighbours under one
representation that are also among its k nearest under the other, averaged over rows.

Neighbours are by cosine similarity, the row itself excluded, as in the paper's code
(features L2-normalised, self-similarity masked). The kNN of each layer is computed once,
brute force, a block of query rows at a time, so memory is the layer's rows plus one
block of similarities, not n×n.
"""

from __future__ import annotations

import numpy as np

SIMILARITY_BLOCK_BYTES = 64 * 2**20
"""Bytes of one block of the n×n similarity matrix (float64)."""


def knn_bytes(n: int, width: int, k: int, layers: int) -> int:
    """Peak memory of mutual-knn over ``layers`` layers of ``n`` rows: one layer's rows in
    float32 and float64, a similarity block, and every layer's neighbour lists."""
    block = min(n * n * 8, SIMILARITY_BLOCK_BYTES)
    return n * width * 12 + 2 * block + layers * n * k * 8


def nearest_neighbours(values: np.ndarray, k: int) -> np.ndarray:
    """``(n, k)`` indices of each row's k most cosine-similar other rows, sorted."""
    x = np.asarray(values, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0, norms, 1.0)
    n = len(x)
    step = max(1, SIMILARITY_BLOCK_BYTES // (8 * max(n, 1)))
    out = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, step):
        stop = min(n, start + step)
        sim = x[start:stop] @ x.T
        sim[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        out[start:stop] = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    out.sort(axis=1)
    return out


def mutual_knn(knn_x: np.ndarray, knn_y: np.ndarray) -> float:
    """Mean over rows of |N_x(i) ∩ N_y(i)| / k for neighbour lists of the same rows."""
    k = knn_x.shape[1]
    both = np.sort(np.concatenate([knn_x, knn_y], axis=1), axis=1)
    # Each list holds distinct rows, so a value seen twice is in both lists.
    shared = (np.diff(both, axis=1) == 0).sum(axis=1)
    return float(shared.mean() / k)
