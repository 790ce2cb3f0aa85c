"""Ridge regression probes on numeric labels: scikit-learn parity, task detection, outputs."""

import json
import uuid

import numpy as np
import pandas as pd
import pytest

from actcache.probes import train_probes, write_outputs
from actcache.probes._data import FIT, TEST, UNUSED, VAL, prepare, resolve_task
from actcache.probes.testing import compare_with_sklearn, constant_safe_std
from actcache.schemas.errors import ProbeDataError
from actcache.schemas.probe import ProbeConfig, Task
from actcache.testing import synthetic_store

N, H, LAYERS = 500, 24, 3
MISSING = (7, 80, 333)


def _regression_arrays(seed=0):
    """Activations whose later layers carry more of a numeric target; three labels missing."""
    rng = np.random.default_rng(seed)
    target = rng.normal(40.0, 5.0, N)
    direction = rng.standard_normal(H)
    x = {layer: (rng.standard_normal((N, H)) * rng.uniform(0.5, 3.0, H)
                 + 0.08 * layer * np.outer(target - 40.0, direction)
                 + rng.normal(2, 3, H)).astype(np.float32)
         for layer in range(LAYERS)}
    score = target.copy()
    score[list(MISSING)] = np.nan
    return x, score


def _url(name):
    """A fresh in-process store URL: each store is written once and never shared."""
    return f"memory://test-probes-regression-{name}-{uuid.uuid4().hex[:8]}"


def _store(chunk_rows=64):
    """A real float32 store (values kept exactly); missing scores are JSON nulls."""
    x, score = _regression_arrays()
    meta = [{"score": None if np.isnan(s) else float(s), "topic": "ba"[i % 2], "flat": 3.5}
            for i, s in enumerate(score)]
    return synthetic_store(_url("store"), x, [f"ex{i}" for i in range(N)], meta,
                           rows_per_unit=256, chunk_rows=chunk_rows)


CONFIG = ProbeConfig(label="score", probes=["ridge"], precision="fp32")


@pytest.fixture(scope="module")
def store():
    return _store()


@pytest.fixture(scope="module")
def result(store):
    return train_probes(store, CONFIG)


def _split(store):
    role = prepare(store, CONFIG).role
    return role, np.isin(role, (FIT, VAL)), role == TEST


def test_coefficients_equal_sklearn_ridge_on_standardised_features(store, result):
    from sklearn.linear_model import Ridge
    from sklearn.metrics import mean_squared_error

    role, train, _ = _split(store)
    y = store.metadata["score"].to_numpy()
    assert result.task == "regression"
    for layer in range(LAYERS):
        x = store.read(layer).astype(np.float64)
        mean, std = x[train].mean(0), constant_safe_std(x[train])
        z = (x - mean) / std
        fit, val = role == FIT, role == VAL
        mse = [mean_squared_error(y[val], Ridge(alpha=1 / c).fit(z[fit], y[fit]).predict(z[val]))
               for c in CONFIG.strengths]
        best = CONFIG.strengths[int(np.argmin(mse))]
        row = result.metrics.query(f"layer == {layer}").iloc[0]
        assert row.strength == best
        ref = Ridge(alpha=1 / best).fit(z[train], y[train])
        w = result.tensors[f"ridge.layer{layer}.weight"]
        b = result.tensors[f"ridge.layer{layer}.bias"]
        assert w.shape == (1, H) and b.shape == (1,) and w.dtype == np.float32
        np.testing.assert_allclose(w[0] * std, ref.coef_, rtol=1e-4,
                                   atol=1e-5 * np.abs(ref.coef_).max())
        assert b[0] + w[0] @ mean == pytest.approx(ref.intercept_, rel=1e-5)


def test_r2_and_mse_equal_sklearn_on_the_test_split(store, result):
    from sklearn.metrics import mean_squared_error, r2_score

    _, train, test = _split(store)
    y = store.metadata["score"].to_numpy()
    for layer in range(LAYERS):
        w = result.tensors[f"ridge.layer{layer}.weight"].astype(np.float64)
        b = result.tensors[f"ridge.layer{layer}.bias"].astype(np.float64)
        pred = store.read(layer).astype(np.float64) @ w[0] + b[0]
        row = result.metrics.query(f"layer == {layer}").iloc[0]
        assert row.test_r2 == pytest.approx(r2_score(y[test], pred[test]), abs=1e-5)
        assert row.test_mse == pytest.approx(mean_squared_error(y[test], pred[test]), rel=1e-5)
        assert row.test_loss == row.test_mse
        assert row.train_r2 == pytest.approx(r2_score(y[train], pred[train]), abs=1e-5)


