"""Direct in-memory implementations the streamed ones must equal."""

from __future__ import annotations

import numpy as np


def cka(x: np.ndarray, y: np.ndarray) -> float:
    # Widen before taking the means: a float32 mean of features near ±200 is off by
    # about 1e-5, which moved this reference by 4e-8 on 20,000 rows.
    x, y = x.astype(np.float64), y.astype(np.float64)
    x, y = x - x.mean(0), y - y.mean(0)
    return float(np.linalg.norm(y.T @ x) ** 2
                 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def unbiased_hsic(kx: np.ndarray, ky: np.ndarray) -> float:
    """Song et al. (2012), eq. 5, on the n×n kernels, diagonals zeroed."""
    n = len(kx)
    kx, ky = kx.copy(), ky.copy()
    np.fill_diagonal(kx, 0)
    np.fill_diagonal(ky, 0)
    one = np.ones(n)
    return float((np.trace(kx @ ky) + (one @ kx @ one) * (one @ ky @ one) / ((n - 1) * (n - 2))
                  - 2 / (n - 2) * (one @ kx @ ky @ one)) / (n * (n - 3)))


def cka_debiased(x: np.ndarray, y: np.ndarray) -> float:
    """On the uncentred linear kernels, as the estimator is defined."""
    kx = x.astype(np.float64) @ x.astype(np.float64).T
    ky = y.astype(np.float64) @ y.astype(np.float64).T
    return unbiased_hsic(kx, ky) / np.sqrt(unbiased_hsic(kx, kx) * unbiased_hsic(ky, ky))


def mutual_knn(x: np.ndarray, y: np.ndarray, k: int) -> float:
    def neighbours(v: np.ndarray) -> list[set[int]]:
        v = v.astype(np.float64)
        v = v / np.linalg.norm(v, axis=1, keepdims=True)
        sim = v @ v.T
        np.fill_diagonal(sim, -np.inf)
        return [set(row) for row in np.argsort(-sim, axis=1)[:, :k].tolist()]

    nx, ny = neighbours(x), neighbours(y)
    return float(np.mean([len(a & b) / k for a, b in zip(nx, ny, strict=True)]))
