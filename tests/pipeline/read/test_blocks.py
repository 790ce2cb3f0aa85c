"""``Store.blocks``, the one read path: equal to plain zarr for every layout, each requested
row once in physical order, bounded memory, packed token stores at their tokens' size."""

from __future__ import annotations

import os
import tracemalloc
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from actcache import open_store
from actcache.read._fetch import MERGE_BYTES
from actcache.schemas import store as layout
from actcache.store import Store
from actcache.testing import downgrade, synthetic_store

N, HIDDEN, RPU, CHUNK = 300, 12, 128, 32
LAYERS = (0, 3)


def _values(seed: int = 0) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 9, N)  # a row may have no token position at all
    x = {k: rng.standard_normal((N, HIDDEN), dtype=np.float32) for k in LAYERS}
    t = {k: rng.standard_normal((int(lengths.sum()), HIDDEN), dtype=np.float32) for k in LAYERS}
    return x, t, lengths


def _write(url: str, dtype: str, version: int = 3, **options: object) -> Store:
    x, t, lengths = _values()
    store = synthetic_store(url, x, rows_per_unit=RPU, chunk_rows=CHUNK, dtype=dtype,
                            poolings=("mean", "tokens"), tokens=t, token_lengths=lengths,
                            **options)  # type: ignore[arg-type]
    return store if version == 3 else downgrade(url, version)


def _plain(url: str, storage_options: dict | None = None) -> zarr.Group:
    if url.startswith("s3://"):
        return zarr.open_group(url, mode="r", storage_options=storage_options or {})
    return zarr.open_group(url, mode="r")


