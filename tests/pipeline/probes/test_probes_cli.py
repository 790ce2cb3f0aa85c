"""``actcache probe`` through the command line entry point."""

import numpy as np
import pandas as pd
import pytest

from actcache.testing import synthetic_store


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    """A real float32 store on disk, opened by the command as a user's would be."""
    rng = np.random.default_rng(1)
    n, h = 300, 16
    y = rng.integers(0, 2, n)
    x = {layer: (rng.standard_normal((n, h)) + layer * np.outer(y - 0.5, np.ones(h)) * 0.5)
         for layer in range(3)}
    url = str(tmp_path_factory.mktemp("stores") / "topics.zarr")
    synthetic_store(url, x, metadata=[{"topic": "ab"[v]} for v in y], rows_per_unit=128)
    return url


def _run(capsys, *args):
    from actcache.cli import main

    code = main(["probe", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_probe_writes_outputs_and_names_the_best_layer(capsys, tmp_path, store_url):
    cfg = tmp_path / "probe.yaml"
    cfg.write_text("strengths: [0.01, 1.0]\nprobes: [logistic]\n")
    code, out, err = _run(capsys, store_url, "--label", "topic", "--config", str(cfg),
                          "--probe", "logistic,mean-diff", "--layers", "0,-1",
                          "--out", str(tmp_path / "o"), "--precision", "fp32")
    assert code == 0, err
    metrics = pd.read_csv(tmp_path / "o" / "metrics.csv")
    assert list(metrics["probe"]) == ["logistic", "logistic", "mean-diff", "mean-diff"]
    assert set(metrics["layer"]) == {0, 2}
    assert set(metrics["strength"].dropna()) <= {0.01, 1.0}
    best = metrics.sort_values(["test_accuracy", "layer"], ascending=[False, True]).iloc[0]
    assert f"best layer: {best.layer} ({best.probe}, test accuracy {best.test_accuracy:.3f}" in out
    assert (tmp_path / "o" / "probes.safetensors").exists()
    assert (tmp_path / "o" / "layers.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--label", "nope"], "label column 'nope' is not in the store's metadata; available "
                              "columns: topic"),
        (["--label", "topic", "--layers", "one"],
         "--layers must be 'all' or comma-separated ints like 0,3,-1, got 'one'"),
        ([], "no label column: give --label COL (or `label:` in the --config file)"),
        (["--label", "topic", "--max-memory", "lots"],
         "--max-memory: not a memory size: 'lots'; write e.g. 512MB, 2GB or 1GiB"),
        (["--label", "topic", "--split-column", "s", "--test-fraction", "0.3"],
         "Cannot specify both --split-column and --test-fraction"),
        (["--label", "topic", "--layers", "5"],
         "layer 5 is not in the store; stored layers: 0, 1, 2"),
    ],
    ids=["label", "layers", "no-label", "memory", "split-and-fraction", "layer-missing"],
)
def test_user_errors_exit_2_with_one_line(capsys, tmp_path, store_url, args, message):
    code, out, err = _run(capsys, store_url, *args, "--out", str(tmp_path))
    assert code == 2
    assert err == f"error: {message}\n"
    assert not (tmp_path / "metrics.csv").exists()
