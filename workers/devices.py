"""Where to compute: device selection, synchronisation, native bfloat16 and memory.

Every part of actcache that picks a device, waits for one, asks whether it computes
bfloat16 natively or how much memory it has asks here.

Two kinds of work ask for a device, and get different answers on purpose:

- Plain tensor work (probes, compare, benchmarks of them) takes the machine's accelerator
  of whatever kind torch knows — CUDA (and ROCm, which torch calls cuda), MPS on a Mac,
  XPU — else the CPU: ``pick_device()``.
- Caching places models on CUDA GPUs or the CPU only (``CACHE_ACCELERATORS``):
  ``pick_device(kinds=CACHE_ACCELERATORS)``, ``gpu_count()``. Its actors are scheduled by
  Ray's ``num_gpus``, and Ray does not count a Mac's GPU as one, so an MPS actor would be
  an unscheduled share of a machine; its device maps cap each GPU at the free memory
  CUDA reports (``memory_info``), and 8/4-bit weights (bitsandbytes) need CUDA. So on a
  Mac a caching job runs on the CPU while a probe of its store runs on MPS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

#: The accelerator kinds a caching actor places its model on (see the module docstring).
CACHE_ACCELERATORS: tuple[str, ...] = ("cuda",)
#: Tried in this order where torch is too old for ``torch.accelerator`` (before 2.6).
_KNOWN_ACCELERATORS = ("cuda", "mps", "xpu")
#: /proc/cpuinfo flags of the x86 instructions that compute bfloat16 natively.
_CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def _accelerator_api() -> Any:
    """``torch.accelerator`` (torch 2.6 and later), else None."""
    return getattr(torch, "accelerator", None)


def _backend(kind: str) -> Any:
    """``torch.cuda``, ``torch.mps``, ``torch.xpu``...: None where this torch has no such module."""
    return getattr(torch, kind, None)


def accelerator() -> torch.device | None:
    """The machine's accelerator (its kind, no index), or None on a CPU-only machine."""
    api = _accelerator_api()
    if api is not None:
        if not api.is_available():
            return None
        current = api.current_accelerator()
        return None if current is None else torch.device(current.type)
    for kind in _KNOWN_ACCELERATORS:
        backend = _backend(kind)
        if backend is not None and backend.is_available():
            return torch.device(kind)
    return None


def pick_device(prefer_gpu: bool = True, kinds: tuple[str, ...] | None = None) -> torch.device:
    """The machine's accelerator when ``prefer_gpu`` and its kind is among ``kinds`` (any
    kind when None), else the CPU."""
    found = accelerator() if prefer_gpu else None
    if found is None or (kinds is not None and found.type not in kinds):
        return torch.device("cpu")
    return found


def accelerator_count(kind: str | None = None) -> int:
    """Devices of ``kind`` (``"cuda"``, ``"mps"``...), or of the machine's accelerator; 0 without."""
    if kind is None:
        found = accelerator()
        if found is None:
            return 0
        kind = found.type
    backend = _backend(kind)
    if backend is None or not backend.is_available():
        return 0
    count = getattr(backend, "device_count", None)
    # A backend without a count (older MPS builds) has one device.
    return int(count()) if count is not None else 1


def gpu_count() -> int:
    """GPUs a caching actor can place its model on here (CUDA devices; see the module docstring)."""
    return sum(accelerator_count(kind) for kind in CACHE_ACCELERATORS)


def synchronize(device: torch.device | str) -> None:
    """Wait until ``device`` has finished its queued work: timings of asynchronous
    accelerators (CUDA, MPS, XPU) are otherwise the time it took to queue the work."""
    device = torch.device(device)
    if device.type == "cpu":
        return
    backend = _backend(device.type)
    sync = getattr(backend, "synchronize", None)
    if sync is None:
        api = _accelerator_api()
        if api is None:
            raise ValueError(f"torch cannot synchronise a {device.type!r} device")
        api.synchronize()
    elif device.type == "mps":
        sync()  # one device, and torch.mps.synchronize takes none
    else:
        sync(device)


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX).

    Without them torch emulates bf16, measured ~10x slower than float32 on an AVX2 CPU.
    Linux's flags first; else torch's own view of the CPU (its capability string, and its
    instruction check where this torch has one), which also works without /proc.
    """
    if _CPU_BF16_FLAGS & cpu_flags():
        return True
    capability = str(torch.backends.cpu.get_cpu_capability()).upper()
    if "BF16" in capability or "AMX" in capability:
        return True
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check()) if check is not None else False


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 in hardware rather than emulating it.

    CUDA: compute capability 8.0 or above (ROCm: always). CPU: ``cpu_native_bf16``.
    Other accelerators: whether a bf16 matmul runs there at all (MPS from macOS 14); what
    it gains is the caller's to measure.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return cpu_native_bf16()
    if device.type == "cuda":
        return bool(torch.cuda.is_available()
                    and torch.cuda.is_bf16_supported(including_emulation=False))
    try:
        x = torch.ones((2, 2), dtype=torch.bfloat16, device=device)
        (x @ x).sum().item()
    except (RuntimeError, TypeError):
        return False
    return True


def memory_bytes(device_index: int = 0) -> int | None:
    """Total memory of caching GPU ``device_index`` where this runs (None without CUDA)."""
    if gpu_count() == 0:
        return None
    return int(torch.cuda.get_device_properties(device_index).total_memory)


def memory_info(device_index: int) -> tuple[int, int]:
    """(free, total) bytes of caching GPU ``device_index``, as CUDA reports them now."""
    free, total = torch.cuda.mem_get_info(device_index)
    return int(free), int(total)
