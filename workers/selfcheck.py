"""The start-up self-check: a padded batch must give what each example gives alone.

Padding is the most common silent failure of activation caching: a model that numbers
left-padded positions from the pad, or reads padding it should ignore, gives plausible
but wrong values. Before its first unit a worker runs a few real inputs of different
lengths as one padded batch and one at a time, and compares every requested layer and
pooling. When they differ it tries the fixes it knows (the model's own position rule
fed with mask-aware positions; the other padding side) and keeps the first that makes
them agree; when none does, the job is refused.

The inputs run alone are also encoded alone, so an image processor that the adapter runs
over many images per call is proved exact too (and run one image per call if it is
not). Works on the adapter seam only (``InputAdapter``: ``encode``, ``batch``,
``batch_key``, a capture of a ``Batch``), so it applies to every modality unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from actcache.schemas.errors import SelfCheckError
from actcache.workers.adapters import Encoded, InputAdapter

# Relative error allowed between batched and alone values (max |diff| / max |alone| of a
# layer), by the least precise of the forward and storage dtypes: well above the rounding
# noise of differently shaped matmuls, far below what a padding bug does (~0.1 to 1).
TOLERANCE = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 2e-2}
CHECK_EXAMPLES = 4


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


def compare(capture: Any, adapter: InputAdapter, examples: Sequence[dict[str, Any]],
            alone: Sequence[dict[str, Any]], device: torch.device | None = None
            ) -> tuple[float, str]:
    """(largest relative error over layers and poolings, where it is) of ``examples`` run
    in the batches the worker forms against ``alone[i]``: the same input encoded alone
    and run alone."""
    def run(group: Sequence[dict[str, Any]]) -> dict[tuple[str, int], torch.Tensor]:
        batch = adapter.batch(group)
        return dict(capture(batch if device is None else batch.to(device)))

    # Examples the adapter never batches together (images of other pixel shapes, audio
    # for a group-norm feature encoder of other lengths) are compared in the groups the
    # worker forms.
    groups: dict[Any, list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(adapter.batch_key(e), []).append(i)
    parts = [run([examples[i] for i in group]) for group in groups.values()]
    batched = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    singles = [run([alone[i]]) for group in groups.values() for i in group]
    worst, where = 0.0, ""
    for key, got in batched.items():
        want = torch.cat([a[key] for a in singles])
        scale = float(want.abs().max()) or 1.0
        diff = (got - want).abs().max()
        err = float("inf") if not torch.isfinite(diff) else float(diff) / scale
        if err > worst:
            worst, where = err, f"layer {key[1]} ({key[0]})"
    return worst, where


def candidates(capture: Any, adapter: InputAdapter) -> list[tuple[str, str, bool]]:
    """(padding side, position rule, batched processor) to try, as given first.

    A processor run over many inputs per call that does not prove exact falls back to
    one input per call before the job is refused.
    """
    rules = ["model", "mask"] if capture.takes_positions else ["model"]
    together = [True, False] if adapter.batched_processor else [False]
    return [(s, r, t) for t in together for s in adapter.padding_sides for r in rules]


def self_check(capture: Any, adapter: InputAdapter, inputs: Sequence[Any], tol: float, model: str,
               device: torch.device | None = None) -> dict[str, Any]:
    """Choose a padding side and position rule that make batches exact, or refuse.

    ``inputs`` are encoded as a unit's are (a batched processor included) and compared,
    batch by batch, with each input encoded and run alone. The winning choice is left
    applied to ``adapter`` and ``capture``; the returned record goes into the manifest.
    """
    alone = [adapter.encode([x]).examples[0] for x in inputs]
    encodings: dict[bool, Encoded] = {}
    tried: list[str] = []
    first_error, first_where = 0.0, ""
    for side, rule, together in candidates(capture, adapter):
        adapter.padding_side, capture.positions = side, rule
        adapter.batched_processor = together
        if together not in encodings:
            encodings[together] = adapter.encode(inputs)
        encoded = encodings[together]
        err, where = compare(capture, adapter, encoded.examples, alone, device)
        if err <= tol:
            return {
                "examples": len(inputs), "lengths": list(encoded.lengths), "padding_side": side,
                "positions": rule, "batched_processor": together, "max_rel_error": err,
                "tolerance": tol,
            }
        if not tried:
            first_error, first_where = err, where
        tried.append(f"{side} padding with {rule} positions"
                     + (", batched processor" if together else ""))
    raise SelfCheckError(
        f"model {model!r} is not exact under padding: at {first_where} a padded batch differs "
        f"from each input alone by a relative error of {first_error:.3g} (tolerance {tol:g}; "
        f"tried {', '.join(tried)}); set `batch_size: 1` to run each input alone"
    )
