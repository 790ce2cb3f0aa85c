"""Forward passes that capture hidden states, stopping at the deepest requested layer."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from actcache.workers.model import block_list

Pooled = dict[tuple[str, int], torch.Tensor]


class Capture:
    """Runs ``model`` on a batch and returns float32 pooled states per (pooling, layer).

    ``n_layers`` is the full model's block count. When the deepest requested layer ``k``
    is below it, the block list is cut to ``k`` blocks (if the model was not already built
    with ``k`` blocks), so a sweep over early layers does not pay for the rest of the model.
    Layer ``k`` is then read from a hook on block ``k-1``: the model's own last hidden
    state would carry its final norm, which index ``k < L`` must not.
    """

    def __init__(self, model: Any, layers: Sequence[int], n_layers: int, poolings: Sequence[str]):
        self.model = model
        self.layers = tuple(layers)
        self.poolings = tuple(poolings)
        self.n_layers = n_layers
        self._hooked: torch.Tensor | None = None
        self._takes_positions = "position_ids" in inspect.signature(model.forward).parameters
        self._truncated = False
        deepest = max(self.layers)
        keep = max(deepest, 1)
        # A model built with ``keep`` blocks (cut at load) already has the length wanted.
        blocks = block_list(model, n_layers) or block_list(model, keep)
        if deepest < n_layers and blocks is not None:
            del blocks[keep:]
            self._truncated = True
            if deepest >= 1:
                blocks[deepest - 1].register_forward_hook(self._hook)

    def _hook(self, _module: Any, _inputs: Any, output: Any) -> None:
        self._hooked = output[0] if isinstance(output, tuple) else output

    def hidden_states(self, batch: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
        if self._takes_positions and "position_ids" not in batch:
            # Positions count real tokens only, so a left-padded example sees the same
            # positions as it would alone (many models default to 0..T-1 regardless).
            mask = batch["attention_mask"].long()
            batch = {**batch, "position_ids": (mask.cumsum(-1) - 1).clamp_min(0)}
        out = self.model(**batch, output_hidden_states=True, return_dict=True)
        states = out.hidden_states
        if not self._truncated:
            return {layer: states[layer] for layer in self.layers}
        deepest = max(self.layers)
        result = {layer: states[layer] for layer in self.layers if layer < deepest}
        result[deepest] = states[0] if deepest == 0 else self._hooked
        return result

    @torch.inference_mode()
    def __call__(self, batch: dict[str, torch.Tensor]) -> Pooled:
        mask = batch["attention_mask"].bool()
        states = self.hidden_states(batch)
        return {
            # A model split across GPUs leaves each layer's states on its block's device.
            (pooling, layer): pool(states[layer].float(), mask.to(states[layer].device), pooling)
            for layer in self.layers
            for pooling in self.poolings
        }


def pool(h: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool ``h`` (batch, seq, hidden) over the positions where ``mask`` is true.

    ``tokens`` returns every unmasked position, example after example: (Σ lengths, hidden).
    """
    if pooling == "mean":
        # A batched (1 x T) @ (T x hidden) product: no masked copy of h is made.
        m = mask.to(h.dtype)
        return torch.einsum("bt,btd->bd", m, h) / m.sum(1, keepdim=True).clamp_min(1.0)
    rows = torch.arange(h.shape[0], device=h.device)
    if pooling == "first":
        return h[rows, mask.int().argmax(1)]
    if pooling == "last":
        last = h.shape[1] - 1 - mask.flip(1).int().argmax(1)
        return h[rows, last]
    if pooling == "max":
        return h.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
    if pooling == "tokens":
        return h[mask]
    raise ValueError(f"unknown pooling {pooling!r}")
