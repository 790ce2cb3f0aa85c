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

All features of a pass are summed together, as few large matrix products per block
(``Layout``): a pass's cross products are one BLAS call on the features laid side by
side, not one small product per pair of layers, which measured 30x slower than reading
the rows. The products accumulate in place (``beta = 1``), so the sums need no scratch
copy of their own size.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

Pair = tuple[int, int]


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


@dataclass(frozen=True)
class Layout:
    """How a pass computes the cross products its pairs need.

    ``full``: one ``XᵀX`` of all features side by side, a symmetric rank-k update (half
    the multiplications of a general product): a store against itself, where nearly
    every pair is wanted. Otherwise one general product ``left`` × ``right`` (disjoint
    lists of features) and each feature of ``own`` with itself: two stores, A's layers by
    B's plus every layer's own Gram, without the A × A and B × B pairs nobody asked for.
    """

    widths: tuple[int, ...]
    full: bool
    left: tuple[int, ...] = ()
    right: tuple[int, ...] = ()
    own: tuple[int, ...] = ()

    @property
    def order(self) -> tuple[int, ...]:
        """Features in the order their columns lie side by side in a block."""
        if self.full:
            return tuple(range(len(self.widths)))
        rest = tuple(f for f in self.own if f not in self.left and f not in self.right)
        return self.left + self.right + rest

    def width(self, feats: Iterable[int]) -> int:
        return sum(self.widths[f] for f in feats)

    @property
    def nbytes(self) -> int:
        """float64 bytes of the sums (the products dominate)."""
        d, f = sum(self.widths), len(self.widths)
        products = d * d if self.full else (
            self.width(self.left) * self.width(self.right) + sum(self.widths[g] ** 2 for g in self.own))
        return 8 * (products + f * f + f * d + 2 * d + f)


def layout(widths: Sequence[int], pairs: Iterable[Pair]) -> Layout:
    """The cheaper of the two layouts for ``pairs`` (by multiplications per row)."""
    pairs = list(pairs)
    off = [(u, v) for u, v in pairs if u != v]
    left = tuple(sorted({u for u, _ in off}))
    right = tuple(sorted({v for _, v in off}))
    own = tuple(sorted({u for u, v in pairs if u == v}))
    split = Layout(tuple(widths), False, left, right, own)
    if set(left) & set(right):
        return Layout(tuple(widths), True)
    cost_split = split.width(left) * split.width(right) + sum(widths[f] ** 2 for f in own) / 2
    return Layout(tuple(widths), True) if sum(widths) ** 2 / 2 < cost_split else split


def pass_bytes(widths: Sequence[int], pairs: Iterable[Pair]) -> int:
    """Memory of the sums of one pass over features ``widths`` for ``pairs``."""
    return layout(widths, pairs).nbytes


