"""Probe transfer across groups (``group_column``) and across stores (``eval_store``),
against per-group runs and the saved weights applied by hand."""

import json

import numpy as np
import pandas as pd
import pytest
import zarr
from safetensors.numpy import load_file

from actcache.probes import train_probes, write_outputs
from actcache.schemas.errors import (
    ColumnNotFoundError,
    ProbeDataError,
    StoreMismatchError,
)
from actcache.schemas.probe import ProbeConfig
from actcache.schemas.store import MANIFEST_ATTR
from actcache.testing import synthetic_store

PROBES = ["logistic", "ridge", "mean-diff"]
GROUPS = ["east", "north", "west"]


def _values(n, h, layers, seed, shift=0.0):
    """Binary labels readable along one shared direction and one direction per group."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    group = rng.integers(0, len(GROUPS), n)
    shared = rng.standard_normal(h)
    own = rng.standard_normal((len(GROUPS), h))
    x = {}
    for layer in range(layers):
        signal = (0.3 * layer + 0.3) * (y - 0.5)[:, None] * (shared + 2.0 * own[group])
        x[layer] = (rng.standard_normal((n, h)) + signal + rng.normal(2 + shift, 1, h)
                    ).astype(np.float32)
    return x, y, group


def _write(url, x, y, group, split, **kw):
    meta = [{"label": ["neg", "pos"][int(v)], "domain": GROUPS[g], "split": s}
            for v, g, s in zip(y, group, split, strict=True)]
    ids = [f"ex{i}" for i in range(len(y))]
    return synthetic_store(url, x, ids, meta, rows_per_unit=256, chunk_rows=64, **kw)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The probed store, and another store of the same (synthetic) model, some of whose
    rows have no label."""
    root = tmp_path_factory.mktemp("transfer")
    n = 720
    x, y, group = _values(n, 16, 3, seed=0)
    split = np.where(np.arange(n) % 4 == 0, "test", "train")
    store = _write(str(root / "main.zarr"), x, y, group, split)
    xo, yo, go = _values(300, 16, 3, seed=1, shift=0.5)
    labels = np.where(np.arange(300) % 10 == 3, -1, yo)  # -1: no label
    meta = [{"label": None if v < 0 else ["neg", "pos"][v], "domain": GROUPS[g],
             "split": "train"} for v, g in zip(labels, go, strict=True)]
    other = synthetic_store(str(root / "other.zarr"), xo, None, meta, rows_per_unit=128,
                            chunk_rows=64)
    return store, other


@pytest.fixture(scope="module")
def run(stores, tmp_path_factory):
    store, other = stores
    cfg = ProbeConfig(label="label", split_column="split", group_column="domain",
                      eval_store=str(other.url), probes=PROBES, precision="fp32")
    result = train_probes(store, cfg)
    folder = write_outputs(result, tmp_path_factory.mktemp("out"))
    return result, folder


def _by_hand(tensors, probe, layer, x, y):
    """Accuracy and AUROC of a saved probe applied in numpy to rows ``x`` labelled ``y``."""
    from sklearn.metrics import roc_auc_score

    w = tensors[f"{probe}.layer{layer}.weight"].astype(np.float64)
    b = tensors[f"{probe}.layer{layer}.bias"].astype(np.float64)
    s = (x.astype(np.float64) @ w.T + b)[:, 0]
    pred = s > (0.5 if probe == "ridge" else 0.0)
    return float(np.mean(pred == (y == 1))), float(roc_auc_score(y, s))


