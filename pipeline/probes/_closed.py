"""Closed-form pieces: per-layer moments, ridge from one Gram pass, difference of means.

Ridge follows scikit-learn's ``Ridge(alpha)`` on standardised features, minimising
``||y - Zw - b||² + alpha ||w||²``. With the C convention of the other probes (inverse L2
strength on a summed loss ``Σ ½ r²``) that is ``alpha = 1 / C``. Targets come from
``ProbeData.targets``: the class indicators (one column, the second class, when binary; one
per class otherwise), or for a regression the numeric label itself. Either way one Gram
pass serves the labels and the control task, and the intercept centres the targets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from actcache.probes._data import Block, BlockSource, ProbeData


@dataclass(frozen=True)
class Moments:
    """Per-layer train statistics of the raw activations, float64."""

    mean: np.ndarray
    """(layers, hidden) train mean."""
    std: np.ndarray
    """(layers, hidden) train standard deviation (ddof 0; 1 where constant)."""
    class_means: np.ndarray
    """(2, layers, classes, hidden) per-class train means: labels, then control labels
    (no classes for a regression)."""


def moments(source: BlockSource, data: ProbeData,
            tap: Callable[[Block], None] | None = None) -> Moments:
    """One pass over the raw train rows: mean, variance and class means per layer.

    ``tap`` sees every raw block of the pass (the out-of-core sample is copied out there).
    """
    n_l, h, k = len(data.layers), data.hidden, data.n_classes
    s1 = np.zeros((n_l, h))
    s2 = np.zeros((n_l, h))
    cls = np.zeros((2, n_l, k, h))
    counts = np.zeros((2, k))
    n = 0
    for block in source.blocks(0):
        if tap is not None:
            tap(block)
        nt = block.n_train
        if nt == 0:
            continue
        rows = block.rows[:nt]
        hots = [np.eye(k)[t[rows]].T for t in (data.y, data.control)] if k else []
        if hots:
            counts += np.stack([hot.sum(1) for hot in hots])
        n += nt
        for i in range(n_l):
            xi = block.x[i, :nt].astype(np.float64)
            s1[i] += xi.sum(0)
            s2[i] += np.einsum("ij,ij->j", xi, xi)
            for j, hot in enumerate(hots):
                cls[j, i] += hot @ xi
    mean = s1 / n
    var = np.maximum(s2 / n - mean * mean, 0.0)
    std = np.sqrt(var)
    # A spread below 1e-12 of the feature's scale is float noise, not signal (MiniLM's last
    # layer has a dimension at ~1e-32): such features are left unscaled.
    std[std <= 1e-12 * np.maximum(1.0, np.abs(mean))] = 1.0
    cls /= np.maximum(counts, 1.0)[:, None, :, None]
    return Moments(mean, std, cls)


def fold(w_z: np.ndarray, b_z: np.ndarray, mom: Moments, layer: int
         ) -> tuple[np.ndarray, np.ndarray]:
    """Standardised-space weights (hidden, out) → raw-space (out, hidden) and bias (out)."""
    w = w_z / mom.std[layer][:, None]
    b = b_z - mom.mean[layer] @ w
    return w.T, b


def unfold(w_raw: np.ndarray, b_raw: np.ndarray, mom: Moments, layer: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """Raw-space (out, hidden) and bias → standardised-space (hidden, out) and bias."""
    w = w_raw.T
    return w * mom.std[layer][:, None], b_raw + mom.mean[layer] @ w


def mean_diff(mom: Moments, task: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Nearest-class-mean probes in raw space: per layer (out, hidden) weight and bias.

    Binary: one row, the difference of the two class means, bias at the midpoint.
    """
    out = []
    for m in mom.class_means[task]:
        w, b = m, -0.5 * (m * m).sum(1)
        if len(m) == 2:
            w, b = (w[1] - w[0])[None], np.array([b[1] - b[0]])
        out.append((w, b))
    return out


