"""What a query reads (only the chunks it needs, locally and on S3) and what it exports."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.storage import FsspecStore, LocalStore

import actcache.read._fetch
from actcache import open_store
from actcache.query import export
from actcache.testing import synthetic_store

N, HIDDEN, RPU, CHUNK = 256, 32, 64, 16
LAYER_CHUNKS = "mean/layer_1/c/"


def _data() -> dict[int, np.ndarray]:
    rng = np.random.default_rng(3)
    return {1: rng.standard_normal((N, HIDDEN)).astype(np.float32)}


def _meta() -> list[dict[str, Any]]:
    return [{"label": i % 2, "city": f"c{i % 5}"} for i in range(N)]


def _ids() -> list[str]:
    return [f"ex-{i}" for i in range(N)]


def record_gets(monkeypatch: pytest.MonkeyPatch, cls: type) -> list[tuple[str, Any, int]]:
    """(key, byte range, bytes) of every read the zarr store class serves from now on."""
    calls: list[tuple[str, Any, int]] = []
    original = cls.get

    async def get(self, key, prototype=None, byte_range=None):  # type: ignore[no-untyped-def]
        buf = await original(self, key, prototype, byte_range)
        calls.append((key, byte_range, 0 if buf is None else len(buf)))
        return buf

    monkeypatch.setattr(cls, "get", get)
    return calls


def _layer_reads(calls: list[tuple[str, Any, int]]) -> dict[str, Any]:
    mine = [c for c in calls if LAYER_CHUNKS in c[0]]
    return {
        "inner_chunks": [c for c in mine if isinstance(c[1], RangeByteRequest)],
        "indexes": [c for c in mine if isinstance(c[1], SuffixByteRequest)],
        "whole_shards": [c for c in mine if c[1] is None],
        "bytes": sum(c[2] for c in mine),
        "shards": sorted({c[0].split(LAYER_CHUNKS, 1)[1] for c in mine}),
    }


def _check_few_ids_touch_their_chunks(url: str, calls: list[tuple[str, Any, int]],
                                      storage_options: dict[str, Any] | None = None) -> None:
    s = open_store(url, storage_options)
    assert s.chunk_rows == CHUNK
    # ex-5 and ex-9 share chunk 0 of shard 0; ex-200 is in chunk 0 of shard 3.
    rows = s.rows_for_ids(["ex-200", "ex-5", "ex-9"])
    calls.clear()
    x = s.read(1, rows=rows)
    np.testing.assert_array_equal(x, _data()[1][[200, 5, 9]])
    few = _layer_reads(calls)
    assert len(few["inner_chunks"]) == 2
    assert len(few["indexes"]) == 2
    assert few["whole_shards"] == []
    assert few["shards"] == ["0/0", "3/0"]
    calls.clear()
    s.read(1)
    whole = _layer_reads(calls)
    assert len(whole["whole_shards"]) == N // RPU
    chunk_bytes = whole["bytes"] / (N // CHUNK)
    # Two compressed chunks plus two shard indexes (16 bytes per inner chunk + checksum).
    assert few["bytes"] <= 2 * chunk_bytes * 1.5 + 2 * (RPU // CHUNK * 16 + 4)
    assert few["bytes"] < whole["bytes"] / 4


def test_reading_a_few_ids_touches_only_their_chunks_locally(tmp_path, monkeypatch) -> None:
    # zarrs and whole-shard file reads are out of this recorder's reach: the plan is the
    # same whatever reads the chunks, so record it through zarr-python's pipeline.
    monkeypatch.setattr(actcache.read._fetch, "_zarrs_available", lambda: False)
    monkeypatch.setattr(actcache.read._fetch.ShardFiles, "of", classmethod(lambda *a: None))
    url = str(tmp_path / "s.zarr")
    synthetic_store(url, _data(), _ids(), _meta(), rows_per_unit=RPU, chunk_rows=CHUNK)
    _check_few_ids_touch_their_chunks(url, record_gets(monkeypatch, LocalStore))


@pytest.mark.s3
def test_reading_a_few_ids_touches_only_their_chunks_on_s3(s3_bucket, monkeypatch) -> None:
    url = f"s3://{s3_bucket}/s.zarr"
    synthetic_store(url, _data(), _ids(), _meta(), rows_per_unit=RPU, chunk_rows=CHUNK)
    _check_few_ids_touch_their_chunks(url, record_gets(monkeypatch, FsspecStore))
    w = np.ones(HIDDEN, np.float32)
    expected = np.lexsort((np.arange(N), -(_data()[1] @ w)))[:5]
    assert open_store(url).topk(1, w, 5).rows.tolist() == expected.tolist()


@pytest.mark.parametrize(
    ("dtype", "stored", "as_float"),
    [
        ("float32", np.float32, lambda a: a),
        ("float16", np.float16, lambda a: a.astype(np.float32)),
        ("bfloat16", np.uint16, lambda a: (a.astype(np.uint32) << 16).view(np.float32)),
    ],
    ids=["float32", "float16", "bfloat16"],
)
def test_npy_export_in_float32_or_stored_dtype(tmp_path, dtype, stored, as_float) -> None:
    s = synthetic_store(str(tmp_path / "s.zarr"), _data(), _ids(), _meta(),
                        rows_per_unit=RPU, dtype=dtype)
    rows = np.array([7, 3, 200])
    export(tmp_path / "f.npy", s, 1, None, rows)
    export(tmp_path / "s.npy", s, 1, None, rows, dtype="stored")
    f32, raw = np.load(tmp_path / "f.npy"), np.load(tmp_path / "s.npy")
    assert f32.dtype == np.float32
    assert raw.dtype == stored
    np.testing.assert_array_equal(f32, s.read(1, rows=rows))
    np.testing.assert_array_equal(as_float(raw), f32)
    if dtype == "bfloat16":
        exact = torch.from_numpy(_data()[1][rows]).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(as_float(raw), exact)


def test_parquet_export_reads_back_with_pandas_and_pyarrow(tmp_path) -> None:
    s = synthetic_store(str(tmp_path / "s.zarr"), _data(), _ids(), _meta(), rows_per_unit=RPU)
    rows = np.array([9, 0, 4])
    scores = np.array([3.0, 2.0, 1.0], np.float32)
    export(tmp_path / "x.parquet", s, 1, None, rows, scores)
    frame = pd.read_parquet(tmp_path / "x.parquet")
    assert list(frame.columns) == ["id", "score", "label", "city", "activation"]
    assert frame["id"].tolist() == ["ex-9", "ex-0", "ex-4"]
    assert frame["label"].tolist() == [1, 0, 0]
    assert frame["score"].tolist() == [3.0, 2.0, 1.0]
    np.testing.assert_array_equal(np.stack(frame["activation"]), _data()[1][rows])
    table = pq.read_table(tmp_path / "x.parquet")
    flat = table["activation"].combine_chunks().flatten().to_numpy()
    np.testing.assert_array_equal(flat.reshape(len(table), -1), _data()[1][rows])
    assert b'"layer": 1' in table.schema.metadata[b"actcache"]


def test_parquet_export_of_tokens_has_one_row_per_token(tmp_path) -> None:
    lengths = [2, 3, 1]
    tokens = {0: np.arange(6 * 4, dtype=np.float32).reshape(6, 4)}
    s = synthetic_store(str(tmp_path / "t.zarr"), {0: np.zeros((3, 4), np.float32)},
                        ["a", "b", "c"], [{"k": 1}, {"k": 2}, {"k": 3}], rows_per_unit=2,
                        poolings=["mean", "tokens"], tokens=tokens, token_lengths=lengths)
    export(tmp_path / "t.parquet", s, 0, "tokens", np.array([1, 2]))
    frame = pd.read_parquet(tmp_path / "t.parquet")
    assert frame["id"].tolist() == ["b", "b", "b", "c"]
    assert frame["token"].tolist() == [0, 1, 2, 0]
    assert frame["k"].tolist() == [2, 2, 2, 3]
    np.testing.assert_array_equal(np.stack(frame["activation"]), tokens[0][2:6])