def _widen(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def plain_zarr_values(url: str, layer: int, pooling: str, dtype: str,
                      storage_options: dict | None = None) -> dict[tuple[int, int], np.ndarray]:
    """(store row, position) -> float32 values, read with plain zarr and numpy only, from
    the layout docs/STORE.md documents for each format."""
    g = _plain(url, storage_options)
    m = dict(g.attrs[layout.MANIFEST_ATTR])
    s = open_store(url, storage_options)
    slots = s.physical_slots()
    if pooling != "tokens":
        arr = _widen(g[layout.activation_key(pooling, layer)][:], dtype)
        return {(r, 0): arr[slot] for r, slot in enumerate(slots)}
    offsets, lengths = g[layout.TOKEN_OFFSET_KEY][:], g[layout.TOKEN_LENGTH_KEY][:]
    out = {}
    packed = m["format_version"] >= 3
    flat = None if packed else _widen(g[layout.activation_key("tokens", layer)][:], dtype)
    units: dict[int, np.ndarray] = {}
    for r, slot in enumerate(slots):
        n, o = int(lengths[slot]), int(offsets[slot])
        if not n:
            continue
        if packed:
            u = int(slot) // RPU
            if u not in units:
                units[u] = _widen(g[layout.token_unit_key(layer, u)][:], dtype)
            unit = units[u]
        else:
            unit = flat
        for p in range(n):
            out[(r, p)] = unit[o + p]
    return out


def check_blocks(store: Store, url: str, layer: int, pooling: str, dtype: str,
                 rows: list[int] | None, block_bytes: int,
                 storage_options: dict | None = None) -> None:
    want = plain_zarr_values(url, layer, pooling, dtype, storage_options)
    wanted_rows = set(range(store.n_rows)) if rows is None else set(rows)
    want = {k: v for k, v in want.items() if k[0] in wanted_rows}
    seen: dict[tuple[int, int], np.ndarray] = {}
    slots = store.physical_slots()
    last = -1
    for block in store.blocks(layer, pooling, rows=rows, block_bytes=block_bytes):
        assert block.values.dtype == np.float32 and block.values.shape == (len(block), HIDDEN)
        assert block.rows.dtype == np.int64
        if pooling == "tokens":
            assert block.positions is not None and block.positions.dtype == np.int32
            positions = block.positions
        else:
            assert block.positions is None
            positions = np.zeros(len(block), np.int32)
        # Physical order: slots never go back.
        assert np.all(np.diff(slots[block.rows]) >= 0) and slots[block.rows[0]] >= last
        last = int(slots[block.rows[-1]])
        for r, p, v in zip(block.rows, positions, block.values, strict=True):
            key = (int(r), int(p))
            assert key not in seen, f"{key} twice"
            seen[key] = v.copy()
    assert seen.keys() == want.keys()
    for key, value in want.items():
        np.testing.assert_array_equal(seen[key], value, err_msg=str(key))


ROWS = [None, [299, 5, 130, 129, 5, 0, 250]]  # restricted: any order, a duplicate


@pytest.mark.parametrize("rows", ROWS, ids=["all", "some"])
@pytest.mark.parametrize("pooling", ["mean", "tokens"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("version", [1, 2, 3])
def test_blocks_equal_plain_zarr_locally(tmp_path: Path, version: int, dtype: str, pooling: str,
                                         rows: list[int] | None) -> None:
    url = str(tmp_path / "s.zarr")
    store = _write(url, dtype, version)
    assert store.manifest["format_version"] == version
    # Small blocks: several per unit and blocks that cut through units.
    check_blocks(store, url, 3, pooling, dtype, rows, block_bytes=CHUNK * HIDDEN * 4 * 2)
    check_blocks(store, url, 0, pooling, dtype, rows, block_bytes=2**20)


@pytest.mark.parametrize("pooling", ["mean", "tokens"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_blocks_equal_plain_zarr_in_memory(dtype: str, pooling: str) -> None:
    url = f"memory://blocks-{uuid.uuid4().hex[:8]}.zarr"
    store = _write(url, dtype)
    for rows in ROWS:
        check_blocks(store, url, 3, pooling, dtype, rows, block_bytes=CHUNK * HIDDEN * 4 * 3)


@pytest.mark.s3
@pytest.mark.parametrize("pooling", ["mean", "tokens"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_blocks_equal_plain_zarr_on_s3(s3_bucket: str, dtype: str, pooling: str) -> None:
    url = f"s3://{s3_bucket}/s.zarr"
    opts = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
    store = _write(url, dtype)
    for rows in ROWS:
        check_blocks(store, url, 3, pooling, dtype, rows, block_bytes=CHUNK * HIDDEN * 4 * 3,
                     storage_options=opts)


def test_read_of_tokens_is_the_blocks_in_the_order_asked(tmp_path: Path) -> None:
    url = str(tmp_path / "s.zarr")
    store = _write(url, "float32")
    _, t, lengths = _values()
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    rows = [7, 3, 3, 200, 0]
    want = np.concatenate([t[3][offsets[r]:offsets[r + 1]] for r in rows])
    np.testing.assert_array_equal(store.read(3, "tokens", rows=rows), want)
    np.testing.assert_array_equal(store.read(3, "tokens"), t[3])
    np.testing.assert_array_equal(store.token_lengths(rows), lengths[rows])


@pytest.mark.parametrize("pooling", ["mean", "tokens"])
def test_memory_is_two_blocks_and_two_reads_on_a_store_ten_times_a_block(
        tmp_path: Path, pooling: str) -> None:
    """A pass over a store ten times the block size holds the reader's ring of two float32
    blocks, the stored values of two reads (the one widened and the next, fetched ahead;
    each half a float32 block in float16 and never above ``MERGE_BYTES``) and the row
    numbers (16 bytes a value row)."""
    rng = np.random.default_rng(1)
    n, hidden, rpu = 8192, 128, 512
    lengths = rng.integers(1, 5, n)
    total = int(lengths.sum())
    x = rng.standard_normal((n, hidden), dtype=np.float32)
    t = rng.standard_normal((total, hidden), dtype=np.float32)
    store = synthetic_store(str(tmp_path / "big.zarr"), {0: x}, rows_per_unit=rpu,
                            dtype="float16", poolings=("mean", "tokens"), tokens={0: t},
                            token_lengths=lengths)
    values = total if pooling == "tokens" else n
    block = values * hidden * 4 // 10
    shard = min(MERGE_BYTES, block // 2)
    sum(len(b) for b in store.blocks(0, pooling, block_bytes=block))  # warm: imports, listing
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        count = sum(len(b) for b in store.blocks(0, pooling, block_bytes=block))
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert count == values
    assert peak <= 2 * block + 2 * shard + 16 * values + 2**18, peak / block


def test_a_token_store_on_disk_is_its_tokens_bytes_plus_its_row_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    n, hidden = 4000, 64
    lengths = rng.integers(1, 200, n)  # max_length 199: format 2 reserved 199 slots per row
    total = int(lengths.sum())
    t = {5: rng.standard_normal((total, hidden), dtype=np.float32)}
    root = tmp_path / "tokens.zarr"
    synthetic_store(str(root), {}, rows_per_unit=500, dtype="float16", poolings=("tokens",),
                    tokens=t, token_lengths=lengths)

    def size(path: Path) -> int:
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

    rows = size(root / "rows") + size(root / "units") + (root / "zarr.json").stat().st_size
    expected = total * hidden * 2 + rows
    assert abs(size(root) - expected) <= 0.05 * expected, (size(root), expected)
    assert size(root / "tokens") >= total * hidden * 2


def test_xarray_and_tensorstore_open_a_packed_token_store(tmp_path: Path) -> None:
    xr = pytest.importorskip("xarray")
    ts = pytest.importorskip("tensorstore")
    url = str(tmp_path / "s.zarr")
    store = _write(url, "float32")
    _, t, lengths = _values()
    per_unit = np.add.reduceat(lengths, np.arange(0, N, RPU))
    starts = np.concatenate([[0], np.cumsum(per_unit)])
    group = xr.open_zarr(url, group="tokens/layer_3", consolidated=False)
    for unit in range(len(store.receipts)):
        name = layout.unit_name(unit)
        want = t[3][starts[unit]:starts[unit + 1]]
        assert group[name].dims == (f"token_{name}", "hidden")
        np.testing.assert_array_equal(group[name].values, want)
        arr = ts.open({"driver": "zarr3", "kvstore": {
            "driver": "file", "path": os.path.join(url, layout.token_unit_key(3, unit))}}).result()
        np.testing.assert_array_equal(arr.read().result(), want)


def test_bfloat16_blocks_widen_exactly(tmp_path: Path) -> None:
    url = str(tmp_path / "s.zarr")
    store = _write(url, "bfloat16")
    x, _, _ = _values()
    exact = torch.from_numpy(x[3]).to(torch.bfloat16).float().numpy()
    got = np.empty_like(exact)
    for block in store.blocks(3):
        got[block.rows] = block.values
    np.testing.assert_array_equal(got, exact)
