"""Float dtypes by name: bytes per value, how a store keeps each, torch's own, bfloat16's bits.

zarr has no bfloat16, so a store keeps its bits as uint16 (CONTRACT.md); encoding rounds
to nearest even, as torch does. Reads widen them back in ``actcache.read``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
"""Bytes per value of each float dtype a model runs in or a store keeps."""

_STORED = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}


def stored_dtype(dtype: str) -> np.dtype[Any]:
    """The numpy dtype a store keeps values of storage dtype ``dtype`` in (bfloat16: uint16)."""
    return np.dtype(_STORED[dtype])


def torch_dtype(dtype: str) -> Any:
    """torch's dtype of that name (float32, float16, bfloat16, float64)."""
    import torch

    if dtype not in ITEMSIZE:
        raise KeyError(dtype)
    return getattr(torch, dtype)


def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bits (uint16), rounding to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def encode(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as a store keeps them in ``dtype`` (values read back from a store
    encode to their exact stored bits). No overflow check: the writer makes that one."""
    if dtype == "bfloat16":
        return bfloat16_bits(x)
    x = np.asarray(x, dtype=np.float32)
    return x.astype(np.float16) if dtype == "float16" else x
