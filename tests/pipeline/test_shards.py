"""Whole uncompressed shards read directly equal zarr's reads, and fail their checksums."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from actcache.schemas.errors import StoreCorruptError
from actcache.testing import synthetic_store


def _store(tmp_path: Path, dtype: str, chunk_rows: int | None = None):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2500, 48)).astype(np.float32)
    return synthetic_store(str(tmp_path / f"{dtype}.zarr"), {0: x, 2: 3 * x},
                           rows_per_unit=1024, dtype=dtype, chunk_rows=chunk_rows)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("chunk_rows", [None, 256])
def test_direct_shard_reads_equal_zarr(tmp_path, dtype, chunk_rows) -> None:
    store = _store(tmp_path, dtype, chunk_rows)
    for start, stop in ((0, 1024), (1000, 2100), (2048, 2500), (0, 2500), (7, 8)):
        got = store.read_stored(2, None, start, stop)
        want = store._checked("mean/layer_2", store._slots[start:stop], 1024)
        assert got.dtype == want.dtype and np.array_equal(got, want), (start, stop)
    # One chunk per shard is read directly; 256-row chunks in 1,024-row shards go to zarr.
    assert (store._readers["mean/layer_2"].folder is not None) == (chunk_rows is None)


def test_a_flipped_byte_fails_its_checksum_and_names_the_unit(tmp_path) -> None:
    store = _store(tmp_path, "float16")
    shard = Path(store.url) / "mean" / "layer_2" / "c" / "1" / "0"
    data = bytearray(shard.read_bytes())
    data[200] ^= 0x04
    shard.write_bytes(bytes(data))
    assert store.read_stored(2, None, 0, 1024).shape == (1024, 48)
    with pytest.raises(StoreCorruptError, match=r"unit 1 \(mean/layer_2\)"):
        store.read_stored(2, None, 1024, 2048)