class Moments:
    """The running sums of one pass: ``add`` each block of rows, then ``result``."""

    def __init__(self, widths: Sequence[int], pairs: Sequence[Pair]) -> None:
        self.layout = lay = layout(widths, pairs)
        self.pairs = list(pairs)
        self.cols: dict[int, slice] = {}
        at = 0
        for f in lay.order:
            self.cols[f] = slice(at, at + widths[f])
            at += widths[f]
        n_feats = len(widths)
        self.n = 0
        self.shift: np.ndarray | None = None
        self.total = np.zeros(at)  # Σ x' (shifted), all features side by side
        self.norms = np.zeros(n_feats)  # Σ aᵢ per feature, aᵢ = ‖x'ᵢ‖²
        self.aa = np.zeros((n_feats, n_feats))  # Σ aᵢ bᵢ for every pair of features
        self.ax = np.zeros((n_feats, at))  # Σ aᵢ y'ᵢ for every feature and column
        self.left = lay.width(lay.left)
        # Fortran order: a block's columns of one feature are then one contiguous slice,
        # which BLAS reads in place, and the products accumulate into these in place.
        if lay.full:
            self.gram = np.zeros((at, at), order="F")  # upper triangle only
        else:
            self.gram = np.zeros((self.left, lay.width(lay.right)), order="F")
        self.owns = {f: np.zeros((widths[f],) * 2, order="F") for f in lay.own if not lay.full}
        self._x = np.empty((0, at), order="F")

    def add(self, values: Sequence[np.ndarray]) -> None:
        """One block: ``values[f]`` the ``(m, width)`` rows of feature f, the same rows
        for every feature."""
        from scipy.linalg import blas

        m = len(values[0])
        if m == 0:
            return
        if len(self._x) != m:  # a slice of a taller buffer would not be contiguous for BLAS
            self._x = np.empty((m, len(self.total)), order="F")
        x = self._x
        if self.shift is None:
            self.shift = np.empty(len(self.total))
            for f, c in self.cols.items():
                self.shift[c] = np.mean(values[f], axis=0, dtype=np.float64)
        a = np.empty((m, len(self.norms)))
        for f, c in self.cols.items():
            np.subtract(values[f], self.shift[c], out=x[:, c])  # widened exactly, then shifted
            a[:, f] = np.einsum("ij,ij->i", x[:, c], x[:, c])
        self.n += m
        self.total += x.sum(axis=0)
        self.norms += a.sum(axis=0)
        self.aa += a.T @ a
        self.ax += a.T @ x
        if self.layout.full:
            self.gram = blas.dsyrk(1.0, x, beta=1.0, c=self.gram, trans=1, overwrite_c=1)
            return
        if self.gram.size:
            self.gram = blas.dgemm(1.0, x[:, :self.left], x[:, self.left:self.left + self.gram.shape[1]],
                                   beta=1.0, c=self.gram, trans_a=1, overwrite_c=1)
        for f, own in self.owns.items():
            c = self.cols[f]
            self.owns[f] = blas.dsyrk(1.0, x[:, c], beta=1.0, c=own, trans=1, overwrite_c=1)

    def _gram(self, u: int, v: int) -> np.ndarray:
        """X'ᵤᵀX'ᵥ, uncentred (shifted)."""
        cu, cv = self.cols[u], self.cols[v]
        if u == v:
            g = self.gram[cu, cu] if self.layout.full else self.owns[u]
            return np.triu(g) + np.triu(g, 1).T  # the rank-k update fills the upper triangle
        if cu.start > cv.start:
            return self._gram(v, u).T
        if self.layout.full:
            return self.gram[cu, cv]
        return self.gram[cu, cv.start - self.left:cv.stop - self.left]

    def result(self) -> dict[Pair, PairSums]:
        return {(u, v): self._centre(u, v) for u, v in self.pairs}

    def _centre(self, u: int, v: int) -> PairSums:
        n = self.n
        if n == 0:
            return PairSums(0, float("nan"), float("nan"), float("nan"), float("nan"))
        cu, cv = self.cols[u], self.cols[v]
        gram = self._gram(u, v)
        mu, mv = self.total[cu] / n, self.total[cv] / n
        cross = gram - n * np.outer(mu, mv)
        mu2, mv2 = float(mu @ mu), float(mv @ mv)
        nu, nv = float(self.norms[u]), float(self.norms[v])
        diag = (float(self.aa[u, v]) - 2 * float(self.ax[u, cv] @ mv)
                - 2 * float(self.ax[v, cu] @ mu) + 4 * float(mu @ gram @ mv)
                + mv2 * nu + mu2 * nv - 3 * n * mu2 * mv2)
        return PairSums(n, float(np.sum(cross * cross)), diag, nu - n * mu2, nv - n * mv2)


def accumulate(blocks: Iterable[Sequence[np.ndarray]], widths: Sequence[int],
               pairs: Sequence[Pair]) -> dict[Pair, PairSums]:
    """Sums of every pair ``(u, v)`` of feature indices over aligned row blocks.

    ``blocks`` yields, per block, one ``(m, widths[f])`` array per feature, all for the
    same rows in the same order.
    """
    moments = Moments(widths, pairs)
    for block in blocks:
        moments.add(block)
    return moments.result()


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
