"""Plain-transformers reference computations the stored values are checked against."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from actcache.workers.model import resolve_model_path


def reference_states(
    model: str, texts: Sequence[str], layers: Sequence[int], max_length: int = 512
) -> list[dict[int, np.ndarray]]:
    """Per text: {layer: (T, hidden)} from ``output_hidden_states``, one unpadded text at a time."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_path(model)
    tok = AutoTokenizer.from_pretrained(path)
    net = AutoModel.from_pretrained(path).eval()
    out = []
    with torch.inference_mode():
        for text in texts:
            enc = tok(text, return_tensors="pt", truncation=True, max_length=max_length)
            hs = net(**enc, output_hidden_states=True).hidden_states
            out.append({layer: hs[layer][0].float().numpy() for layer in layers})
    return out


def pooled(states: list[dict[int, np.ndarray]], layer: int, pooling: str) -> np.ndarray:
    rows = [s[layer] for s in states]
    if pooling == "mean":
        return np.stack([r.mean(0) for r in rows])
    if pooling == "first":
        return np.stack([r[0] for r in rows])
    if pooling == "last":
        return np.stack([r[-1] for r in rows])
    if pooling == "max":
        return np.stack([r.max(0) for r in rows])
    if pooling == "tokens":
        return np.concatenate(rows)
    raise ValueError(pooling)
