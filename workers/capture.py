"""Forward passes that capture hidden states, stopping at the deepest requested layer."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from actcache.schemas.errors import ConfigError, ModelLoadError
from actcache.workers.adapters import Batch
from actcache.workers.model import block_list, num_layers

Pooled = dict[tuple[str, int], torch.Tensor]


class Capture:
    """Runs ``model`` on a batch and returns float32 pooled states per (pooling, layer).

    ``n_layers`` is the full model's block count. When the deepest requested layer ``k``
    is below it, the block list is cut to ``k`` blocks (if the model was not already built
    with ``k`` blocks), so a sweep over early layers does not pay for the rest of the model.
    Layer ``k`` is then read from a hook on block ``k-1``: the model's own last hidden
    state would carry its final norm, which index ``k < L`` must not.

    The model numbers its own positions (``positions = "model"``). ``positions = "mask"``
    (chosen by the self-check when a left-padded batch needs it) numbers real tokens the
    way the model numbers an unpadded input: from its position table's first position.
    ``side`` picks an encoder–decoder model's encoder (run alone) or decoder.
    ``norm(layer, h)``, when given, is applied to every layer's states before pooling
    (``final_norm`` jobs). With ``last_block``, layer ``n_layers`` is read from a hook on
    the last block too (``last_layer: block`` jobs): the block's own output, before the
    final norm that decoders put into their last hidden state.
    """

    def __init__(self, model: Any, layers: Sequence[int], n_layers: int, poolings: Sequence[str],
                 side: str | None = None,
                 norm: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                 last_block: bool = False):
        self.model = model
        self.norm = norm
        self.side = side
        # The encoder side runs the encoder alone: T5 and BART refuse a full forward without
        # decoder inputs, and the decoder would be wasted work.
        self.net = model.get_encoder() if side == "encoder" else model
        self.layers = tuple(layers)
        self.poolings = tuple(poolings)
        self.n_layers = n_layers
        self._hooked: torch.Tensor | None = None
        #: The layer read from ``_hook`` rather than from the model's hidden states.
        self._hooked_layer: int | None = None
        self.takes_positions = "position_ids" in inspect.signature(self.net.forward).parameters
        self.positions = "model"
        self._first_position = first_position(self.net)
        deepest = max(self.layers)
        keep = max(deepest, 1)
        # The decoder side runs the whole model; its block list is not the first one found.
        # The block list is looked up by the length the model was built with (``keep`` when
        # cut at load): an inner list of another length (T5's sublayers) is never taken.
        blocks = block_list(self.net, built_blocks(self.net, n_layers)) if side != "decoder" else None
        if deepest < n_layers and blocks is not None:
            del blocks[keep:]
            if deepest >= 1:
                blocks[deepest - 1].register_forward_hook(self._hook)
                self._hooked_layer = deepest
        elif last_block and deepest == n_layers:
            last = blocks if side != "decoder" else block_list(model.get_decoder(), n_layers)
            if last is None:
                raise ConfigError(
                    f"cannot find the block list of this {getattr(model.config, 'model_type', '')}"
                    " model, so its last block's output cannot be read; remove `last_layer: block`"
                )
            last[n_layers - 1].register_forward_hook(self._hook)
            self._hooked_layer = n_layers

    def _hook(self, _module: Any, _inputs: Any, output: Any) -> None:
        self._hooked = output[0] if isinstance(output, tuple) else output

    def hidden_states(self, batch: Batch) -> dict[int, torch.Tensor]:
        inputs = batch.inputs
        if self.positions == "mask":
            # Real tokens only are counted, so a left-padded example sees the positions it
            # would see alone.
            mask = inputs["attention_mask"].long()
            positions = (mask.cumsum(-1) - 1).clamp_min(0) + self._first_position
            inputs = {**inputs, "position_ids": positions}
        out = self.net(**inputs, output_hidden_states=True, return_dict=True)
        states = out.decoder_hidden_states if self.side == "decoder" else out.hidden_states
        result = {layer: states[layer] for layer in self.layers if layer != self._hooked_layer}
        if self._hooked_layer is not None:
            assert self._hooked is not None  # the hooked block ran in this forward
            result[self._hooked_layer] = self._hooked
        return result

    @torch.inference_mode()
    def __call__(self, batch: Batch) -> Pooled:
        states = self.hidden_states(batch)
        if self.norm is not None:
            states = {layer: self.norm(layer, h) for layer, h in states.items()}
        return {
            # A model split across GPUs leaves each layer's states on its block's device.
            (pooling, layer): pool(states[layer].float(), batch.mask.to(states[layer].device),
                                   pooling, batch.prefix)
            for layer in self.layers
            for pooling in self.poolings
        }


def built_blocks(net: Any, n_layers: int) -> int:
    """Blocks ``net`` was built with: its config's count (cut at load), else ``n_layers``."""
    try:
        return num_layers(net.config)
    except (AttributeError, ModelLoadError):
        return n_layers


def first_position(model: Any) -> int:
    """The position an unpadded input starts at: ``padding_idx + 1`` where the position
    table reserves a padding row (RoBERTa and its family), else 0."""
    for name, module in model.named_modules():
        if name.endswith(("position_embeddings", "embed_positions", "wpe")) and isinstance(
            module, torch.nn.Embedding
        ):
            return 0 if module.padding_idx is None else int(module.padding_idx) + 1
    return 0


def pool(h: torch.Tensor, mask: torch.Tensor, pooling: str, prefix: int = 0) -> torch.Tensor:
    """Pool ``h`` (batch, seq, hidden) over the positions where ``mask`` is true.

    ``mean`` leaves out the first ``prefix`` positions of each example (class and register
    tokens); ``tokens`` returns every unmasked position, prefix included, example after
    example: (Σ lengths, hidden).
    """
    if pooling == "mean":
        m = mask
        if prefix:
            m = mask & (mask.long().cumsum(1) > prefix)
        w = m.to(h.dtype)
        # A batched (1 x T) @ (T x hidden) product: no masked copy of h is made.
        mean = torch.einsum("bt,btd->bd", w, h) / w.sum(1, keepdim=True).clamp_min(1.0)
        if not bool(torch.isfinite(mean).all()):
            # Padding positions may hold NaN (fully masked attention rows), and 0 * NaN is
            # NaN: only then pay for a copy with padding zeroed.
            mean = h.masked_fill(~m.unsqueeze(-1), 0.0).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)
        return mean
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
