"""The Ray Data source: the same tokens as an epoch of ``TokenLoader``, read by Ray tasks
through the same reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from actcache import TokenLoader
from actcache.loader import read_tokens
from tests.pipeline.loader.test_loader import _keys, _reference, _write

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_ray_dataset_yields_the_loaders_tokens_and_values(tmp_path: Path, ray_local) -> None:
    store = _write(str(tmp_path / "s.zarr"))
    rows = list(range(0, 300, 2))
    ds = read_tokens(store.url, 3, rows=rows, skip_positions=1, override_num_blocks=3)
    got = ds.take_all()
    keys = sorted((int(r["row"]), int(r["position"])) for r in got)
    loader = TokenLoader(store, 3, batch_size=64, rows=rows, skip_positions=1)
    assert keys == sorted(_keys(list(loader)))  # the same multiset: each token once
    want = _reference(store, 3)
    for item in got:
        np.testing.assert_array_equal(item["x"], want[(int(item["row"]), int(item["position"]))])
    both = read_tokens(store, [0, 3], pooling="mean").take(5)
    assert np.asarray(both[0]["x"]).shape == (2, 12)
