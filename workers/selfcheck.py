"""The start-up self-check: a padded batch must give what each example gives alone.

Padding is the most common silent failure of activation caching: a model that numbers
left-padded positions from the pad, or reads padding it should ignore, gives plausible
but wrong values. Before its first unit a worker runs a few real inputs of different
lengths as one padded batch and one at a time, and compares every requested layer and
pooling. When they differ it tries the fixes it knows (the model's own position rule
fed with mask-aware positions; the other padding side) and keeps the first that makes
them agree; when none does, the job is refused.

Works on the adapter seam only (``encode``/``batch`` and a capture of a ``Batch``), so it
applies to every modality unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from actcache.schemas.errors import SelfCheckError

# Relative error allowed between batched and alone values (max |diff| / max |alone| of a
# layer), by the least precise of the forward and storage dtypes: well above the rounding
# noise of differently shaped matmuls, far below what a padding bug does (~0.1 to 1).
TOLERANCE = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 2e-2}
CHECK_EXAMPLES = 4
CHECK_INPUTS = "check_inputs"
"""Key of the worker's manifest (not stored) that holds the self-check's inputs."""


def tolerance(dtype: str, model_dtype: str) -> float:
    return max(TOLERANCE[dtype], TOLERANCE[model_dtype])


def pick_inputs(inputs: Sequence[Any], count: int = CHECK_EXAMPLES) -> list[Any]:
    """A few inputs spread over the range of lengths (shortest, longest and between)."""
    def size(x: Any) -> int:
        return len(x) if isinstance(x, str) else len(str(x))

    by_size = sorted(dict.fromkeys(inputs), key=size)
    if len(by_size) <= count:
        return by_size
    picks = [by_size[round(i * (len(by_size) - 1) / (count - 1))] for i in range(count)]
    return list(dict.fromkeys(picks))


def compare(capture: Any, adapter: Any, examples: Sequence[dict[str, Any]],
            device: torch.device | None = None) -> tuple[float, str]:
    """(largest relative error over layers and poolings, where it is) of batched vs alone."""
    def run(group: Sequence[dict[str, Any]]) -> dict[tuple[str, int], torch.Tensor]:
        batch = adapter.batch(group)
        return dict(capture(batch if device is None else batch.to(device)))

    # Examples the adapter never batches together (images of other pixel shapes, audio
    # for a group-norm feature encoder of other lengths) are compared in the groups the
    # worker forms.
    key_of = getattr(adapter, "batch_key", None)
    groups: dict[Any, list[dict[str, Any]]] = {}
    for e in examples:
        groups.setdefault(key_of(e) if key_of else None, []).append(e)
    ordered = [e for group in groups.values() for e in group]
    parts = [run(group) for group in groups.values()]
    batched = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    alone = [run([e]) for e in ordered]
    worst, where = 0.0, ""
    for key, got in batched.items():
        want = torch.cat([a[key] for a in alone])
        scale = float(want.abs().max()) or 1.0
        diff = (got - want).abs().max()
        err = float("inf") if not torch.isfinite(diff) else float(diff) / scale
        if err > worst:
            worst, where = err, f"layer {key[1]} ({key[0]})"
    return worst, where


def candidates(capture: Any, adapter: Any) -> list[tuple[str, str]]:
    """(padding side, position rule) pairs to try, as given first."""
    side = adapter.padding_side
    other = "left" if side == "right" else "right"
    rules = ["model", "mask"] if capture.takes_positions else ["model"]
    sides = [side, other] if hasattr(adapter, "tokenizer") else [side]
    return [(s, r) for s in sides for r in rules]


def self_check(capture: Any, adapter: Any, encoded: Any, tol: float, model: str,
               device: torch.device | None = None) -> dict[str, Any]:
    """Choose a padding side and position rule that make batches exact, or refuse.

    The winning choice is left applied to ``adapter`` and ``capture``; the returned record
    goes into the manifest.
    """
    examples = encoded.examples
    tried: list[str] = []
    first_error, first_where = 0.0, ""
    for side, rule in candidates(capture, adapter):
        adapter.padding_side, capture.positions = side, rule
        err, where = compare(capture, adapter, examples, device)
        if err <= tol:
            return {
                "examples": len(examples), "lengths": list(encoded.lengths), "padding_side": side,
                "positions": rule, "max_rel_error": err, "tolerance": tol,
            }
        if not tried:
            first_error, first_where = err, where
        tried.append(f"{side} padding with {rule} positions")
    raise SelfCheckError(
        f"model {model!r} is not exact under padding: at {first_where} a padded batch differs "
        f"from each input alone by a relative error of {first_error:.3g} (tolerance {tol:g}; "
        f"tried {', '.join(tried)}); set `batch_size: 1` to run each input alone"
    )
