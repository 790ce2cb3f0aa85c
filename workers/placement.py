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

from actcache.schemas.errors import ModelLoadError, ModelTooLargeError
from actcache.schemas.job import JobConfig
from actcache.workers.dtypes import ITEMSIZE

#: Left free on each GPU for activations, the CUDA context and the allocator's slack:
#: this fraction of the GPU's memory, and at least HEADROOM_MIN_BYTES.
HEADROOM_FRACTION = 0.15
HEADROOM_MIN_BYTES = 1 << 30
#: Bytes per weight once quantised (bitsandbytes keeps norms and embeddings wider: an
#: estimate that errs towards "fits", the actor's own placement check is exact).
QUANTIZED_BYTES = {"8bit": 1.0, "4bit": 0.5}
#: The first numeric part of a weight's name is its block (``model.layers.7.mlp``,
#: ``h.7.attn``, ``encoder.layer.7.output``).
_BLOCK_INDEX = re.compile(r"(?:^|\.)(\d+)\.")


def headroom(total_bytes: int) -> int:
    return max(int(total_bytes * HEADROOM_FRACTION), HEADROOM_MIN_BYTES)


def actor_gpus(gpus_per_worker: float | None) -> list[int]:
    """CUDA device indices this actor places its model on (none without CUDA: caching does
    not use other accelerators, ``devices`` says why).

    Inside a Ray actor only its own GPUs are visible; in-process runs take the first ones.
    """
    from actcache.workers.devices import gpu_count

    have = gpu_count()
    if not have:
        return []
    want = max(1, math.ceil(gpus_per_worker or 1))
    return list(range(min(want, have)))


def max_memory(gpus: list[int], offload: bool) -> dict[Any, int]:
    """Per-device limits for ``device_map``: free memory less headroom; the CPU only on offload."""
    import psutil

    from actcache.workers.devices import memory_info

    limits: dict[Any, int] = {}
    for index in gpus:
        free, total = memory_info(index)
        limits[index] = max(0, free - headroom(total))
    if offload:
        limits["cpu"] = int(psutil.virtual_memory().available * 0.8)
    return limits


def plan_device_map(config: Any, dtype: Any, limits: dict[Any, int], trust_remote_code: bool = False
                    ) -> dict[str, Any]:
    """Module name -> device within ``limits``, balanced over the GPUs; no weight is read.

    Worked out on an empty (meta) model, so a model that would spill to the CPU or disk
    is known before loading starts.
    """
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory
    from transformers import AutoModel

    with init_empty_weights():
        empty = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    no_split = getattr(empty, "_no_split_modules", None) or []
    if sum(1 for device in limits if device != "cpu") > 1:
        limits = get_balanced_memory(empty, max_memory=limits, no_split_module_classes=no_split,
                                     dtype=dtype)
    return dict(infer_auto_device_map(empty, max_memory=limits, no_split_module_classes=no_split,
                                      dtype=dtype))


def load_kwargs(name: str, config: Any, dtype: Any, job: JobConfig, gpus: list[int]
                ) -> dict[str, Any]:
    """``from_pretrained`` arguments placing the model: dtype, device map, quantisation.

    Without ``gpus`` the model stays on the CPU. With them the device map is worked out
    first, so a model that does not fit is refused before a weight is read (unless the job
    allows offload, which then goes to the CPU, and past it to a temporary folder).
    """
    kwargs: dict[str, Any] = {"dtype": dtype}
    offload, quantize = job.offload, job.quantize
    if gpus:
        limits = max_memory(gpus, offload)
        # Quantised sizes are the quantiser's to work out: it places, and is checked after.
        device_map: Any = "auto"
        if not quantize:
            device_map = plan_device_map(config, dtype, limits, job.trust_remote_code)
            check_placement(device_map, name, gpus, offload)
        kwargs.update(device_map=device_map, max_memory=limits)
        if offload:
            import tempfile

            kwargs["offload_folder"] = tempfile.mkdtemp(prefix="actcache-offload-")
    if quantize:
        from transformers import BitsAndBytesConfig

        bits = {"load_in_8bit": True} if quantize == "8bit" else {"load_in_4bit": True}
        kwargs["quantization_config"] = BitsAndBytesConfig(**bits)
    return kwargs


def off_gpu(device_map: dict[str, Any]) -> list[str]:
    """Modules a device map puts on the CPU or disk."""
    return [name for name, device in device_map.items() if device in ("cpu", "disk")]


def offloaded(model: Any) -> list[str]:
    """Modules that the loaded model keeps on the CPU or disk."""
    return off_gpu(getattr(model, "hf_device_map", None) or {})


def check_placement(device_map: dict[str, Any], name: str, gpus: list[int], offload: bool) -> None:
    off = off_gpu(device_map)
    if off and not offload:
        raise ModelTooLargeError(
            f"model {name!r} does not fit the actor's {len(gpus)} GPU(s) ({len(off)} modules "
            "would be offloaded to the CPU or disk); raise `gpus_per_worker`, cache fewer layers, "
            "set `quantize`, or set `offload: true` (slow)"
        )


def weight_files(folder: str) -> list[Path]:
    files = sorted(Path(folder).rglob("*.safetensors"))
    return files or sorted(Path(folder).rglob("*.bin"))


def checkpoint_dtype(config: Any, folder: str) -> str:
    """The checkpoint's own dtype: the config's, else the first floating tensor's, else float32."""
    # transformers 5 reads a config.json's `torch_dtype` into `dtype` (the old name warns).
    value = getattr(config, "dtype", None)
    name = str(value).removeprefix("torch.") if value is not None else ""
    if name in ITEMSIZE:
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
    per_weight = QUANTIZED_BYTES[quantize] if quantize else ITEMSIZE.get(dtype, 4)
    files = weight_files(folder)
    if files and files[0].suffix == ".safetensors":
        from safetensors import safe_open

        count = 0
        for path in files:
            try:
                with safe_open(str(path), "pt") as f:
                    for key in f.keys():
                        block = _BLOCK_INDEX.search(key)
                        if not block or int(block.group(1)) < depth:
                            count += math.prod(f.get_slice(key).get_shape())
            except Exception as e:  # safetensors raises its own error types
                raise ModelLoadError(f"cannot read the weights {path.name} of {folder!r}: {e}; "
                                     "fix or replace the checkpoint") from e
        return int(count * per_weight)
    size = sum(p.stat().st_size for p in files)
    # A .bin checkpoint's own dtype is unknown without loading it: take the model's.
    return int(size * min(1.0, depth / max(n_layers, 1)) * per_weight / ITEMSIZE.get(dtype, 4))
