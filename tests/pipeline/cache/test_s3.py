"""The same job to s3:// (a loopback moto server) gives a store identical to the local one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from actcache import open_store
from actcache.cache.driver import parse_job, run_job
from tests.conftest import SENTENCES

pytestmark = [pytest.mark.s3, pytest.mark.ray]


def test_s3_store_equals_local_store(ray_local, tmp_path, tiny_bert, s3_bucket):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(
        json.dumps({"id": f"x{i}", "text": t, "label": i % 2}) + "\n" for i, t in enumerate(SENTENCES)
    ))
    base = {"model": tiny_bert, "inputs": str(inputs), "id_column": "id", "layers": [0, 3],
            "pooling": ["mean", "tokens"], "dtype": "bfloat16", "rows_per_unit": 8}
    url = f"s3://{s3_bucket}/runs/demo.zarr"
    for store in (str(tmp_path / "local.zarr"), url):
        run_job(parse_job({**base, "store": store}), echo=lambda *_: None)

    local, remote = open_store(str(tmp_path / "local.zarr")), open_store(url)
    assert remote.complete and remote.ids == local.ids
    assert remote.metadata.equals(local.metadata)
    for pooling in ("mean", "tokens"):
        for layer in (0, 3):
            np.testing.assert_array_equal(remote.read(layer, pooling), local.read(layer, pooling))
    # Plain zarr, no actcache: the same raw arrays, the manifest in the attributes.
    plain = zarr.open_group(url, mode="r")
    raw_local = zarr.open_group(str(tmp_path / "local.zarr"), mode="r")
    assert plain.attrs["actcache"]["layers"] == [0, 3]
    units = [f"tokens/layer_0/{name}" for name, _ in raw_local["tokens/layer_0"].arrays()]
    assert units  # format 3: one packed token array per unit
    for key in ("mean/layer_3", *units, "rows/ids", "rows/meta"):
        np.testing.assert_array_equal(plain[key][:], raw_local[key][:])
    assert plain["mean/layer_3"].attrs["actcache.dtype"] == "bfloat16"
    # The lease was released and no secret reached the manifest.
    assert "lease" not in [name for name, _ in plain.groups()]
    assert "testing" not in json.dumps(dict(plain.attrs))