def test_transfer_matrix_equals_per_group_probes_trained_alone(stores, run, tmp_path):
    store, _ = stores
    result, folder = run
    table = result.transfer
    written = pd.read_csv(folder / "transfer.csv")
    assert list(written.columns) == ["layer", "probe", "train_group", "test_group", "n_test",
                                     "test_accuracy", "test_auroc"]
    pd.testing.assert_frame_equal(written, table, rtol=1e-5)
    assert len(table) == 3 * len(PROBES) * len(GROUPS) ** 2
    meta = store.metadata
    test_rows = {g: np.flatnonzero((meta["domain"] == g) & (meta["split"] == "test"))
                 for g in GROUPS}
    y = (meta["label"] == "pos").to_numpy().astype(int)
    for g in GROUPS:
        # The store restricted to g's rows: the label of every other row left empty.
        alone = synthetic_store(
            str(tmp_path / f"{g}.zarr"), {i: store.read(i) for i in range(3)}, store.ids,
            [{"label": r["label"] if r["domain"] == g else None, "split": r["split"]}
             for r in meta.to_dict("records")], rows_per_unit=256, chunk_rows=64)
        cfg = ProbeConfig(label="label", split_column="split", probes=PROBES, precision="fp32")
        own = train_probes(alone, cfg)
        tensors = load_file(str(write_outputs(own, tmp_path / g) / "probes.safetensors"))
        for row in table[table["train_group"] == g].itertuples():
            rows = test_rows[row.test_group]
            acc, auc = _by_hand(tensors, row.probe, row.layer, store.read(row.layer, rows=rows),
                                y[rows])
            assert row.n_test == len(rows)
            assert row.test_accuracy == pytest.approx(acc, abs=1e-12), row
            assert row.test_auroc == pytest.approx(auc, abs=1e-9), row
        diagonal = table[(table["train_group"] == g) & (table["test_group"] == g)]
        expected = own.metrics.set_index(["layer", "probe"])["test_accuracy"]
        for row in diagonal.itertuples():
            assert row.test_accuracy == pytest.approx(expected[(row.layer, row.probe)], abs=1e-12)
    # Each group reads its own direction best: the matrix is not flat.
    best = table[(table["layer"] == 2) & (table["probe"] == "logistic")]
    for g in GROUPS:
        mine = best[best["test_group"] == g].set_index("train_group")["test_accuracy"]
        assert mine[g] == mine.max()


def test_pooled_metrics_are_those_of_a_run_without_groups(stores, run):
    store, _ = stores
    result, _ = run
    plain = train_probes(store, ProbeConfig(label="label", split_column="split", probes=PROBES,
                                            precision="fp32"))
    pd.testing.assert_frame_equal(result.metrics, plain.metrics)
    assert result.passes == plain.passes


def test_heatmap_names_the_best_layer(run):
    from actcache.probes._transfer_report import transfer_figure

    result, folder = run
    assert (folder / "transfer.png").stat().st_size > 10_000
    best = result.best()
    fig = transfer_figure(result)
    title = fig.axes[0].get_title()
    assert f"{best['probe']} probe transfer, layer {int(best['layer'])}" in title
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    counts = result.transfer.groupby("test_group", sort=False)["n_test"].first()
    assert labels == [f"{g}\n(n={counts[g]})" for g in GROUPS]


def test_eval_store_equals_the_saved_probes_applied_by_hand(stores, run):
    _, other = stores
    result, folder = run
    table = result.evaluation
    written = pd.read_csv(folder / "eval.csv")
    assert list(written.columns[:6]) == ["layer", "probe", "eval_store", "n_eval", "accuracy",
                                         "auroc"]
    pd.testing.assert_frame_equal(written, table, rtol=1e-5)
    tensors = load_file(str(folder / "probes.safetensors"))
    labelled = np.flatnonzero(other.metadata["label"].notna().to_numpy())
    y = (other.metadata["label"][labelled] == "pos").to_numpy().astype(int)
    assert len(table) == 3 * len(PROBES)
    for row in table.itertuples():
        acc, auc = _by_hand(tensors, row.probe, row.layer, other.read(row.layer, rows=labelled), y)
        assert row.eval_store == str(other.url)
        assert row.n_eval == len(labelled) == 270
        assert row.accuracy == pytest.approx(acc, abs=1e-12)
        assert row.auroc == pytest.approx(auc, abs=1e-9)
        assert row.accuracy_low <= row.accuracy <= row.accuracy_high


def _edit_manifest(url, **changes):
    group = zarr.open_group(url, mode="r+")
    manifest = dict(group.attrs[MANIFEST_ATTR])
    for key, value in changes.items():
        if key == "model":
            manifest["model"] = {**manifest["model"], **value}
        else:
            manifest[key] = value
    group.attrs[MANIFEST_ATTR] = manifest


