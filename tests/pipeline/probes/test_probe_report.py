"""Probe results a reviewer would accept: the majority baseline, seeded 95% intervals, the
precision each probe really used, the plot's reference lines, and the outputs' file modes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from actcache.probes import _eval
from actcache.probes._report import layers_figure, summary_line, write_outputs
from actcache.probes.api import train_probes
from actcache.schemas.probe import ProbeConfig
from actcache.testing import synthetic_store

CONSOLE = Path(sys.executable).with_name("actcache")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """300 rows, 60% of class 1; layer 2 separates the classes, layer 0 does not."""
    rng = np.random.default_rng(2)
    n, hidden = 300, 6
    y = (rng.random(n) < 0.6).astype(int)
    x = {layer: rng.standard_normal((n, hidden)).astype(np.float32)
         + np.float32(layer) * np.outer(y - 0.5, np.ones(hidden, np.float32)) for layer in (0, 2)}
    meta = [{"label": int(v), "split": "test" if i % 3 == 0 else "train"} for i, v in enumerate(y)]
    url = str(tmp_path_factory.mktemp("report") / "s.zarr")
    synthetic_store(url, x, metadata=meta, rows_per_unit=128, num_hidden_layers=2)
    return url


@pytest.fixture(scope="module")
def result(store: str):  # type: ignore[no-untyped-def]
    config = ProbeConfig(label="label", split_column="split",
                         probes=("logistic", "ridge", "mean-diff"), seed=7)
    return train_probes(store, config)


def test_majority_baseline_is_trains_majority_class_scored_on_test(store, result):
    from actcache.store import open_store

    meta = open_store(store).metadata
    train, test = meta[meta["split"] == "train"], meta[meta["split"] == "test"]
    majority = train["label"].value_counts().idxmax()
    expected = float((test["label"] == majority).mean())
    assert result.metrics["majority_baseline"].tolist() == pytest.approx([expected] * 6)


def test_intervals_are_a_seeded_percentile_bootstrap_over_test_rows(result):
    m = result.metrics
    assert (m["test_accuracy_low"] <= m["test_accuracy"]).all()
    assert (m["test_accuracy"] <= m["test_accuracy_high"]).all()
    assert (m["test_auroc_low"] <= m["test_auroc"]).all() and (m["test_auroc"] <= m["test_auroc_high"]).all()
    # Half-width close to the binomial one, 1.96 * sqrt(p (1 - p) / n).
    p, n = m["test_accuracy"], m["n_test"]
    half = (m["test_accuracy_high"] - m["test_accuracy_low"]) / 2
    np.testing.assert_allclose(half, 1.96 * np.sqrt(p * (1 - p) / n), atol=0.02)

    rng = np.random.default_rng(0)
    hits = rng.random((2, 120)) < 0.7
    scores = rng.standard_normal((2, 120))
    positive = rng.random(120) < 0.5
    acc, auc = _eval.bootstrap_intervals(hits, scores, positive, seed=3, resamples=200)
    draws = np.random.default_rng(3).integers(0, 120, size=(200, 120))
    for i in range(2):
        ref_acc = [hits[i, d].mean() for d in draws]
        ref_auc = [_eval.auroc(scores[i, d], positive[d]) for d in draws]
        np.testing.assert_allclose(acc[i], np.percentile(ref_acc, [2.5, 97.5]))
        np.testing.assert_allclose(auc[i], np.percentile(ref_auc, [2.5, 97.5]))
    again = _eval.bootstrap_intervals(hits, scores, positive, seed=3, resamples=200)
    np.testing.assert_array_equal(acc, again[0])


def test_large_test_sets_use_the_normal_intervals_which_agree(monkeypatch):
    rng = np.random.default_rng(1)
    hits = rng.random((1, 4000)) < 0.8
    positive = rng.random(4000) < 0.4
    scores = positive[None, :] + rng.standard_normal((1, 4000))
    boot = _eval.bootstrap_intervals(hits, scores, positive, seed=0, resamples=300)
    monkeypatch.setattr(_eval, "BOOTSTRAP_MAX_ROWS", 1000)
    normal = _eval.bootstrap_intervals(hits, scores, positive, seed=0)
    np.testing.assert_allclose(normal[0], boot[0], atol=0.005)
    np.testing.assert_allclose(normal[1], boot[1], atol=0.008)


def test_summary_names_each_probes_precision(result):
    line = summary_line(result)
    assert line.endswith(f"trained on cpu: logistic in {result.precision} "
                         f"({result.choice.summary()}), ridge in float64, mean-diff in float64")
    assert result.choice.summary().startswith("auto: ")


def test_plot_has_chance_bands_title_and_embeddings(result):
    import matplotlib.pyplot as plt

    fig = layers_figure(result)
    ax = fig.axes[0]
    chance = float(result.metrics["majority_baseline"].iloc[0])
    flat = [ln for ln in ax.get_lines() if ln.get_linestyle() == ":"]
    assert [float(ln.get_ydata()[0]) for ln in flat] == pytest.approx([chance])
    assert ax.get_ylim()[0] <= chance and ax.get_ylim()[1] == 1.0
    assert len(ax.collections) >= 3  # one interval band per probe
    assert "synthetic" in ax.get_title() and result.metadata["store_url"] in ax.get_title()
    assert ax.get_xticklabels()[0].get_text() == "0\nembeddings"
    plt.close(fig)


def test_outputs_follow_the_umask(result, tmp_path):
    old = os.umask(0o022)
    try:
        folder = write_outputs(result, tmp_path / "out")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert modes == {"metrics.csv": 0o644, "probes.safetensors": 0o644, "layers.png": 0o644}


def test_console_script_writes_the_new_columns(store, tmp_path):
    done = subprocess.run([str(CONSOLE), "probe", store, "--label", "label", "--split-column",
                           "split", "--precision", "fp32", "--out", str(tmp_path)],
                          capture_output=True, text=True,
                          check=False, env={**os.environ, "ACTCACHE_LOG_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert list(metrics.columns)[-5:] == _eval.INTERVAL_COLUMNS
    row = metrics.iloc[-1]
    assert f"{row.test_accuracy:.3f} [{row.test_accuracy_low:.2f}, {row.test_accuracy_high:.2f}]" \
        in done.stdout
    assert "majority class" in done.stdout and "logistic in fp32" in done.stdout
