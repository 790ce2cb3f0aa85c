"""Logistic probes on a store larger than the budget, in a handful of passes.

Full-batch L-BFGS reads the whole store once per function evaluation (hundreds of
passes). Here every pass over the store is one Newton step for every problem at once
(each layer group × each C × labels and control labels), with curvature from a sample:

1. The moments pass copies a stratified sample of the train rows into memory (``Sample``:
   every (role, class) stratum keeps the same share, chosen by a hash of the id and the
   seed, stored as read in the store's dtype).
2. Every problem is solved on the sample by batched L-BFGS, the penalty scaled by the
   whole split's rows so the sample's problem estimates the whole one.
3. Polish: each pass evaluates the exact objective, gradient and validation scores of
   every problem over the whole store (float32 matmuls, float64 sums). A problem whose
   step decreased its objective enough (Armijo) takes a quasi-Newton step next: L-BFGS's
   two-loop recursion over the exact (step, gradient change) pairs of its earlier passes,
   whose initial inverse Hessian is the sample's Hessian at the current point, inverted
   by preconditioned conjugate gradients. The sample gives the curvature everywhere at
   once; the pairs correct it along the directions travelled, where a sample of a few
   thousand rows is least exact for a weakly penalised fit. A problem whose step did not
   decrease enough retries a shorter one (quadratic interpolation). A problem stops when
   its largest gradient entry is at most ``tol``, the test of a full-batch fit, so the
   answer does not depend on the sample beyond that tolerance; ``MAX_POLISH_PASSES`` is
   a safeguard, and problems it stops are counted as ``unconverged``.

The select problems (fit rows, every C) and the refit problems (all train rows, every C,
labels and control labels) are polished together, so the C chosen on validation after the
last pass needs no pass of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from actcache.probes import _closed
from actcache.probes._data import (
    FIT,
    MIN_BLOCK_ROWS,
    PREFETCH,
    VAL,
    Block,
    BlockSource,
    ProbeData,
    hash_unit,
    stream_rows,
)
from actcache.probes._precision import BF16_TOL
from actcache.probes._train import (
    PRECONDITIONER_BYTES,
    LogisticBatch,
    Precond,
    _two_loop,
    augmented_eig,
    gram_preconditioner,
    lbfgs,
)
from actcache.schemas.probe import ProbeConfig
from actcache.workers.dtypes import torch_dtype

#: Cap on polish passes per layer group: a safeguard, runs stop at ``tol`` well before.
MAX_POLISH_PASSES = 16
#: Conjugate-gradient iterations per Newton direction, and the residual it stops at
#: (relative to the gradient): an inexact direction costs a little more passes at most.
CG_ITERATIONS, CG_RTOL = 60, 1e-3
#: Exact curvature pairs (step, gradient change) kept from the passes, as in L-BFGS.
HISTORY = 8

ZWeights = list[tuple[np.ndarray, np.ndarray]]


def plan_stream(store: Any, data: ProbeData, budget: int, cols: int) -> tuple[int, int, int]:
    """Rows per streamed block, rows of the sample and rows the sample is worked on at once,
    for one layer group.

    A quarter of the budget goes to the streamed blocks (as in ``plan_blocks``), the rest
    to the sample as stored, less one standardised chunk of it with its logits. The
    sample's size sets how many passes the polish takes, and these passes are bound by
    their arithmetic, not by reading: measured, giving the blocks half the budget (whole
    chunks) took 11.7 passes where a quarter took 8.0.
    """
    n_layers, hidden = len(data.layers), data.hidden
    row_x, row_work = n_layers * hidden * 4, n_layers * cols * 4 * 4 * 2
    rows = stream_rows(max(1, int(store.chunk_rows)), budget // 4, n_layers, hidden, row_work)
    work = min(rows, MIN_BLOCK_ROWS)
    streamed = rows * (PREFETCH * row_x + 2 * hidden * 4 + row_work)
    spare = budget - streamed - work * (row_x + row_work)
    per_row = Sample.row_bytes(n_layers, hidden, store.dtype)
    return rows, max(2 * data.n_classes, spare // per_row), work


def sample_rows(data: ProbeData, ids: Any, capacity: int, seed: int) -> np.ndarray:
    """Store rows of the sample, fit rows then validation rows, at most ``capacity``."""
    train = np.flatnonzero(np.isin(data.role, (FIT, VAL)))
    share = min(1.0, capacity / max(1, len(train)))
    rank = hash_unit([ids[i] for i in train], "sample", seed)
    picked: list[np.ndarray] = []
    for role in (FIT, VAL):
        for label in np.unique(data.y[train]):
            members = np.flatnonzero((data.role[train] == role) & (data.y[train] == label))
            keep = min(len(members), max(1, int(share * len(members))))
            picked.append(train[members[np.argsort(rank[members], kind="stable")[:keep]]])
    rows = np.sort(np.concatenate(picked))
    return np.concatenate([rows[data.role[rows] == FIT], rows[data.role[rows] == VAL]])


class Sample:
    """The sampled train rows of one layer group, served as standardised blocks."""

    def __init__(self, data: ProbeData, rows: np.ndarray, store_dtype: str, chunk_rows: int
                 ) -> None:
        self.rows = rows
        self.chunk_rows = chunk_rows
        self.n_fit = int((data.role[rows] == FIT).sum())
        self.x = torch.empty((len(data.layers), len(rows), data.hidden),
                             dtype=torch_dtype(store_dtype))
        self._where = np.full(len(data.role), -1, dtype=np.int64)
        self._where[rows] = np.arange(len(rows))
        self._mean = self._std = torch.zeros(0)
        self.dtype = torch.float32

    @staticmethod
    def row_bytes(n_layers: int, hidden: int, store_dtype: str) -> int:
        return n_layers * hidden * (4 if store_dtype == "float32" else 2)

    def take(self, block: Block) -> None:
        """Copy the sampled rows of a raw block (values as stored: the cast is exact)."""
        dst = self._where[block.rows[: block.n_train]]
        src = np.flatnonzero(dst >= 0)
        if len(src):
            self.x[:, torch.from_numpy(dst[src])] = torch.from_numpy(
                np.asarray(block.x)[:, src]).to(self.x.dtype)

    def standardise(self, mean: np.ndarray, std: np.ndarray, device: torch.device) -> None:
        self.x = self.x.to(device)
        self._mean = torch.from_numpy(mean).float().to(device)[:, None, :]
        self._std = torch.from_numpy(std).float().to(device)[:, None, :]

    def blocks(self, epoch: int = 0) -> Iterator[Block]:
        """The sample in chunks, fit rows first, standardised into ``self.dtype``."""
        for lo in range(0, len(self.rows), self.chunk_rows):
            hi = min(lo + self.chunk_rows, len(self.rows))
            x = ((self.x[:, lo:hi].float() - self._mean) / self._std).to(self.dtype)
            n_fit = min(max(self.n_fit - lo, 0), hi - lo)
            yield Block(-1, self.rows[lo:hi], x, n_fit, hi - lo - n_fit, 0)


class _Sets:
    """The select and refit problems side by side along the problem axis."""

    def __init__(self, batches: list[LogisticBatch], rows: list[str], n_full: list[int],
                 n_sample: list[int]) -> None:
        self.batches, self.rows, self.n_full, self.n_sample = batches, rows, n_full, n_sample
        ends = np.cumsum([b.n_problems for b in batches])
        self.views = [slice(int(e - b.n_problems), int(e)) for e, b in zip(ends, batches,
                                                                           strict=True)]

    def each(self) -> Iterator[tuple[LogisticBatch, str, slice, int, int]]:
        yield from zip(self.batches, self.rows, self.views, self.n_full, self.n_sample,
                       strict=True)

    def full_pass(self, source: BlockSource, theta: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
        """Exact objectives, gradients and the select problems' validation accuracy and
        loss, in one pass over the store."""
        f = torch.zeros(theta.shape[:2], dtype=torch.float64, device=theta.device)
        g = torch.zeros_like(theta)
        first = self.batches[0]
        correct = torch.zeros((theta.shape[0], first.n_problems), dtype=torch.float64,
                              device=theta.device)
        loss = torch.zeros_like(correct)
        n = [0] * len(self.batches)
        n_val = 0
        for block in source.blocks(0):
            for i, (batch, rows, v, _, _) in enumerate(self.each()):
                n[i] += batch.accumulate(block, theta[:, v], rows, f[:, v], g[:, v])
            n_val += first.tally(block, theta[:, self.views[0]], "val", correct, loss)
        outs = [batch.finish(f[:, v], g[:, v], theta[:, v], n[i], n_full)
                for i, (batch, _, v, n_full, _) in enumerate(self.each())]
        val = (correct / max(n_val, 1)).cpu().numpy(), (loss / max(n_val, 1)).cpu().numpy()
        return torch.cat([a for a, _ in outs], 1), torch.cat([b for _, b in outs], 1), *val

    def hess_vec(self, sample: Sample, theta: torch.Tensor) -> Any:
        """``v ↦`` the sample's Hessian at ``theta`` (penalty included) times ``v``, every
        problem at once; the curvature weights of every sample row are computed once."""
        weights = [[batch.curvature(block, theta[:, sl], rows)
                    for batch, rows, sl, _, _ in self.each()] for block in sample.blocks()]

        def apply(v: torch.Tensor) -> torch.Tensor:
            out = torch.zeros_like(v)
            for block, per_set in zip(sample.blocks(), weights, strict=True):
                for (batch, rows, sl, _, _), w in zip(self.each(), per_set, strict=True):
                    batch.hess_vec(block, w, v[:, sl], rows, out[:, sl])
            for batch, _, sl, n_full, n_s in self.each():
                reg = 1.0 / (batch.strengths.to(torch.float64) * n_full)
                out[:, sl] /= n_s
                out[:, sl, :-1] += reg[:, :, None, None] * v[:, sl, :-1]
            return out

        return apply


def _pcg(apply: Any, g: torch.Tensor, precond: Precond | None, live: torch.Tensor
         ) -> torch.Tensor:
    """Solve ``H d = -g`` per problem (problems on the leading two axes) where ``live``."""
    dims = tuple(range(2, g.dim()))
    mask = live.view(*live.shape, *([1] * len(dims))).to(g.dtype)
    r = -g * mask
    z = precond(r) if precond is not None else r.clone()
    p = z.clone()
    d = torch.zeros_like(g)
    rz = (r * z).sum(dims)
    stop = CG_RTOL * g.norm(dim=-1).norm(dim=-1)
    for _ in range(CG_ITERATIONS):
        if not bool(((r.norm(dim=-1).norm(dim=-1) > stop) & live).any()):
            break
        hp = apply(p)
        php = (p * hp).sum(dims)
        alpha = torch.where(php > 0, rz / php.clamp_min(1e-300), 0.0)
        alpha = alpha.view(*alpha.shape, *([1] * len(dims)))
        d += alpha * p
        r -= alpha * hp
        z = precond(r) if precond is not None else r.clone()
        rz_new = (r * z).sum(dims)
        beta = (rz_new / rz.clamp_min(1e-300)).view(*rz.shape, *([1] * len(dims)))
        p = z + beta * p
        rz = rz_new
    return d * mask


def fit_streamed(source: BlockSource, sample: Sample, data: ProbeData, config: ProbeConfig,
                 device: torch.device, dtype: torch.dtype
                 ) -> tuple[list[float], list[ZWeights], dict[str, int]]:
    """Chosen C per layer, per-task standardised-space weights, and iteration counts."""
    n_l, h = len(data.layers), data.hidden
    k = 1 if data.n_classes == 2 else data.n_classes
    s = len(config.strengths)
    grid = torch.tensor(config.strengths, dtype=torch.float64, device=device)
    targets = [data.y, data.control] if config.control else [data.y]
    select = LogisticBatch(n_l, h, k, grid.expand(n_l, -1).clone(), [data.y] * s, device, dtype)
    refit = LogisticBatch(n_l, h, k, grid.repeat(len(targets)).expand(n_l, -1).clone(),
                          [t for t in targets for _ in range(s)], device, dtype)
    n_full = [data.count(FIT), data.count(FIT, VAL)]
    n_s = [sample.n_fit, len(sample.rows)]
    sets = _Sets([select, refit], ["fit", "train"], n_full, n_s)

    pre: list[Precond | None] = [None, None]
    if 3 * n_l * (h + 1) ** 2 * 8 <= PRECONDITIONER_BYTES:
        sample.dtype = torch.float32
        grams = _closed.gram_pass(sample, data, list(range(n_l)))
        for i, (batch, _, _, nf, ns) in enumerate(sets.each()):
            eig = [augmented_eig(fit if i == 0 else fit + val) for fit, val in grams]
            pre[i] = gram_preconditioner(eig, batch.strengths, ns, k, nf)

    # 2. The sample's problem, in the run's precision; bf16 stops at its noise floor, where
    # line searches would fail, and the float32 polish takes it from there.
    sample.dtype = dtype
    tol = config.tol if dtype == torch.float32 else max(config.tol, BF16_TOL)
    zeros = torch.zeros((n_l, s, h + 1, k), dtype=torch.float64, device=device)
    theta_sel, it_a = lbfgs(select.objective(sample, "fit", n_full[0]), zeros, config.max_iter,
                            tol, precond=pre[0])
    start = torch.cat([theta_sel] * len(targets), 1)
    theta_ref, it_b = lbfgs(refit.objective(sample, "train", n_full[1]), start,
                            config.max_iter, tol, precond=pre[1])

    # 3. Polish on the whole store: float32 passes, float64 state.
    sample.dtype = torch.float32
    exact = _Sets([replace(b, dtype=torch.float32) for b in sets.batches], sets.rows, n_full,
                  n_s)

    def joint(q: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(q[:, v]) if p is not None else q[:, v]
                          for p, v in zip(pre, exact.views, strict=True)], 1)

    precond = joint if pre[0] is not None else None
    x = torch.cat([theta_sel, theta_ref], 1)
    trial = x
    f = torch.full(x.shape[:2], torch.inf, dtype=torch.float64, device=device)
    g = torch.zeros_like(x)
    d = torch.zeros_like(x)
    t = torch.ones_like(f)
    gd = torch.zeros_like(f)
    val_acc = val_loss = np.zeros((n_l, s))
    done = torch.zeros(x.shape[:2], dtype=torch.bool, device=device)
    shape, flat = x.shape, (*x.shape[:2], -1)
    hist: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    steps = 0
    for polish in range(MAX_POLISH_PASSES):
        f_t, g_t, acc_t, loss_t = exact.full_pass(source, trial)
        ok = torch.ones_like(done)
        if polish:
            # Armijo; or, where the change is within the float noise of the objective's sums
            # (near the optimum), a smaller gradient.
            noise = (f_t - f).abs() <= 1e-7 * f.abs()
            smaller = g_t.abs().amax((2, 3)) < g.abs().amax((2, 3))
            ok = torch.isfinite(f_t) & ((f_t <= f + 1e-4 * t * gd) | (noise & smaller)) & ~done
            # The exact curvature along the step taken corrects the sample's (L-BFGS pairs).
            step = (trial - x).reshape(flat) * ok[..., None]
            change = (g_t - g).reshape(flat) * ok[..., None]
            sy = (step * change).sum(-1)
            good = ok & (sy > 1e-10 * step.norm(dim=-1) * change.norm(dim=-1))
            rho = torch.where(good, 1.0 / sy.clamp_min(1e-300), 0.0)
            hist = [*hist, (step * good[..., None], change * good[..., None], rho)][-HISTORY:]
        x = torch.where(ok[..., None, None], trial, x)
        f, g = torch.where(ok, f_t, f), torch.where(ok[..., None, None], g_t, g)
        sel = ok[:, exact.views[0]].cpu().numpy()
        val_acc, val_loss = np.where(sel, acc_t, val_acc), np.where(sel, loss_t, val_loss)
        done = done | (g.abs().amax((2, 3)) <= config.tol)
        if bool(done.all()):
            break
        # A rejected step retries shorter, at the minimum of the quadratic through f,
        # the slope and the rejected value (kept within [0.1, 0.5] of the last step).
        fit_t = -gd * t * t / (2 * (f_t - f - gd * t)).clamp_min(1e-300)
        shorter = torch.where(torch.isfinite(fit_t), fit_t, 0.1 * t).clamp(0.1 * t, 0.5 * t)
        t = torch.where(ok, 1.0, shorter)
        fresh = ok & ~done
        if bool(fresh.any()):
            steps += 1
            hess = exact.hess_vec(sample, x)

            def newton(q: torch.Tensor, live: torch.Tensor = fresh, hess: Any = hess
                       ) -> torch.Tensor:
                return -_pcg(hess, q.view(shape), precond, live).reshape(flat)

            direction = -_two_loop(g.reshape(flat), hist, torch.ones_like(f), newton).view(shape)
            d = torch.where(fresh[..., None, None], direction, d)
        gd = (g * d).sum((2, 3))
        uphill = fresh & (gd >= 0)  # an inexact direction that does not descend: the gradient's
        if bool(uphill.any()):
            d = torch.where(uphill[..., None, None], -g / g.norm(dim=(2, 3), keepdim=True), d)
            gd = (g * d).sum((2, 3))
        done = done | (t < 1e-8)
        trial = torch.where(done[..., None, None], x, x + t[..., None, None] * d)
    best = [int(np.lexsort((val_loss[i], -val_acc[i]))[0]) for i in range(n_l)]
    out = x[:, exact.views[1]].cpu().numpy()
    per_task = [[(out[i, j * s + best[i], :-1, :], out[i, j * s + best[i], -1, :])
                 for i in range(n_l)] for j in range(len(targets))]
    chosen = [float(config.strengths[b]) for b in best]
    converged = g.abs().amax((2, 3)) <= config.tol
    return chosen, per_task, {"sample": int(max(it_a.max(), it_b.max())), "newton": steps,
                              "unconverged": int((~converged).sum())}
