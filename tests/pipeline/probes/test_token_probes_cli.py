"""``actcache probe --probe attentive|moment|token-logistic`` through the command line."""

import json

import numpy as np
import pandas as pd
import pytest
from safetensors import safe_open

from actcache.testing import synthetic_store


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A token store (lengths 2-6) and a store of means only, on disk."""
    rng = np.random.default_rng(2)
    n, h = 160, 8
    y = rng.integers(0, 2, n)
    lengths = rng.integers(2, 7, n)
    tokens = {layer: rng.standard_normal((int(lengths.sum()), h)).astype(np.float32)
              for layer in range(2)}
    meta = [{"topic": "ab"[v]} for v in y]
    folder = tmp_path_factory.mktemp("stores")
    tok = str(folder / "tokens.zarr")
    synthetic_store(tok, {}, metadata=meta, poolings=("tokens",), tokens=tokens,
                    token_lengths=lengths, rows_per_unit=64)
    mean = str(folder / "mean.zarr")
    synthetic_store(mean, {layer: rng.standard_normal((n, h)) for layer in range(2)},
                    metadata=meta, rows_per_unit=64)
    return tok, mean


def _run(capsys, *args):
    from actcache.cli import main

    code = main(["probe", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_token_probes_write_the_linear_probes_outputs(capsys, tmp_path, stores):
    out = tmp_path / "o"
    code, text, err = _run(capsys, stores[0], "--label", "topic", "--pooling", "tokens",
                           "--probe", "attentive,moment,token-logistic", "--epochs", "2",
                           "--precision", "fp32", "--out", str(out))
    assert code == 0, err
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["probe"]) == ["attentive"] * 2 + ["moment"] * 2 + ["token-logistic"] * 2
    assert set(metrics["strength"]) <= {0.0, 0.01, 0.1, 1.0}
    assert metrics["control_accuracy"].notna().all()
    assert (metrics["test_accuracy_low"] <= metrics["test_accuracy"]).all()
    positions = pd.read_csv(out / "positions.csv")
    assert set(positions["position"]) == set(range(6))
    with safe_open(str(out / "probes.safetensors"), "np") as f:
        assert f.get_tensor("attentive.layer1.queries").shape == (8, 8)
        assert f.get_tensor("attentive.layer1.weight").shape == (1, 64)
        assert f.get_tensor("moment.layer0.weight").shape == (1, 16)
        assert f.get_tensor("token-logistic.layer0.weight").shape == (1, 8)
        meta = f.metadata()
    assert meta["pooling"] == "tokens"
    assert json.loads(meta["token_probe"])["epochs"] == 2
    assert (out / "layers.png").exists()
    assert "best layer:" in text
    header = next(line for line in text.splitlines() if "layer" in line and "probe" in line)
    assert " wd " in header and " C " not in header  # the strength chosen is a weight decay


@pytest.mark.parametrize(
    ("which", "args", "message"),
    [
        (1, ["--probe", "attentive"],
         "probe attentive reads every token, but store {url} has no `tokens` (poolings: "
         "mean): cache it with `pooling: [tokens]` in the job yaml"),
        (0, ["--probe", "moment", "--skip-positions", "6"],
         "no row has tokens left after skip_positions=6 (the longest row has 6): lower "
         "skip_positions (--skip-positions)"),
        (0, ["--probe", "attentive,logistic"],
         "--probe mixes token probes (attentive) with pooled probes (logistic): train each "
         "kind in a run of its own"),
        (0, ["--probe", "attentive", "--pooling", "mean"],
         "probe attentive reads every token: give --pooling tokens or leave --pooling out"),
    ],
    ids=["no-tokens", "nothing-left", "mixed", "pooled"],
)
def test_bad_token_probe_input_is_one_line(capsys, tmp_path, stores, which, args, message):
    code, _, err = _run(capsys, stores[which], "--label", "topic", "--out", str(tmp_path),
                        *args)
    assert code == 2
    assert err.strip() == "error: " + message.format(url=stores[which])
