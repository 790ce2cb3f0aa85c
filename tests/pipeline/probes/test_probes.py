"""Probes against scikit-learn on synthetic stores, outputs, and bad input."""

import json
import shutil
import uuid

import numpy as np
import pandas as pd
import pytest

from actcache.probes import train_probes, write_outputs
from actcache.probes.testing import sklearn_reference
from actcache.schemas.errors import (
    ColumnNotFoundError,
    ConfigError,
    LayerNotFoundError,
    PoolingNotFoundError,
    ProbeDataError,
    StoreIncompleteError,
)
from actcache.schemas.probe import ProbeConfig
from actcache.testing import synthetic_store


def _url(name):
    """A fresh in-process store URL: each store is written once and never shared."""
    return f"memory://test-probes-{name}-{uuid.uuid4().hex[:8]}"


def _records(meta):
    return meta.to_dict("records")


def _store(x_by_layer, meta, ids=None, *, url=None, chunk_rows=64, **kw):
    """A real float32 store (values kept exactly) of 256-row units."""
    return synthetic_store(url or _url("store"), x_by_layer, ids, _records(meta),
                           rows_per_unit=256, chunk_rows=chunk_rows, **kw)


def _binary_store(n=600, h=32, layers=4, seed=0, **kw):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    direction = rng.standard_normal(h)
    x = {
        layer: (rng.standard_normal((n, h)) + 0.35 * layer * np.outer(y - 0.5, direction)
                + rng.normal(3, 2, h)).astype(np.float32)
        for layer in range(layers)
    }
    meta = pd.DataFrame({"label": np.where(y == 1, "pos", "neg"),
                         "split": np.where(np.arange(n) % 5 == 0, "test", "train")})
    return _store(x, meta, [f"ex{i}" for i in range(n)], **kw)


