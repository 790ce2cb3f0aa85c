"""Exact linear CKA from float64 sums over one streamed pass.

For features X (n, d_u) and Y (n, d_v) on the same rows, every quantity that biased and
debiased linear CKA need reduces to sums over rows, so a pass over row blocks (in any
order) gives them exactly, up to float64 rounding:

- column sums ``Σx`` and the cross product ``G = XᵀY``: the centred cross product is
  ``XcᵀYc = G − n·μxμyᵀ``, so no second pass for the means;
- for the unbiased HSIC (Song et al. 2012) on the linear kernel ``K = XXᵀ``, the n×n
  terms are ``tr(K̃L̃)``, ``1ᵀK̃1`` and ``1ᵀK̃L̃1`` with ``K̃`` the kernel with its diagonal
  zeroed. The estimator is unchanged by centring the features (checked in the tests), and
  on centred features ``K̃1 = −diag(K)``, so all three come from ``‖XcᵀYc‖_F²``,
  ``tr(Kc)`` and ``S = Σᵢ‖x̃ᵢ‖²‖ỹᵢ‖²``; S expands into sums over rows of the
  uncentred norms ``aᵢ = ‖xᵢ‖²``: ``Σaᵢbᵢ``, ``Σaᵢyᵢ``, ``Σbᵢxᵢ``, ``Σaᵢ`` and G.

Each feature is shifted by the mean of its first block before summing. Centred
quantities do not change under a shift, and the shift keeps the sums near zero, so the
float64 subtractions above do not cancel away the digits (activations carry dimensions
with means in the hundreds).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Feature:
    shift: np.ndarray | None = None
    total: np.ndarray | None = None  # Σ x' (shifted)
    norms: float = 0.0  # Σ ‖x'ᵢ‖²


@dataclass
class _Pair:
    gram: np.ndarray  # X'ᵀY'
    ab: float = 0.0  # Σ aᵢ bᵢ
    a_y: np.ndarray = field(default_factory=lambda: np.zeros(0))  # Σ aᵢ y'ᵢ
    b_x: np.ndarray = field(default_factory=lambda: np.zeros(0))  # Σ bᵢ x'ᵢ


@dataclass(frozen=True)
class PairSums:
    """The centred sums of one pair of features, all that CKA needs of it."""

    n: int
    cross: float
    """‖XcᵀYc‖_F² (for a feature with itself, ‖XcᵀXc‖_F²)."""
    diag: float
    """Σᵢ ‖x̃ᵢ‖² ‖ỹᵢ‖² over centred rows."""
    trace_x: float
    """tr(Kc) = ‖Xc‖_F²."""
    trace_y: float


def pair_bytes(width_u: int, width_v: int) -> int:
    """Memory of one pair's sums (the d_u × d_v float64 cross product dominates)."""
    return 8 * (width_u * width_v + width_u + width_v)


def accumulate(blocks: Iterable[Sequence[np.ndarray]], widths: Sequence[int],
               pairs: Sequence[tuple[int, int]]) -> dict[tuple[int, int], PairSums]:
    """Sums of every pair ``(u, v)`` of feature indices over aligned row blocks.

    ``blocks`` yields, per block, one ``(m, widths[f])`` array per feature, all for the
    same rows in the same order.
    """
    feats = [_Feature() for _ in widths]
    sums = {p: _Pair(np.zeros((widths[p[0]], widths[p[1]]))) for p in pairs}
    used = sorted({f for p in pairs for f in p})
    n = 0
    for block in blocks:
        m = len(block[used[0]]) if used else 0
        if m == 0:
            continue
        n += m
        x: dict[int, np.ndarray] = {}
        a: dict[int, np.ndarray] = {}
        for f in used:
            values = np.asarray(block[f], dtype=np.float64)
            state = feats[f]
            if state.shift is None:
                state.shift = values.mean(axis=0)
                state.total = np.zeros(widths[f])
            x[f] = values - state.shift
            a[f] = np.einsum("ij,ij->i", x[f], x[f])
            state.total += x[f].sum(axis=0)
            state.norms += float(a[f].sum())
        for (u, v), s in sums.items():
            s.gram += x[u].T @ x[v]
            s.ab += float(a[u] @ a[v])
            if not s.a_y.size:
                s.a_y, s.b_x = np.zeros(widths[v]), np.zeros(widths[u])
            s.a_y += a[u] @ x[v]
            s.b_x += a[v] @ x[u]
    return {p: _centre(s, feats[p[0]], feats[p[1]], n) for p, s in sums.items()}


def _centre(s: _Pair, fu: _Feature, fv: _Feature, n: int) -> PairSums:
    if n == 0 or fu.total is None or fv.total is None:
        return PairSums(n, float("nan"), float("nan"), float("nan"), float("nan"))
    mu, mv = fu.total / n, fv.total / n
    cross = s.gram - n * np.outer(mu, mv)
    mu2, mv2 = float(mu @ mu), float(mv @ mv)
    diag = (s.ab - 2 * float(s.a_y @ mv) - 2 * float(s.b_x @ mu)
            + 4 * float(mu @ s.gram @ mv) + mv2 * fu.norms + mu2 * fv.norms
            - 3 * n * mu2 * mv2)
    return PairSums(n, float(np.sum(cross * cross)), diag,
                    fu.norms - n * mu2, fv.norms - n * mv2)


def cka(xy: PairSums, xx: PairSums, yy: PairSums) -> float:
    """Linear CKA ``‖XcᵀYc‖_F² / (‖XcᵀXc‖_F ‖YcᵀYc‖_F)``."""
    denominator = np.sqrt(xx.cross) * np.sqrt(yy.cross)
    return float(xy.cross / denominator) if denominator > 0 else float("nan")


def unbiased_hsic(s: PairSums) -> float:
    """Song et al. (2012), eq. 5, on linear kernels, from the centred sums (n ≥ 4):
    ``[tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3))``, where on centred
    features ``tr(K̃L̃) = cross − diag``, ``1ᵀK̃1 = −tr(Kc)`` and ``1ᵀK̃L̃1 = diag``."""
    n = s.n
    return ((s.cross - s.diag) + s.trace_x * s.trace_y / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * s.diag) / (n * (n - 3))


def cka_debiased(xy: PairSums, xx: PairSums, yy: PairSums) -> float:
    """CKA with each HSIC replaced by the unbiased estimator."""
    denominator = unbiased_hsic(xx) * unbiased_hsic(yy)
    return float(unbiased_hsic(xy) / np.sqrt(denominator)) if denominator > 0 else float("nan")
