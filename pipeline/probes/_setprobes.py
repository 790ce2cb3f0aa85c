"""The token probes' heads and their training: every layer × task × weight decay at once.

Each kind keeps its parameters with leading ``(layers, tasks, decays)`` dimensions. A
batch's padded tokens ``x`` (layers, rows, T, hidden) feed every head of a layer in one
batched matmul, and the loss is the sum over heads of each head's mean loss, so every
head's gradient is exactly its own. AdamW runs on the stacked parameters with its weight
decay applied per head (``1 - lr·wd``, decoupled, before the Adam step, as
``torch.optim.AdamW`` does), so each head follows the path a lone ``nn.Module`` with
``torch.optim.AdamW(weight_decay=wd)`` and the same cosine schedule would.

- attentive: ``queries`` learnable vectors ``q_m`` attend to the (standardised) tokens,
  ``a_m = softmax_t(q_m·z_t / sqrt(hidden))`` over the row's real tokens only (padding is
  masked to -inf), each pools ``o_m = Σ_t a_m,t z_t``, and a linear classifier reads the
  concatenated ``[o_1 … o_M]``. Efficient probing's value projection followed by its
  linear classifier is one linear map, so it is folded into the classifier here.
- moment: a linear classifier on ``[mean_t z_t, var_t z_t]`` (per-feature mean and
  variance over the row's tokens).
- token-logistic: a linear classifier on each token ``z_t``, trained on every token with
  its row's label (mean loss over the batch's tokens); a row scores the mean of its
  tokens' logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from actcache.schemas.probe import ProbeKind

#: Initial scale of the attentive queries and classifier (EP and MAE heads use ~0.02).
QUERY_STD = 0.02
HEAD_STD = 0.01


def initial(kind: ProbeKind, seed: int, layer: int, hidden: int, k: int, queries: int
            ) -> dict[str, torch.Tensor]:
    """One head's initial parameters, a function of (seed, layer, kind) only: every task
    and weight decay of a layer starts from them, whatever the grid or the layer grouping."""
    key = np.random.SeedSequence([seed, layer, list(ProbeKind).index(kind)])
    gen = torch.Generator().manual_seed(int(key.generate_state(1)[0]))
    if kind == ProbeKind.ATTENTIVE:
        return {"queries": torch.randn(queries, hidden, generator=gen) * QUERY_STD,
                "weight": torch.randn(queries * hidden, k, generator=gen) * HEAD_STD,
                "bias": torch.zeros(k)}
    width = 2 * hidden if kind == ProbeKind.MOMENT else hidden
    return {"weight": torch.zeros(width, k), "bias": torch.zeros(k)}


class Heads:
    """Parameters of one probe kind for ``layers × tasks × decays`` heads."""

    def __init__(self, kind: ProbeKind, layers: tuple[int, ...], hidden: int, k: int,
                 tasks: int, decays: int, queries: int, seed: int, device: torch.device
                 ) -> None:
        self.kind, self.k, self.hidden = kind, k, hidden
        self.queries = queries if kind == ProbeKind.ATTENTIVE else 0
        per_layer = [initial(kind, seed, layer, hidden, k, queries) for layer in layers]
        self.params: dict[str, torch.Tensor] = {}
        for name in per_layer[0]:
            stacked = torch.stack([p[name] for p in per_layer])
            shape = (len(layers), tasks, decays, *stacked.shape[1:])
            self.params[name] = (stacked[:, None, None].expand(shape).clone().to(device)
                                 .requires_grad_(True))

    def decayed(self) -> list[torch.Tensor]:
        """Parameters under weight decay: all but the biases."""
        return [p for name, p in self.params.items() if name != "bias"]

    def forward(self, x: torch.Tensor, mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Row logits ``(layers, tasks, decays, rows, k)`` and, for token-logistic, token
        logits ``(layers, tasks, decays, rows, T, k)`` (padding included: mask them)."""
        g, n, t, h = x.shape
        w, b = self.params["weight"], self.params["bias"]
        _, tasks, decays = w.shape[:3]
        heads = tasks * decays
        if self.kind == ProbeKind.ATTENTIVE:
            return self._attentive(x, mask), None
        if self.kind == ProbeKind.MOMENT:
            m = mask[None, :, :, None].to(x.dtype)
            count = mask.sum(1).to(x.dtype)[None, :, None]
            mean = (x * m).sum(2) / count
            var = ((x * x * m).sum(2) / count - mean * mean).clamp_min(0.0)
            feats = torch.cat([mean, var], dim=-1)  # (g, n, 2h)
            wf = w.permute(0, 3, 1, 2, 4).reshape(g, 2 * h, heads * self.k)
            logits = torch.matmul(feats, wf).reshape(g, n, tasks, decays, self.k)
            return logits.permute(0, 2, 3, 1, 4) + b[..., None, :], None
        wf = w.permute(0, 3, 1, 2, 4).reshape(g, h, heads * self.k)
        tok = torch.matmul(x.reshape(g, n * t, h), wf).reshape(g, n, t, tasks, decays, self.k)
        tok = tok.permute(0, 3, 4, 1, 2, 5) + b[..., None, None, :]
        m = mask[None, None, None, :, :, None].to(tok.dtype)
        rows = (tok * m).sum(4) / mask.sum(1).to(tok.dtype)[:, None]
        return rows, tok


    def _attentive(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The classifier is linear, so ``W·[o_1 … o_M] = Σ_m Σ_t a_m,t (W_m·z_t)``: the
        tokens meet every query and every query's classifier block in two matmuls of all
        the batch's tokens at once, never a small per-row one."""
        g, n, t, h = x.shape
        w, b = self.params["weight"], self.params["bias"]
        _, tasks, decays = w.shape[:3]
        m, k = self.queries, self.k
        heads = tasks * decays
        flat = x.reshape(g, n * t, h)
        q = self.params["queries"].reshape(g, heads * m, h)
        scores = torch.bmm(flat, q.transpose(1, 2)).reshape(g, n, t, heads * m)
        scores = (scores / math.sqrt(h)).masked_fill(~mask[None, :, :, None], float("-inf"))
        attn = torch.softmax(scores, dim=2)  # over the row's real tokens
        if k > 1:
            # Several classes: the folded form would keep heads·queries·k values per token,
            # so pool first (o_m = Σ_t a_m,t z_t, per row) and classify the pooled rows.
            pooled = torch.bmm(attn.reshape(g * n, t, heads * m).transpose(1, 2),
                               x.reshape(g * n, t, h)).reshape(g, n, heads, m * h)
            logits = torch.einsum("gnad,gadk->gank", pooled, w.reshape(g, heads, m * h, k))
            return logits.reshape(g, tasks, decays, n, k) + b[..., None, :]
        blocks = w.reshape(g, heads, m, h, k).permute(0, 3, 1, 2, 4).reshape(g, h, -1)
        values = torch.bmm(flat, blocks).reshape(g, n, t, heads * m, k)
        logits = (attn.unsqueeze(-1) * values).sum(2).reshape(g, n, heads, m, k).sum(3)
        return logits.permute(0, 2, 1, 3).reshape(g, tasks, decays, n, k) + b[..., None, :]


def work_bytes(kind: ProbeKind, hidden: int, k: int, heads: int, queries: int,
               max_length: int) -> int:
    """Bytes of activations and gradients per padded token of a batch, for one layer's
    ``heads`` (tasks × decays) of ``kind``: what ``forward`` allocates, doubled for the
    backward pass (float32)."""
    if kind == ProbeKind.ATTENTIVE:
        per_token = 2 * heads * queries  # scores and weights
        if k > 1:  # pooled rows, spread over the row's padded tokens
            return 8 * (per_token + -(-2 * heads * queries * hidden // max(1, max_length)))
        return 8 * (per_token + 2 * heads * queries)  # the folded values and their product
    if kind == ProbeKind.MOMENT:  # the masked tokens and their squares; no gradient
        return 4 * 3 * hidden
    return 8 * 2 * heads * k  # token-logistic: token logits and their masked copy


def head_loss(logits: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """Per-head losses summed: logits ``(..., n, k)``, ``target`` (tasks, n) broadcast over
    the layers and decays; each head's loss is the mean over its ``n`` items."""
    full = target[None, :, None, :].expand(logits.shape[:-1])
    if k == 1:
        return F.binary_cross_entropy_with_logits(logits[..., 0].float(), full.float(),
                                                  reduction="none").mean(-1).sum()
    flat = logits.float().reshape(-1, k)
    ce = F.cross_entropy(flat, full.reshape(-1), reduction="none")
    return ce.reshape(full.shape).mean(-1).sum()


def token_loss(head: Heads, x: torch.Tensor, mask: torch.Tensor, target: torch.Tensor
               ) -> torch.Tensor:
    """token-logistic's summed loss: every real token is an item labelled with its row's
    label, each head's loss the mean over the batch's real tokens. Kept in the matmul's
    own layout (tokens, heads): no per-row logits, no permuted copies while training."""
    g, n, t, h = x.shape
    w, b = head.params["weight"], head.params["bias"]
    _, tasks, decays = w.shape[:3]
    sel = mask.reshape(-1)
    wf = w.permute(0, 3, 1, 2, 4).reshape(g, h, tasks * decays * head.k)
    tok = torch.bmm(x.reshape(g, n * t, h), wf)[:, sel]
    tok = tok.reshape(g, -1, tasks, decays, head.k).float() + b[:, None]
    items = target[:, :, None].expand(-1, -1, t).reshape(tasks, -1)[:, sel].T
    full = items[None, :, :, None].expand(tok.shape[:-1])
    if head.k == 1:
        loss = F.binary_cross_entropy_with_logits(tok[..., 0], full.float(), reduction="none")
    else:
        loss = F.cross_entropy(tok.reshape(-1, head.k), full.reshape(-1),
                               reduction="none").reshape(full.shape)
    return loss.mean(1).sum()


def batch_loss(heads: list[Heads], x: torch.Tensor, mask: torch.Tensor,
               target: torch.Tensor) -> torch.Tensor:
    """The summed loss of every head on one batch; ``target`` (tasks, rows)."""
    total = x.new_zeros((), dtype=torch.float32)
    for head in heads:
        if head.kind == ProbeKind.TOKEN_LOGISTIC:
            total = total + token_loss(head, x, mask, target)
        else:
            total = total + head_loss(head.forward(x, mask)[0], target, head.k)
    return total


def cosine(total: int) -> Callable[[int], float]:
    """The learning rate's factor at step ``s`` of ``total``: ``(1 + cos(π s / total)) / 2``."""
    return lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / max(total, 1)))


class Trainer:
    """AdamW with per-head decoupled weight decay and a cosine schedule over every head."""

    def __init__(self, heads: list[Heads], decays: tuple[float, ...], lr: float, total: int,
                 device: torch.device) -> None:
        self.heads = heads
        params = [p for h in heads for p in h.params.values()]
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, cosine(total))
        self.decays = torch.tensor(decays, dtype=torch.float64, device=device)

    def step(self, x: torch.Tensor, mask: torch.Tensor, target: torch.Tensor,
             dtype: torch.dtype) -> float:
        """One AdamW step on one batch; returns the summed loss."""
        with _autocast(x.device, dtype):
            loss = batch_loss(self.heads, x, mask, target)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        lr = self.opt.param_groups[0]["lr"]
        with torch.no_grad():
            factor = (1.0 - lr * self.decays).float()
            for head in self.heads:
                for p in head.decayed():
                    p.mul_(factor.view(1, 1, -1, *([1] * (p.dim() - 3))))
        self.opt.step()
        self.sched.step()
        return float(loss.detach())


def _autocast(device: torch.device, dtype: torch.dtype) -> Any:
    if dtype == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def timing_step(heads: list[Heads], x: torch.Tensor, mask: torch.Tensor,
                target: torch.Tensor) -> Callable[[torch.dtype], None]:
    """One forward and backward of every head on a batch, in a precision (for
    ``_precision.choose``); the gradients are thrown away."""
    def step(dtype: torch.dtype) -> None:
        with _autocast(x.device, dtype):
            loss = batch_loss(heads, x, mask, target)
        loss.backward()
        for head in heads:
            for p in head.params.values():
                p.grad = None
    return step