def _small(url, layers=(0, 1, 2), hidden=16, poolings=("mean",), seed=2, labels=("neg", "pos")):
    rng = np.random.default_rng(seed)
    x = {layer: rng.standard_normal((64, hidden)).astype(np.float32) for layer in layers}
    meta = [{"label": labels[i % len(labels)]} for i in range(64)]
    return synthetic_store(url, x, None, meta, rows_per_unit=64, poolings=poolings)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda url: (_small(url), _edit_manifest(url, model={
            "name": "org/other-model", "weights_hash": "f00d"})),
         "{url} holds model org/other-model, the probes were trained on model synthetic"),
        (lambda url: (_small(url), _edit_manifest(url, model={"weights_hash": "f00d"})),
         "{url} holds model synthetic (weights f00d), the probes were trained on model "
         "synthetic (weights synthetic)"),
        (lambda url: _small(url, hidden=8),
         "{url} has hidden size 8, the probes were trained on hidden size 16"),
        (lambda url: _small(url, layers=(0, 1)),
         "{url} lacks layer 2 the probes were trained on (it holds 0, 1): choose "
         "`layers` among those"),
        (lambda url: _small(url, poolings=("max",)),
         "{url} has no 'mean' pooling, the probes were trained on it (it holds max)"),
        (lambda url: (_small(url), _edit_manifest(url, final_norm=True)),
         "{url} holds layers with the model's final norm, the probes were trained on layers "
         "without it"),
    ],
    ids=["model", "weights", "hidden", "layers", "pooling", "final-norm"],
)
def test_eval_store_of_another_shape_is_refused_before_training(stores, tmp_path, make,
                                                                  message, monkeypatch):
    store, _ = stores
    url = str(tmp_path / "x.zarr")
    make(url)
    from actcache.probes import api

    monkeypatch.setattr(api, "_fit", None)  # refused before any training
    cfg = ProbeConfig(label="label", split_column="split", eval_store=url, probes=PROBES)
    with pytest.raises(StoreMismatchError) as err:
        train_probes(store, cfg)
    assert str(err.value) == "`eval_store` " + message.format(url=url)


def test_eval_store_labels_the_probes_never_saw_are_refused(stores, tmp_path):
    store, _ = stores
    url = str(tmp_path / "x.zarr")
    _small(url, labels=("neg", "pos", "maybe"))
    cfg = ProbeConfig(label="label", split_column="split", eval_store=url, probes=["ridge"])
    with pytest.raises(ProbeDataError, match=r"^`eval_store` .* has labels the probes were not "
                       r"trained on: 'maybe' \(they know 'neg', 'pos'\); relabel those rows "
                       "or leave their label empty$"):
        train_probes(store, cfg)


