"""Where an actor's model goes, and how many bytes its weights take there.

On a GPU the model is always placed by ``device_map`` over the actor's own GPUs (one
or several: the same code path), each with an explicit memory limit that leaves
headroom for activations. Weights go to the CPU (or disk) only when the job allows
offload; otherwise a model that does not fit is an error, never a silent slowdown.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from actcache.schemas.errors import ModelTooLargeError

#: Left free on each GPU for activations, the CUDA context and the allocator's slack:
#: this fraction of the GPU's memory, and at least HEADROOM_MIN_BYTES.
HEADROOM_FRACTION = 0.15
HEADROOM_MIN_BYTES = 1 << 30
#: Bytes per weight once quantised (bitsandbytes keeps norms and embeddings wider: an
#: estimate that errs towards "fits", the actor's own placement check is exact).
QUANTIZED_BYTES = {"8bit": 1.0, "4bit": 0.5}
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
#: The first numeric part of a weight's name is its block (``model.layers.7.mlp``,
#: ``h.7.attn``, ``encoder.layer.7.output``).
_BLOCK_INDEX = re.compile(r"(?:^|\.)(\d+)\.")


def headroom(total_bytes: int) -> int:
    return max(int(total_bytes * HEADROOM_FRACTION), HEADROOM_MIN_BYTES)


def actor_gpus(gpus_per_worker: float | None) -> list[int]:
    """CUDA device indices this actor places its model on (none without CUDA).

    Inside a Ray actor only its own GPUs are visible; in-process runs take the first ones.
    """
    import torch

    if not torch.cuda.is_available():
        return []
    want = max(1, math.ceil(gpus_per_worker or 1))
    return list(range(min(want, torch.cuda.device_count())))


def max_memory(gpus: list[int], offload: bool) -> dict[Any, int]:
    """Per-device limits for ``device_map``: free memory less headroom; the CPU only on offload."""
    import psutil
    import torch

    limits: dict[Any, int] = {}
    for index in gpus:
        free, total = torch.cuda.mem_get_info(index)
        limits[index] = max(0, free - headroom(total))
    if offload:
        limits["cpu"] = int(psutil.virtual_memory().available * 0.8)
    return limits


def offloaded(model: Any) -> list[str]:
    """Modules that ``device_map`` left on the CPU or disk."""
    placed = getattr(model, "hf_device_map", None) or {}
    return [name for name, device in placed.items() if device in ("cpu", "disk")]


def check_placement(model: Any, name: str, gpus: list[int], offload: bool) -> None:
    off = offloaded(model)
    if off and not offload:
        raise ModelTooLargeError(
            f"model {name!r} does not fit the actor's {len(gpus)} GPU(s) ({len(off)} modules "
            "would be offloaded to the CPU); raise `gpus_per_worker`, cache fewer layers, "
            "quantise, or set `offload: true` (slow)"
        )


def weight_files(folder: str) -> list[Path]:
    files = sorted(Path(folder).rglob("*.safetensors"))
    return files or sorted(Path(folder).rglob("*.bin"))


def checkpoint_dtype(config: Any, folder: str) -> str:
    """The checkpoint's own dtype: the config's, else the first floating tensor's, else float32."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(value).removeprefix("torch.") if value is not None else ""
    if name in _DTYPE_BYTES:
        return name
    from safetensors import safe_open

    for path in weight_files(folder):
        if path.suffix != ".safetensors":
            break
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                dtype = str(f.get_slice(key).get_dtype())
                found = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(dtype)
                if found:
                    return found
    return "float32"


def weight_bytes(folder: str, depth: int, n_layers: int, dtype: str, quantize: str | None) -> int:
    """Bytes the weights of blocks 0..depth-1 (and everything outside the blocks) take loaded.

    Read from the safetensors headers (names and shapes, no weights); for other formats
    the file sizes, scaled by the share of blocks kept.
    """
    per_weight = QUANTIZED_BYTES[quantize] if quantize else _DTYPE_BYTES.get(dtype, 4)
    files = weight_files(folder)
    if files and files[0].suffix == ".safetensors":
        from safetensors import safe_open

        count = 0
        for path in files:
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    block = _BLOCK_INDEX.search(key)
                    if block and int(block.group(1)) >= depth:
                        continue
                    count += math.prod(f.get_slice(key).get_shape())
        return int(count * per_weight)
    size = sum(p.stat().st_size for p in files)
    # A .bin checkpoint's own dtype is unknown without loading it: take the model's.
    return int(size * min(1.0, depth / max(n_layers, 1)) * per_weight / _DTYPE_BYTES.get(dtype, 4))