def test_metrics_rows_leave_classification_columns_empty(result):
    m = result.metrics
    assert list(m.columns) == [
        "layer", "probe", "strength", "n_train", "n_test", "train_accuracy", "test_accuracy",
        "test_auroc", "test_loss", "control_accuracy", "selectivity", "test_r2", "test_mse",
        "train_r2", "control_r2"]
    assert m[["train_accuracy", "test_accuracy", "test_auroc", "control_accuracy"]].isna().all().all()
    # missing labels leave their rows out of both splits
    assert (m["n_train"] + m["n_test"] == N - len(MISSING)).all()
    np.testing.assert_allclose(m["selectivity"], m["test_r2"] - m["control_r2"])
    # the target lives in the later layers; a permuted target is not predictable
    assert m["test_r2"].is_monotonic_increasing
    assert m["test_r2"].iloc[-1] > 0.6 and m["test_r2"].iloc[0] < 0.05
    assert (m["control_r2"] < 0.1).all()


def test_control_is_a_seeded_permutation_within_train_and_test(store, result):
    data = prepare(store, CONFIG)
    assert (data.role[list(MISSING)] == UNUSED).all()
    for roles in ((FIT, VAL), (TEST,)):
        rows = np.isin(data.role, roles)
        np.testing.assert_array_equal(np.sort(data.control_value[rows]), np.sort(data.value[rows]))
        assert not np.array_equal(data.control_value[rows], data.value[rows])
    again = prepare(store, CONFIG)
    np.testing.assert_array_equal(again.control_value, data.control_value)
    other = prepare(store, CONFIG.model_copy(update={"seed": 1}))
    assert not np.array_equal(other.control_value, data.control_value)
    # actcache's control R² equals scikit-learn's Ridge at the same C on the same targets
    both = compare_with_sklearn(store, CONFIG, points=1e-5, result=result)
    np.testing.assert_allclose(both["control_r2"], both["control_r2_sklearn"], atol=1e-5)
    np.testing.assert_allclose(both["test_mse"], both["test_mse_sklearn"], rtol=1e-5)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0, 1, 1, 0, 1], Task.CLASSIFICATION),
        ([0.5, 1.25, 3.0, -2.0], Task.REGRESSION),
        ([0.0, 1.0, np.nan, 1.0], Task.CLASSIFICATION),
        (list(range(25)), Task.REGRESSION),
        (list(range(20)), Task.CLASSIFICATION),
        (["pos", "neg", "pos"], Task.CLASSIFICATION),
        ([True, False, True], Task.CLASSIFICATION),
        ([1.5, None, 2.0], Task.REGRESSION),
    ],
    ids=["ints-0-1", "floats", "integral-floats", "25-ints", "20-ints", "strings", "bools",
         "floats-with-none"],
)
def test_auto_task_detection(values, expected):
    assert resolve_task(pd.Series(values), Task.AUTO)[0] == expected


def test_explicit_task_wins():
    assert resolve_task(pd.Series([0.5, 1.5]), Task.CLASSIFICATION)[0] == Task.CLASSIFICATION
    assert resolve_task(pd.Series([0, 1]), Task.REGRESSION)[0] == Task.REGRESSION


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"probes": ["logistic", "ridge"]},
         "probe logistic needs class labels, but label column 'score' is a regression target "
         "(non-integer numbers): use --probe ridge, or --task classification to treat each "
         "value as a class"),
        ({"probes": ["mean-diff", "logistic"]},
         "probes mean-diff, logistic need class labels, but label column 'score' is a "
         "regression target (non-integer numbers): use --probe ridge, or --task "
         "classification to treat each value as a class"),
        ({"label": "topic", "probes": ["ridge"], "task": "regression"},
         "label column 'topic' holds non-numeric values (e.g. 'b'); a regression needs "
         "numbers: use --task classification or pick another column with --label"),
        ({"label": "flat", "probes": ["ridge"]},
         "label column 'flat' holds fewer than two distinct numbers; a regression needs at "
         "least two: pick another column with --label"),
    ],
    ids=["logistic", "two-probes", "strings", "constant"],
)
def test_regression_user_errors(store, fields, message):
    with pytest.raises(ProbeDataError) as info:
        train_probes(store, ProbeConfig(**{"label": "score", **fields}))
    assert str(info.value) == message