def test_group_column_not_in_the_store_is_named(stores):
    store, _ = stores
    cfg = ProbeConfig(label="label", split_column="split", group_column="nope")
    with pytest.raises(ColumnNotFoundError) as err:
        train_probes(store, cfg)
    assert str(err.value) == ("group column 'nope' is not in the store's metadata; available "
                              "columns: label, domain, split")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"group_column": "label"}, "`group_column` is the label column: group by another column"),
        ({"group_column": "split"}, "`group_column` is the split column: group by another column"),
        ({"group_column": "domain", "task": "regression"},
         "`group_column` needs class labels, not a regression: drop it or use --task "
         "classification"),
        ({"eval_store": "runs/x.zarr", "task": "regression"},
         "`eval_store` needs class labels, not a regression: drop it or use --task "
         "classification"),
        ({"group_column": ""}, "String should have at least 1 character"),
    ],
    ids=["label", "split", "regression", "eval-regression", "empty"],
)
def test_config_cross_checks(fields, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        ProbeConfig(label="label", split_column="split", **fields)
    assert err.value.errors()[0]["msg"].removeprefix("Value error, ") == message


def test_group_without_a_class_in_train_is_named(tmp_path):
    x, y, group = _values(300, 8, 2, seed=3)
    y[(group == 1)] = 0  # 'north' holds negatives only
    split = np.where(np.arange(300) % 4 == 0, "test", "train")
    store = _write(str(tmp_path / "s.zarr"), x, y, group, split)
    cfg = ProbeConfig(label="label", split_column="split", group_column="domain")
    with pytest.raises(ProbeDataError) as err:
        train_probes(store, cfg)
    assert str(err.value) == (
        "group 'north' of 'domain' has no train rows of class 'pos' (validation rows aside); "
        "each group's probes learn every class of the run: give the group such rows or "
        "leave its group value empty")


def test_groups_without_test_rows_are_named(tmp_path):
    x, y, group = _values(300, 8, 2, seed=3)
    split = np.where(np.arange(300) % 4 == 0, "test", "train")
    meta = [{"label": ["neg", "pos"][int(v)], "split": s,
             "domain": None if s == "test" else GROUPS[g]}
            for v, g, s in zip(y, group, split, strict=True)]
    store = synthetic_store(str(tmp_path / "s.zarr"), x, [f"ex{i}" for i in range(300)], meta,
                            rows_per_unit=256, chunk_rows=64)
    cfg = ProbeConfig(label="label", split_column="split", group_column="domain")
    with pytest.raises(ProbeDataError) as err:
        train_probes(store, cfg)
    assert str(err.value) == (
        "no test row has a value in group column 'domain': the transfer matrix needs test "
        "rows in at least one group; fill the column or drop `group_column`")


def _cli(capsys, *args):
    from actcache.cli import main

    code = main(["probe", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_transfer_and_eval(capsys, stores, tmp_path):
    store, other = stores
    out = tmp_path / "o"
    code, text, err = _cli(capsys, str(store.url), "--label", "label", "--split-column", "split",
                           "--group-column", "domain", "--eval-store", str(other.url),
                           "--probe", "ridge", "--precision", "fp32", "--out", str(out))
    assert code == 0, err
    transfer = pd.read_csv(out / "transfer.csv")
    assert set(transfer["train_group"]) == set(GROUPS)
    assert (out / "transfer.png").exists()
    evaluation = pd.read_csv(out / "eval.csv")
    best = evaluation.sort_values(["accuracy", "layer"], ascending=[False, True]).iloc[0]
    assert (f"on {other.url} (270 labelled rows): best layer {best.layer} (ridge, accuracy "
            f"{best.accuracy:.3f}") in text
    assert "transfer of ridge at layer" in text


def test_cli_refuses_an_eval_store_of_another_model_in_one_line(capsys, stores, tmp_path):
    store, _ = stores
    url = str(tmp_path / "x.zarr")
    _small(url)
    _edit_manifest(url, model={"name": "org/other-model", "weights_hash": "f00d"})
    code, _, err = _cli(capsys, str(store.url), "--label", "label", "--eval-store", url,
                        "--out", str(tmp_path / "o"))
    assert code == 2
    assert err == (f"error: --eval-store {url} holds model org/other-model, the probes were "
                   "trained on model synthetic\n")
    assert not (tmp_path / "o").exists()


def test_probe_yaml_takes_both_fields(capsys, stores, tmp_path):
    store, other = stores
    cfg = tmp_path / "probe.yaml"
    cfg.write_text(json.dumps({"group_column": "domain", "eval_store": str(other.url),
                               "probes": ["mean-diff"], "split_column": "split"}))
    code, _, err = _cli(capsys, str(store.url), "--label", "label", "--config", str(cfg),
                        "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert (tmp_path / "o" / "transfer.csv").exists()
    assert (tmp_path / "o" / "eval.csv").exists()


@pytest.mark.slow
def test_transfer_out_of_core_matches_in_memory(tmp_path, monkeypatch):
    """Groups whose rows exceed --max-memory are fitted streamed, scored in budget-sized
    blocks, and give the in-memory matrix (the out-of-core tolerance of the pooled run)."""
    from actcache.probes import api

    x, y, group = _values(7200, 48, 2, seed=4)
    split = np.where(np.arange(7200) % 4 == 0, "test", "train")
    store = _write(str(tmp_path / "s.zarr"), x, y, group, split)
    cfg = {"label": "label", "split_column": "split", "group_column": "domain",
           "probes": PROBES, "precision": "fp32"}
    memory = train_probes(store, ProbeConfig(**cfg)).transfer
    streamed = []
    fit_streamed = api._fit_streamed
    monkeypatch.setattr(api, "_fit_streamed", lambda store, data, *a: streamed.append(
        data.count(1, 2)) or fit_streamed(store, data, *a))
    result = train_probes(store, ProbeConfig(**cfg, max_memory="1MiB"))
    assert len(streamed) == 1 + len(GROUPS)  # the pooled run, then every group
    pd.testing.assert_frame_equal(result.transfer, memory, atol=1e-4, rtol=0)
