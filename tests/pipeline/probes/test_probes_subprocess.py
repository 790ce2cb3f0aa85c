"""``actcache probe`` as a real process on real zarr stores: outputs, and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from actcache.testing import synthetic_store

COLUMNS = ["layer", "probe", "strength", "n_train", "n_test", "train_accuracy",
           "test_accuracy", "test_auroc", "test_loss", "control_accuracy", "selectivity"]


def _actcache() -> str:
    found = Path(sys.executable).parent / "actcache"
    return str(found) if found.exists() else (shutil.which("actcache") or "actcache")


def _write(url: Path, n: int = 400, hidden: int = 16, **meta_columns: list) -> Path:
    rng = np.random.default_rng(3)
    y = np.arange(n) % 2
    x = {layer: rng.standard_normal((n, hidden)).astype(np.float32)
         + np.float32(layer) * np.outer(y - 0.5, np.ones(hidden, np.float32))
         for layer in range(3)}
    meta = [{"label": ["no", "yes"][int(v)], "split": "test" if i % 4 == 0 else "train",
             **{k: v[i] for k, v in meta_columns.items()}} for i, v in enumerate(y)]
    synthetic_store(str(url), x, metadata=meta, rows_per_unit=128)
    return url


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    return _write(root / "s.zarr", same=["x"] * 400)


def _probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_actcache(), "probe", *args], capture_output=True, text=True,
                          timeout=300, check=False, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})


def test_probe_process_writes_the_contract_outputs(store, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "out"
    proc = _probe(str(store), "--label", "label", "--split-column", "split", "--probe",
                  "logistic,ridge", "--precision", "fp32", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics.columns) == [*COLUMNS, "test_r2", "test_mse", "majority_baseline",
                                     "test_accuracy_low", "test_accuracy_high",
                                     "test_auroc_low", "test_auroc_high"]
    assert metrics[["layer", "probe"]].values.tolist() == [
        [0, "logistic"], [1, "logistic"], [2, "logistic"], [0, "ridge"], [1, "ridge"],
        [2, "ridge"]]
    assert (metrics["n_test"] == 100).all() and (metrics["n_train"] == 300).all()
    best = metrics.sort_values(["test_accuracy", "layer"], ascending=[False, True]).iloc[0]
    assert (f"best layer: {best.layer} ({best.probe}, test accuracy {best.test_accuracy:.3f}, "
            f"selectivity {best.selectivity:.3f}); trained on cpu: logistic in fp32 (--precision "
            f"fp32), ridge in "
            f"float64; wrote {out}") in proc.stdout
    assert "probes on 'label'" in proc.stdout and "train acc" in proc.stdout
    with safe_open(str(out / "probes.safetensors"), "np") as f:
        assert set(f.keys()) == {f"{p}.layer{i}.{t}" for p in ("logistic", "ridge")
                                 for i in range(3) for t in ("weight", "bias")}
        assert f.get_tensor("logistic.layer2.weight").shape == (1, 16)
        assert f.get_tensor("ridge.layer1.bias").dtype == np.float32
        meta = f.metadata()
    assert meta["store_url"] == str(store) and meta["pooling"] == "mean"
    assert meta["label_column"] == "label" and json.loads(meta["classes"]) == ["no", "yes"]
    assert set(json.loads(meta["strength_per_layer"])["logistic"]) == {"0", "1", "2"}
    assert meta["actcache_version"]
    assert (out / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def incomplete(tmp_path_factory: pytest.TempPathFactory) -> Path:
    url = _write(tmp_path_factory.mktemp("cli") / "partial.zarr")
    shutil.rmtree(url / "units" / "00000002")
    return url


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--label", "topic"], "label column 'topic' is not in the store's metadata; "
                               "available columns: label, split, same"),
        (["--label", "same"], "label column 'same' has 1 class ('x'); a probe needs at least "
                              "two distinct labels: pick another column with --label"),
        (["--label", "label", "--layers", "0,7"],
         "layer 7 is not in the store; stored layers: 0, 1, 2"),
    ],
    ids=["missing-label", "one-class", "layer-missing"],
)
def test_bad_input_on_a_real_store_exits_2_with_one_line(capsys, store, tmp_path, args,
                                                         message):
    from actcache.cli import main

    code = main(["probe", str(store), *args, "--out", str(tmp_path / "o")])
    assert code == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "o").exists()


def test_incomplete_store_exits_2_with_one_line(incomplete, tmp_path):
    """A unit whose marker is gone (a run cut short) makes the store incomplete."""
    proc = _probe(str(incomplete), "--label", "label", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert proc.stderr == (f"error: store {incomplete} is incomplete: some units are not cached "
                           "yet; finish it with `actcache cache JOB.yaml`, then rerun "
                           "`actcache probe`\n")
    assert not (tmp_path / "o").exists()
