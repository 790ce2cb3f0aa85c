"""Casting to the storage dtype on the writer thread, and back for exports."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actcache.schemas.errors import OverflowStorageError
from actcache.workers.dtypes import bfloat16_bits, encode, stored_dtype
from actcache.workers.writer import to_storage


def test_bfloat16_bits_equal_torch_rounding():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 10000),
                        np.array([0.0, -0.0, np.inf, -np.inf, 1.0 + 2**-8, 1.0 + 3 * 2**-8], np.float32)])
    want = torch.from_numpy(x).bfloat16().view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(bfloat16_bits(x), want)
    assert np.isnan((bfloat16_bits(np.array([np.nan], np.float32)).astype(np.uint32) << 16)
                    .view(np.float32)).all()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_values_read_back_encode_to_their_stored_bits(dtype):
    """An export in the stored dtype gives the store's own bytes back."""
    x = np.random.default_rng(1).standard_normal((5, 7)).astype(np.float32)
    stored = to_storage(torch.from_numpy(x), dtype, 0)
    assert stored.dtype == stored_dtype(dtype)
    read = torch.from_numpy(stored).view(torch.bfloat16) if dtype == "bfloat16" else \
        torch.from_numpy(stored)
    assert encode(read.float().numpy(), dtype).tobytes() == stored.tobytes()


@pytest.mark.parametrize(("value", "ok"), [(65504.0, True), (-65504.0, True), (65520.0, False),
                                           (np.inf, False)], ids=["max", "min", "over", "inf"])
def test_float16_boundary(value, ok):
    x = torch.tensor([[0.5, value]])
    if ok:
        assert to_storage(x, "float16", 3)[0, 1] == np.float16(value)
    else:
        with pytest.raises(OverflowStorageError, match="layer 3 has values up to"):
            to_storage(x, "float16", 3)
