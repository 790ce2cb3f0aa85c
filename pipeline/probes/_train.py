"""Logistic probes for every layer × every strength at once: batched L-BFGS over blocks.

Each (layer, problem) pair is an independent L2-regularised logistic regression with
scikit-learn's objective, scaled by the rows like scikit-learn's lbfgs does:
``mean(loss) + ||W||² / (2 C n)`` (intercept unpenalised). One pass over the blocks
computes the objective and gradient of all of them with one batched matmul per block
(layers × rows × hidden @ layers × hidden × problems·classes); the L-BFGS state is per
problem, so each converges on its own and stops at ``tol`` like scikit-learn's ``gtol``.
Full-batch L-BFGS rather than SGD: parity with scikit-learn needs the exact optimum.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from actcache.probes._data import Block, BlockSource
from actcache.probes._precision import BF16_TOL

#: Which rows a pass uses: ``fit`` (train minus validation), ``train``, ``val``.
RowSet = str


def _rows(block: Block, rows: RowSet) -> slice:
    if rows == "fit":
        return slice(0, block.n_fit)
    if rows == "train":
        return slice(0, block.n_train)
    return slice(block.n_fit, block.n_train)


@dataclass
class LogisticBatch:
    """``P`` problems per layer over ``K`` outputs (1 = binary sigmoid, else softmax)."""

    n_layers: int
    hidden: int
    k: int
    strengths: torch.Tensor
    """(layers, P) the C of each problem."""
    targets: list[np.ndarray]
    """Per problem, the class index of every store row (labels or control labels)."""
    device: torch.device
    dtype: torch.dtype
    """Compute dtype of the matmuls (float32 or bfloat16); the state stays float64."""

    @property
    def n_problems(self) -> int:
        return int(self.strengths.shape[1])

    def logits(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """(layers, rows, P, K) float32 logits from (layers, P, hidden + 1, K) weights."""
        n_l, p, h1, k = theta.shape
        w = theta[:, :, :-1, :].permute(0, 2, 1, 3).reshape(n_l, h1 - 1, p * k)
        b = theta[:, :, -1, :].reshape(n_l, 1, p * k)
        if self.dtype == torch.float32:
            out = torch.bmm(x, w.float()) + b.float()
        else:
            # The weights as two bf16 terms: one would round them to 3 digits, making the
            # objective a staircase in theta on which line searches fail.
            hi = w.to(self.dtype)
            lo = (w - hi.to(w.dtype)).to(self.dtype)
            out = torch.bmm(x, hi).float() + torch.bmm(x, lo).float() + b.float()
        return out.view(n_l, x.shape[1], p, k)

    def _labels(self, block: Block, sl: slice) -> torch.Tensor:
        rows = block.rows[sl]
        return torch.from_numpy(np.stack([t[rows] for t in self.targets], axis=1)).to(self.device)

    def _loss_resid(self, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k == 1:
            s = z[..., 0]
            yf = y.to(s.dtype).unsqueeze(0)
            loss = torch.nn.functional.softplus(s) - yf * s
            return loss, (torch.sigmoid(s) - yf).unsqueeze(-1)
        lse = torch.logsumexp(z, dim=-1)
        idx = y.unsqueeze(0).unsqueeze(-1).expand(z.shape[0], -1, -1, 1)
        loss = lse - z.gather(-1, idx).squeeze(-1)
        resid = torch.softmax(z, dim=-1)
        resid.scatter_add_(-1, idx, -torch.ones_like(resid[..., :1]))
        return loss, resid

    def accumulate(self, block: Block, theta: torch.Tensor, rows: RowSet, f: torch.Tensor,
                   g: torch.Tensor) -> int:
        """Add one block's summed loss and gradient of ``rows`` into ``f``, ``g``; its rows."""
        sl = _rows(block, rows)
        x = block.x[:, sl]
        if x.shape[1] == 0:
            return 0
        loss, resid = self._loss_resid(self.logits(x, theta), self._labels(block, sl))
        f += loss.sum(1).double()
        self._add_back(resid, x, g)
        return int(x.shape[1])

    def _add_back(self, u: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> None:
        """``out += [x, 1]ᵀ u``: per-row (layers, rows, P, K) values back to the weights."""
        n_l, b, p, k = u.shape
        # (P·K, rows) @ (rows, hidden): the row-major operand streams once, fastest on CPU
        back = torch.bmm(u.reshape(n_l, b, p * k).to(self.dtype).transpose(1, 2), x)
        out[:, :, :-1, :] += back.double().view(n_l, p, k, -1).permute(0, 1, 3, 2)
        out[:, :, -1, :] += u.sum(1).double()

    def value_grad(self, source: BlockSource, theta: torch.Tensor, rows: RowSet, epoch: int
                   ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Summed loss (layers, P) and its gradient, float64, over one pass of ``rows``."""
        f = torch.zeros(theta.shape[:2], dtype=torch.float64, device=self.device)
        g = torch.zeros_like(theta)
        n = 0
        for block in source.blocks(epoch):
            n += self.accumulate(block, theta, rows, f, g)
        return f, g, n

    def finish(self, f: torch.Tensor, g: torch.Tensor, theta: torch.Tensor, n: int,
               n_reg: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean objective and gradient from sums over ``n`` rows, penalty ``||W||²/(2 C n_reg)``.

        ``n_reg`` is the rows of the whole split, also when the sums come from a sample of
        it: the sample's problem then estimates the whole split's, penalty included.
        """
        w = theta[:, :, :-1, :]
        reg = 1.0 / (self.strengths.to(torch.float64) * n_reg)
        f = f / n + 0.5 * reg * (w * w).sum((2, 3))
        g = g / n
        g[:, :, :-1, :] += reg[:, :, None, None] * w
        return f, g

    def objective(self, source: Any, rows: RowSet, n_reg: int | None = None
                  ) -> Callable[..., Any]:
        """The mean objective over ``rows`` of ``source``, penalty scaled by ``n_reg`` rows
        (default: the rows the pass sees)."""
        counter = {"epoch": 0}

        def fun(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            counter["epoch"] += 1
            f, g, n = self.value_grad(source, theta, rows, counter["epoch"])
            return self.finish(f, g, theta, n, n if n_reg is None else n_reg)

        return fun

    def curvature(self, block: Block, theta: torch.Tensor, rows: RowSet) -> torch.Tensor:
        """Per row and problem, what the loss's Hessian at ``theta`` weighs a direction by:
        ``σ(1-σ)`` (binary) or the class probabilities (softmax)."""
        z = self.logits(block.x[:, _rows(block, rows)], theta)
        if self.k == 1:
            s = torch.sigmoid(z)
            return s * (1 - s)
        return torch.softmax(z, dim=-1)

    def hess_vec(self, block: Block, weights: torch.Tensor, v: torch.Tensor, rows: RowSet,
                 out: torch.Tensor) -> int:
        """Add one block's ``Σ_rows ∇²loss · v`` into ``out``, ``weights`` from
        ``curvature``; returns the block's rows."""
        x = block.x[:, _rows(block, rows)]
        if x.shape[1] == 0:
            return 0
        r = self.logits(x, v)  # the direction's logits, bias included
        if self.k == 1:
            u = weights * r
        else:
            u = weights * r - weights * (weights * r).sum(-1, keepdim=True)
        self._add_back(u, x, out)
        return int(x.shape[1])

    def tally(self, block: Block, theta: torch.Tensor, rows: RowSet, correct: torch.Tensor,
              loss_sum: torch.Tensor) -> int:
        """Add one block's correct predictions and summed loss on ``rows``; returns its rows."""
        sl = _rows(block, rows)
        x = block.x[:, sl]
        if x.shape[1] == 0:
            return 0
        z = self.logits(x, theta)
        y = self._labels(block, sl)
        loss, _ = self._loss_resid(z, y)
        pred = (z[..., 0] > 0).long() if self.k == 1 else z.argmax(-1)
        correct += (pred == y.unsqueeze(0)).sum(1).double()
        loss_sum += loss.sum(1).double()
        return int(x.shape[1])

    def evaluate(self, source: BlockSource, theta: torch.Tensor, rows: RowSet
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Accuracy and mean loss (layers, P) of each problem on ``rows``."""
        correct = torch.zeros(theta.shape[:2], dtype=torch.float64, device=self.device)
        loss_sum = torch.zeros_like(correct)
        n = 0
        for block in source.blocks(0):
            n += self.tally(block, theta, rows, correct, loss_sum)
        return (correct / n).cpu().numpy(), (loss_sum / n).cpu().numpy()


Precond = Callable[[torch.Tensor], torch.Tensor]

#: Largest size of the preconditioner's float64 Gram matrices and eigenvectors (three
#: (hidden + 1)² matrices per layer): 256 MiB covers hidden 768 over 13 layers. A fixed
#: cap, not a share of ``max_memory``: a budget must not change which algorithm runs, or
#: the same store would give different probes with and without ``--max-memory``.
PRECONDITIONER_BYTES = 256 * 2**20


def augmented_eig(g: Any) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of AᵀA for A = [Z, 1], from a ``_closed._Gram``."""
    h = len(g.sz)
    a = np.empty((h + 1, h + 1))
    a[:h, :h], a[:h, h], a[h, :h], a[h, h] = g.zz, g.sz, g.sz, g.n
    return np.linalg.eigh(a)


def gram_preconditioner(eig: list[tuple[np.ndarray, np.ndarray]], strengths: torch.Tensor,
                        n: int, k: int, n_reg: int | None = None) -> Precond:
    """Inverse of ``c·AᵀA/n + I/(C n)`` per problem, A = [Z, 1] (the logistic Hessian at
    zero, c = 1/4 binary, 1/K softmax, plus the penalty), from one eigendecomposition per
    layer; the penalty's rows are ``n_reg`` when the Gram matrices are a sample's. Used
    as L-BFGS's initial inverse Hessian, it removes the ill-conditioning that correlated
    features cause, so fits take tens of iterations rather than hundreds."""
    dev = strengths.device
    lam = torch.from_numpy(np.stack([e for e, _ in eig])).to(dev)
    vec = torch.from_numpy(np.stack([v for _, v in eig])).to(dev)
    curv = 0.25 if k == 1 else 1.0 / k
    n_pen = n if n_reg is None else n_reg
    inv = 1.0 / (curv * lam.clamp_min(0.0)[:, :, None] / n + 1.0 / (strengths[:, None, :] * n_pen))

    def apply(q: torch.Tensor) -> torch.Tensor:
        n_l, p = q.shape[:2]
        qq = q.view(n_l, p, -1, k).permute(0, 2, 1, 3).reshape(n_l, -1, p * k)
        r = torch.bmm(vec.transpose(1, 2), qq).view(n_l, -1, p, k) * inv[..., None]
        r = torch.bmm(vec, r.reshape(n_l, -1, p * k)).view(n_l, -1, p, k)
        return r.permute(0, 2, 1, 3).reshape(q.shape)

    return apply


def lbfgs(fun: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], theta0: torch.Tensor,
          max_iter: int, tol: float, memory: int = 10, precond: Precond | None = None
          ) -> tuple[torch.Tensor, np.ndarray]:
    """Minimise independent problems at once (leading two axes index them).

    Per problem: L-BFGS direction (initial inverse Hessian ``precond`` when given),
    Armijo backtracking, stop when max|grad| ≤ ``tol``. Returns the solution and the
    iterations each problem took.
    """
    shape = theta0.shape
    flat = (shape[0], shape[1], -1)
    x = theta0.clone()
    f, g = fun(x)
    g = g.reshape(flat)
    hist: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    gamma = torch.ones(shape[:2], dtype=x.dtype, device=x.device)
    active = g.abs().amax(-1) > tol
    iters = torch.zeros(shape[:2], dtype=torch.int64, device=x.device)
    first = torch.ones_like(active)
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        d = -_two_loop(g, hist, gamma, precond)
        gd = (g * d).sum(-1)
        bad = gd >= 0
        d = torch.where(bad[..., None], -g, d)
        unscaled = bad if precond is not None else first | bad
        scale = torch.where(unscaled, 1.0 / g.norm(dim=-1).clamp_min(1e-12), 1.0)
        d = d * scale[..., None] * active[..., None]
        gd = (g * d).sum(-1)
        x_new, f_new, g_new, ok = _armijo(fun, x, f, g, d, gd, shape)
        stuck = active & ~ok
        step = active & ok
        s = (x_new.reshape(flat) - x.reshape(flat)) * step[..., None]
        yv = (g_new - g) * step[..., None]
        sy = (s * yv).sum(-1)
        good = step & (sy > 1e-10 * s.norm(dim=-1) * yv.norm(dim=-1))
        rho = torch.where(good, 1.0 / sy.clamp_min(1e-300), 0.0)
        hist.append((s * good[..., None], yv * good[..., None], rho))
        hist = hist[-memory:]
        gamma = torch.where(good, sy / (yv * yv).sum(-1).clamp_min(1e-300), gamma)
        x = torch.where(step.view(*shape[:2], 1, 1), x_new, x)
        f = torch.where(step, f_new, f)
        g = torch.where(step[..., None], g_new, g)
        first = first & ~step
        iters += active.long()
        active = active & ~stuck & (g.abs().amax(-1) > tol)
    return x, iters.cpu().numpy()


def _two_loop(g: torch.Tensor, hist: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
              gamma: torch.Tensor, precond: Precond | None) -> torch.Tensor:
    q = g.clone()
    alphas = []
    for s, y, rho in reversed(hist):
        a = rho * (s * q).sum(-1)
        q -= a[..., None] * y
        alphas.append(a)
    r = precond(q) if precond is not None else gamma[..., None] * q
    for (s, y, rho), a in zip(hist, reversed(alphas), strict=True):
        b = rho * (y * r).sum(-1)
        r += s * (a - b)[..., None]
    return r


def _armijo(fun: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor,
            f: torch.Tensor, g: torch.Tensor, d: torch.Tensor, gd: torch.Tensor,
            shape: torch.Size, max_halvings: int = 30
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backtracking per problem; every trial evaluates all problems in one pass."""
    t = torch.ones_like(f)
    ok = d.abs().amax(-1) == 0
    x_best, f_best, g_best = x.clone(), f.clone(), g.clone()
    for _ in range(max_halvings):
        trial = x + (t[..., None] * d).view(shape)
        f_t, g_t = fun(trial)
        g_t = g_t.reshape(g.shape)
        new = ~ok & torch.isfinite(f_t) & (f_t <= f + 1e-4 * t * gd)
        x_best = torch.where(new.view(*shape[:2], 1, 1), trial, x_best)
        f_best = torch.where(new, f_t, f_best)
        g_best = torch.where(new[..., None], g_t, g_best)
        ok = ok | new
        if bool(ok.all()):
            break
        t = torch.where(ok, t, t * 0.5)
    moved = d.abs().amax(-1) > 0
    return x_best, f_best, g_best, ok & moved


class CastBlocks:
    """The blocks of an in-memory source cast once to ``dtype`` (a bf16 copy costs half the
    float32 blocks, within what ``plan_blocks`` reserves for caching)."""

    def __init__(self, source: Any, dtype: torch.dtype) -> None:
        self._blocks = [replace(b, x=b.x.to(dtype)) for b in source.blocks(0)]

    def blocks(self, epoch: int = 0) -> Iterator[Block]:
        yield from self._blocks


def solve(batch: LogisticBatch, source: Any, low: Any, rows: RowSet, theta0: torch.Tensor,
          max_iter: int, tol: float, precond: Precond | None = None
          ) -> tuple[torch.Tensor, np.ndarray]:
    """L-BFGS on ``rows`` of ``source`` (float32 blocks) to ``tol``, ``batch`` in float32.

    With ``low`` (the same blocks in bfloat16), the solve runs there first down to
    ``BF16_TOL`` and float32 finishes it from that point: the problems are convex, so the
    answer is float32's within ``tol`` whatever precision did most of the way.
    """
    start, spent = theta0, np.zeros(theta0.shape[:2], dtype=np.int64)
    if low is not None:
        rough = replace(batch, dtype=torch.bfloat16)
        start, spent = lbfgs(rough.objective(low, rows), theta0, max_iter, max(tol, BF16_TOL),
                             precond=precond)
    final, iters = lbfgs(batch.objective(source, rows), start, max_iter, tol, precond=precond)
    return final, iters + spent
