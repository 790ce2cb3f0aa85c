"""synthetic_store writes real stores: what it is given reads back through open_store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from actcache import open_store
from actcache.schemas.errors import ConfigError, OverflowStorageError
from actcache.testing import synthetic_store


def _x(n: int, hidden: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, hidden)).astype(np.float32)


@pytest.mark.parametrize(
    ("dtype", "cast"),
    [
        ("float32", lambda x: x),
        ("float16", lambda x: x.astype(np.float16).astype(np.float32)),
        ("bfloat16", lambda x: torch.from_numpy(x).to(torch.bfloat16).float().numpy()),
    ],
    ids=["float32", "float16", "bfloat16"],
)
def test_values_ids_and_metadata_read_back(tmp_path, dtype, cast) -> None:
    x0, x3 = _x(70, 12, 1), _x(70, 12, 2)
    ids = [f"ex-{i}" for i in range(70)]
    meta = [{"label": i % 3, "split": "test" if i % 4 == 0 else "train"} for i in range(70)]
    s = synthetic_store(str(tmp_path / "s.zarr"), {0: x0, 3: x3}, ids, meta,
                        rows_per_unit=32, dtype=dtype, chunk_rows=8)
    again = open_store(str(tmp_path / "s.zarr"))
    assert again.ids == tuple(ids)
    assert again.layers == (0, 3)
    assert again.complete
    assert again.chunk_rows == 8
    assert again.manifest["dtype"] == dtype
    assert len(again.receipts) == 3  # 32 + 32 + 6 rows
    np.testing.assert_array_equal(again.read(3), cast(x3))
    np.testing.assert_array_equal(again.read(-1, rows=[69, 0, 69]), cast(x3)[[69, 0, 69]])
    assert again.metadata.to_dict("records") == meta
    assert s.read(0).dtype == np.float32


def test_several_poolings_and_tokens(tmp_path) -> None:
    lengths = [3, 1, 0, 4, 2]
    tokens = {1: _x(sum(lengths), 6, 3)}
    mean, last = _x(5, 6, 4), _x(5, 6, 5)
    s = synthetic_store(
        "memory://synthetic-tokens", {("mean", 1): mean, ("last", 1): last},
        rows_per_unit=2, poolings=["mean", "last", "tokens"], tokens=tokens,
        token_lengths=lengths, num_hidden_layers=4,
    )
    assert s.poolings == ("mean", "last", "tokens")
    np.testing.assert_array_equal(s.read(1, "last"), last)
    np.testing.assert_array_equal(s.read(-4, "mean"), mean)  # 4 blocks: -4 is layer 1
    np.testing.assert_array_equal(s.token_lengths(), lengths)
    # rows 3 then 0: tokens 4..7 then 0..2
    expected = np.concatenate([tokens[1][4:8], tokens[1][0:3]])
    np.testing.assert_array_equal(s.read(1, "tokens", rows=[3, 0]), expected)


def test_metadata_is_stored_as_json_objects(tmp_path) -> None:
    meta = [{"text": "a", "score": 0.5, "flag": True, "tags": None}] * 3
    s = synthetic_store(str(tmp_path / "m.zarr"), {0: _x(3, 4)}, None, meta, rows_per_unit=4)
    assert s.ids == ("0", "1", "2")
    assert [json.loads(m) for m in s.raw_metadata()] == meta


def test_float16_overflow_is_refused_naming_the_layer(tmp_path) -> None:
    x = _x(4, 4)
    x[2, 1] = 1e6
    with pytest.raises(OverflowStorageError, match="layer 5 has values up to 1e\\+06"):
        synthetic_store(str(tmp_path / "o.zarr"), {5: x}, rows_per_unit=4, dtype="float16")


@pytest.mark.parametrize(
    ("arrays", "ids", "message"),
    [
        ({0: _x(4, 4), 1: _x(5, 4)}, None, "arrays of one shape"),
        ({0: _x(4, 4), 1: _x(4, 3)}, None, "arrays of one shape"),
        ({0: _x(4, 4)}, ["a", "a", "b", "c"], "4 distinct ids"),
        ({-1: _x(4, 4)}, None, "non-negative"),
    ],
    ids=["rows", "width", "duplicate-ids", "negative-layer"],
)
def test_inconsistent_inputs_are_refused(tmp_path, arrays, ids, message) -> None:
    with pytest.raises(ConfigError, match=message):
        synthetic_store(str(tmp_path / "bad.zarr"), arrays, ids, rows_per_unit=4)