def _procedural(n_rows, layers, hidden, *, classes, signal, chunk_rows, seed=0):
    """Rows generated per chunk from a seed: ``label`` is ``row % classes``; each layer
    shifts class c along its own random direction by ``signal × (layer + 1)``."""
    x = {}
    for layer in layers:
        dirs = np.random.default_rng([seed, layer]).standard_normal(
            (classes, hidden)).astype(np.float32)
        chunks = []
        for chunk in range(n_rows // chunk_rows):
            part = np.random.default_rng([seed, layer, chunk]).standard_normal(
                (chunk_rows, hidden), dtype=np.float32)
            labels = np.arange(chunk * chunk_rows, (chunk + 1) * chunk_rows) % classes
            part += signal * (layer + 1) * dirs[labels]
            chunks.append(part)
        x[layer] = np.concatenate(chunks)
    return x, pd.DataFrame({"label": np.arange(n_rows) % classes})


@pytest.fixture(scope="module")
def binary_store():
    return _binary_store()


@pytest.fixture(scope="module")
def binary_result(binary_store):
    # fp32 forced: these tests compare with float64 references, whatever `auto` picks here.
    cfg = ProbeConfig(label="label", probes=["logistic", "ridge", "mean-diff"], precision="fp32")
    return cfg, train_probes(binary_store, cfg)


def test_logistic_and_ridge_match_sklearn_binary(binary_store, binary_result):
    cfg, result = binary_result
    ref = sklearn_reference(binary_store, cfg)
    both = result.metrics.merge(ref, on=["layer", "probe"], suffixes=("", "_sk"))
    assert len(both) == 8
    assert np.abs(both["test_accuracy"] - both["test_accuracy_sk"]).max() <= 0.01
    assert (both["strength"] == both["strength_sk"]).all()
    for _, row in ref[ref.probe == "ridge"].iterrows():
        x = binary_store.read(row.layer)
        w = result.tensors[f"ridge.layer{row.layer}.weight"]
        b = result.tensors[f"ridge.layer{row.layer}.bias"]
        train = np.isin(_roles(binary_store, cfg), (1, 2))
        mean, std = x[train].mean(0, dtype=np.float64), x[train].std(0, dtype=np.float64)
        np.testing.assert_allclose(w * std, row.coef, rtol=1e-4, atol=1e-5 * np.abs(row.coef).max())
        np.testing.assert_allclose(b + w @ mean, row.intercept, rtol=1e-4, atol=1e-5)


def _roles(store, cfg):
    from actcache.probes._data import prepare

    return prepare(store, cfg).role


def test_multiclass_logistic_matches_sklearn():
    x, meta = _procedural(1500, [0, 2], 24, classes=3, signal=0.12, chunk_rows=100)
    store = synthetic_store(_url("procedural"), x, metadata=_records(meta), rows_per_unit=500,
                            chunk_rows=100)
    cfg = ProbeConfig(label="label", probes=["logistic", "ridge"], precision="fp32")
    result = train_probes(store, cfg)
    ref = sklearn_reference(store, cfg)
    both = result.metrics.merge(ref, on=["layer", "probe"], suffixes=("", "_sk"))
    assert np.abs(both["test_accuracy"] - both["test_accuracy_sk"]).max() <= 0.01
    assert result.tensors["logistic.layer2.weight"].shape == (3, 24)
    assert result.tensors["ridge.layer0.bias"].shape == (3,)
    assert result.metrics["test_auroc"].isna().all()


def test_metrics_follow_the_contract(binary_result):
    _, result = binary_result
    m = result.metrics
    assert list(m.columns) == [
        "layer", "probe", "strength", "n_train", "n_test", "train_accuracy", "test_accuracy",
        "test_auroc", "test_loss", "control_accuracy", "selectivity", "test_r2", "test_mse",
        "majority_baseline", "test_accuracy_low", "test_accuracy_high", "test_auroc_low",
        "test_auroc_high"]
    assert (m["n_train"] + m["n_test"] == 600).all()
    np.testing.assert_allclose(m["selectivity"], m["test_accuracy"] - m["control_accuracy"])
    # the deepest layer separates the classes; the control task stays near chance
    deep = m[m.layer == 3]
    assert (deep["test_accuracy"] > 0.9).all()
    assert (deep["control_accuracy"] < 0.7).all()
    assert m[m.probe == "mean-diff"]["strength"].isna().all()
    assert m[m.probe != "ridge"]["test_r2"].isna().all()


def test_auroc_and_loss_equal_sklearn_on_the_exported_probe(binary_store, binary_result):
    from sklearn.metrics import log_loss, roc_auc_score

    cfg, result = binary_result
    role = _roles(binary_store, cfg)
    test = role == 3
    y = (binary_store.metadata["label"] == "pos").to_numpy()[test]
    x = binary_store.read(2)[test]
    w, b = result.tensors["logistic.layer2.weight"], result.tensors["logistic.layer2.bias"]
    score = x @ w[0] + b[0]
    row = result.metrics.query("layer == 2 and probe == 'logistic'").iloc[0]
    assert row.test_auroc == pytest.approx(roc_auc_score(y, score), abs=1e-6)
    assert row.test_loss == pytest.approx(log_loss(y, 1 / (1 + np.exp(-score))), rel=1e-4)
    assert row.test_accuracy == pytest.approx(np.mean((score > 0) == y))


def test_mean_diff_is_the_difference_of_class_means(binary_store, binary_result):
    cfg, result = binary_result
    train = np.isin(_roles(binary_store, cfg), (1, 2))
    y = (binary_store.metadata["label"] == "pos").to_numpy()
    x = binary_store.read(1).astype(np.float64)
    m1, m0 = x[train & y].mean(0), x[train & ~y].mean(0)
    np.testing.assert_allclose(result.tensors["mean-diff.layer1.weight"][0], m1 - m0, rtol=1e-4,
                               atol=1e-5)
    assert result.tensors["mean-diff.layer1.bias"][0] == pytest.approx(
        -(m1 @ m1 - m0 @ m0) / 2, rel=1e-4)


def test_outputs_written(tmp_path, binary_store, binary_result):
    from safetensors import safe_open

    _, result = binary_result
    write_outputs(result, tmp_path)
    csv = pd.read_csv(tmp_path / "metrics.csv")
    assert list(csv.columns) == list(result.metrics.columns)
    assert (tmp_path / "layers.png").stat().st_size > 1000
    with safe_open(str(tmp_path / "probes.safetensors"), "np") as f:
        meta = f.metadata()
        assert f.get_tensor("logistic.layer3.weight").dtype == np.float32
        assert set(f.keys()) == set(result.tensors)
    assert json.loads(meta["classes"]) == ["neg", "pos"]
    assert meta["label_column"] == "label" and meta["pooling"] == "mean"
    assert meta["store_url"] == binary_store.url
    assert set(json.loads(meta["strength_per_layer"])) == {"logistic", "ridge"}
    assert meta["actcache_version"]


def test_split_column_and_explicit_val(binary_store):
    meta = binary_store.metadata.copy()
    meta.loc[meta.index % 5 == 1, "split"] = "val"
    store = _store({i: binary_store.read(i) for i in range(2)}, meta, binary_store.ids)
    cfg = ProbeConfig(label="label", split_column="split", layers=[-1], probes=["ridge"])
    result = train_probes(store, cfg)
    assert result.metrics["n_test"].iloc[0] == 120 and result.metrics["n_train"].iloc[0] == 480
    assert list(result.metrics["layer"]) == [1]
    ref = sklearn_reference(store, cfg)
    assert ref["strength"].iloc[0] == result.metrics["strength"].iloc[0]


def test_streaming_equals_in_memory(binary_store):
    cfg = ProbeConfig(label="label", probes=["logistic", "ridge", "mean-diff"], layers=[1, 3],
                      precision="fp32")
    whole = train_probes(binary_store, cfg)
    small = _binary_store(chunk_rows=16)
    streamed = train_probes(small, cfg.model_copy(update={"max_memory": 2**20}))
    pd.testing.assert_frame_equal(whole.metrics, streamed.metrics, atol=1e-4, rtol=0)
    for key, w in whole.tensors.items():
        np.testing.assert_allclose(streamed.tensors[key], w, rtol=1e-3,
                                   atol=1e-3 * np.abs(w).max())


def _bad(store, message, error, **fields):
    with pytest.raises(error) as info:
        train_probes(store, ProbeConfig(**{"label": "label", **fields}))
    assert str(info.value) == message


def test_missing_label_column(binary_store):
    _bad(binary_store, "label column 'sentiment' is not in the store's metadata; available "
         "columns: label, split", ColumnNotFoundError, label="sentiment")


def test_constant_label(binary_store):
    meta = binary_store.metadata.assign(label="same")
    store = _store({0: binary_store.read(0)}, meta)
    _bad(store, "label column 'label' has 1 class ('same'); a probe needs at least two distinct "
         "labels: pick another column with --label", ProbeDataError)


def test_unknown_split_values(binary_store):
    meta = binary_store.metadata.copy()
    meta.loc[3, "split"] = "dev"
    meta.loc[4, "split"] = None
    store = _store({0: binary_store.read(0)}, meta)
    _bad(store, "split column 'split' must hold train, test or val; found <missing>, dev: fix "
         "those values or use --test-fraction", ProbeDataError, split_column="split")


def test_empty_test_split(binary_store):
    store = _store({0: binary_store.read(0)}, binary_store.metadata.assign(split="train"))
    _bad(store, "the test split is empty: rows with 'split' == 'test'; give more rows or another "
         "split", ProbeDataError, split_column="split")


def test_empty_test_split_by_fraction():
    store = _store({0: np.zeros((3, 4), np.float32)}, pd.DataFrame({"label": [0, 1, 0]}))
    _bad(store, "the test split is empty: --test-fraction 0.01 of 3 rows selects none; give "
         "more rows or another split", ProbeDataError, test_fraction=0.01)


def test_layer_not_in_store(binary_store):
    _bad(binary_store, "layer 7 is not in the store; stored layers: 0, 1, 2, 3",
         LayerNotFoundError, layers=[7])


def test_pooling_not_in_store(binary_store):
    _bad(binary_store, "pooling 'last' is not in the store; stored poolings: mean",
         PoolingNotFoundError, pooling="last")


def test_tokens_pooling_refused(binary_store):
    x = binary_store.read(0)
    store = _store({0: x}, binary_store.metadata, poolings=("mean", "tokens"), tokens={0: x},
                   token_lengths=[1] * len(x))
    _bad(store, "probes logistic, ridge and mean-diff need one row per example, not 'tokens': "
         "choose a pooled representation with --pooling (mean) or a token probe with --probe "
         "attentive, moment or token-logistic", ConfigError, pooling="tokens")


def test_store_of_tokens_only_names_the_token_probes(binary_store):
    x = binary_store.read(0)
    store = _store({}, binary_store.metadata, poolings=("tokens",), tokens={0: x},
                   token_lengths=[1] * len(x))
    _bad(store, "probes logistic, ridge and mean-diff need one row per example, not 'tokens': "
         "choose a pooled representation with --pooling (none) or a token probe with --probe "
         "attentive, moment or token-logistic", ConfigError)


def test_incomplete_store(tmp_path, binary_store):
    from actcache import open_store

    url = str(tmp_path / "store.zarr")
    _store({0: binary_store.read(0)}, binary_store.metadata, url=url)
    # An interrupted run: unit 1 wrote its rows but not its commit marker (docs/STORE.md).
    shutil.rmtree(tmp_path / "store.zarr" / "units" / "00000001")
    _bad(open_store(url), f"store {url} is incomplete: some units are not cached yet; finish "
         "it with `actcache cache JOB.yaml`, then rerun `actcache probe`", StoreIncompleteError)