@dataclass
class _Gram:
    n: float
    sz: np.ndarray
    zz: np.ndarray
    sy: np.ndarray
    zy: np.ndarray
    yy: np.ndarray

    def __add__(self, o: _Gram) -> _Gram:
        return _Gram(self.n + o.n, self.sz + o.sz, self.zz + o.zz, self.sy + o.sy,
                     self.zy + o.zy, self.yy + o.yy)


def gram_pass(source: Any, data: ProbeData, layers: list[int],
              mom: Moments | None = None) -> list[tuple[_Gram, _Gram]]:
    """Fit-part and validation-part moments of the blocks of ``source`` (a ``BlockSource``,
    or an out-of-core sample; targets: labels, control).

    With ``mom``, blocks hold the raw activations and are standardised here in float64:
    ridge needs that accuracy (the Gram matrices of real hidden states are ill-conditioned,
    and float32 or bf16 standardisation moves the solution far more than its own error).
    Without, blocks are already standardised (good enough for a preconditioner).
    """
    h, t = data.hidden, data.n_targets
    parts = [[_Gram(0.0, np.zeros(h), np.zeros((h, h)), np.zeros(2 * t), np.zeros((h, 2 * t)),
                    np.zeros(2 * t)) for _ in range(2)] for _ in layers]
    for block in source.blocks(0):
        for p, sl in enumerate((slice(0, block.n_fit), slice(block.n_fit, block.n_train))):
            rows = block.rows[sl]
            if len(rows) == 0:
                continue
            y = np.concatenate([data.targets(rows), data.targets(rows, control=True)], 1)
            yt = torch.from_numpy(y)
            for j, layer in enumerate(layers):
                if mom is None:
                    z = block.x[layer, sl].to(torch.float64)
                else:
                    raw = torch.as_tensor(np.asarray(block.x[layer, sl]), dtype=torch.float64)
                    z = (raw - torch.from_numpy(mom.mean[layer])) / torch.from_numpy(mom.std[layer])
                yd = yt.to(z.device)
                acc = parts[j][p]
                acc.n += len(rows)
                acc.sz += z.sum(0).cpu().numpy()
                acc.zz += (z.T @ z).cpu().numpy()
                acc.sy += y.sum(0)
                acc.zy += (z.T @ yd).cpu().numpy()
                acc.yy += (y * y).sum(0)
    return [(a, b) for a, b in parts]


def _centered(g: _Gram) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    mz, my = g.sz / g.n, g.sy / g.n
    return g.zz - g.n * np.outer(mz, mz), g.zy - g.n * np.outer(mz, my), mz, my


def _val_sse(w: np.ndarray, b: np.ndarray, v: _Gram, cols: slice) -> float:
    w, b = w[:, cols], b[cols]
    pred2 = np.einsum("ht,ht->", w, v.zz @ w) + 2 * b @ (w.T @ v.sz) + v.n * (b @ b)
    cross = np.einsum("ht,ht->", w, v.zy[:, cols]) + b @ v.sy[cols]
    return float(v.yy[cols].sum() - 2 * cross + pred2)


def ridge_solve(fit: _Gram, val: _Gram, strengths: tuple[float, ...], n_targets: int
                ) -> tuple[float, np.ndarray, np.ndarray]:
    """Choose C on validation (one eigendecomposition for the grid), refit it on train.

    Returns the chosen C and standardised-space weights (hidden, 2·targets) and bias
    (labels' columns first, then control's, both at the chosen C).
    """
    gc, cc, mz, my = _centered(fit)
    lam, vec = np.linalg.eigh(gc)
    proj = vec.T @ cc
    real = slice(0, n_targets)
    sse = []
    for c in strengths:
        w = vec @ (proj / (lam + 1.0 / c)[:, None])
        sse.append(_val_sse(w, my - mz @ w, val, real))
    best = float(strengths[int(np.argmin(sse))])
    gc, cc, mz, my = _centered(fit + val)
    w = np.linalg.solve(gc + np.eye(len(gc)) / best, cc)
    return best, w, my - mz @ w