def test_explicit_regression_on_a_small_integer_column():
    x, score = _regression_arrays()
    stars = np.clip(np.round((np.nan_to_num(score, nan=40.0) - 40) / 4), -2, 2).astype(int)
    store = synthetic_store(_url("stars"), x, metadata=[{"stars": int(v)} for v in stars],
                            rows_per_unit=256)
    cfg = ProbeConfig(label="stars", probes=["ridge"], precision="fp32", layers=[2])
    assert train_probes(store, cfg).task == "classification"
    result = train_probes(store, cfg.model_copy(update={"task": Task.REGRESSION}))
    assert result.task == "regression" and result.classes == ()
    assert result.tensors["ridge.layer2.weight"].shape == (1, H)
    compare_with_sklearn(store, cfg.model_copy(update={"task": Task.REGRESSION}), points=1e-5)


def test_streaming_equals_in_memory(result):
    streamed = train_probes(_store(chunk_rows=16), CONFIG.model_copy(update={"max_memory": 2**20}))
    pd.testing.assert_frame_equal(result.metrics, streamed.metrics, atol=1e-4, rtol=0)
    for key, w in result.tensors.items():
        np.testing.assert_allclose(streamed.tensors[key], w, rtol=1e-3,
                                   atol=1e-3 * np.abs(w).max())


def test_outputs_say_regression(tmp_path, result):
    from safetensors import safe_open

    write_outputs(result, tmp_path)
    with safe_open(str(tmp_path / "probes.safetensors"), "np") as f:
        meta = f.metadata()
        assert f.get_tensor("ridge.layer1.weight").shape == (1, H)
    assert meta["task"] == "regression" and meta["unlabelled_rows"] == "3"
    assert json.loads(meta["classes"]) == []
    assert set(json.loads(meta["strength_per_layer"])["ridge"]) == {"0", "1", "2"}
    assert (tmp_path / "layers.png").stat().st_size > 1000


def _cli(capsys, *args):
    from actcache.cli import main

    code = main(["probe", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    x, score = _regression_arrays()
    url = str(tmp_path_factory.mktemp("stores") / "reg")
    meta = [{"score": None if np.isnan(s) else float(s), "topic": "ab"[i % 2]}
            for i, s in enumerate(score)]
    synthetic_store(url, x, ids=[f"ex{i}" for i in range(N)], metadata=meta, rows_per_unit=128)
    return url


def test_cli_writes_r2_and_mse(capsys, tmp_path, store_url):
    code, out, err = _cli(capsys, store_url, "--label", "score", "--probe", "ridge",
                          "--precision", "fp32", "--out", str(tmp_path / "o"))
    assert code == 0, err
    csv = pd.read_csv(tmp_path / "o" / "metrics.csv")
    assert {"test_r2", "test_mse", "control_r2"} <= set(csv.columns)
    assert list(csv["layer"]) == [0, 1, 2]
    assert csv["test_accuracy"].isna().all()
    ours = train_probes(_store(), CONFIG).metrics
    np.testing.assert_allclose(csv["test_r2"], ours["test_r2"], rtol=1e-5)
    np.testing.assert_allclose(csv["test_mse"], ours["test_mse"], rtol=1e-5)
    best = csv.sort_values(["test_r2", "layer"], ascending=[False, True]).iloc[0]
    assert f"best layer: {best.layer} (ridge, test R² {best.test_r2:.3f}" in out
    assert "3 rows have no 'score' label and were left out" in out


def test_cli_refuses_logistic_on_a_regression(capsys, tmp_path, store_url):
    code, _, err = _cli(capsys, store_url, "--label", "score", "--out", str(tmp_path))
    assert code == 2
    assert err == ("error: probe logistic needs class labels, but label column 'score' is a "
                   "regression target (non-integer numbers): use --probe ridge, or --task "
                   "classification to treat each value as a class\n")
    assert not (tmp_path / "metrics.csv").exists()


def test_cli_task_regression_on_strings(capsys, tmp_path, store_url):
    code, _, err = _cli(capsys, store_url, "--label", "topic", "--task", "regression",
                        "--probe", "ridge", "--out", str(tmp_path))
    assert code == 2
    assert err == ("error: label column 'topic' holds non-numeric values (e.g. 'a'); a "
                   "regression needs numbers: use --task classification or pick another "
                   "column with --label\n")
