"""``actcache compare`` writes the contract's table and a heatmap; bad input is one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from actcache.cli import main
from actcache.similarity.api import COLUMNS
from actcache.testing import synthetic_store
from tests.pipeline.compare import _reference as ref

CONSOLE = Path(sys.executable).with_name("actcache")


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(5)
    x = {layer: rng.normal(size=(120, 8)).astype(np.float32) for layer in (0, 1, 2)}
    y = {layer: (x[layer] @ rng.normal(size=(8, 12))).astype(np.float32) for layer in (0, 2)}
    a = synthetic_store(str(root / "a"), x, rows_per_unit=40)
    b = synthetic_store(str(root / "b"), y, rows_per_unit=40, num_hidden_layers=2)
    return a.url, b.url, x, y


def test_writes_similarity_csv_and_heatmap(two, tmp_path, capsys):
    a, b, x, y = two
    out = tmp_path / "out"
    assert main(["compare", a, b, "--layers-a", "0,-1", "--out", str(out)]) == 0
    frame = pd.read_csv(out / "similarity.csv")
    assert list(frame.columns) == COLUMNS
    assert frame[["layer_a", "layer_b"]].to_numpy().tolist() == [[0, 0], [0, 2], [2, 0], [2, 2]]
    assert set(frame["n_rows"]) == {120}
    assert frame["value"].iloc[3] == pytest.approx(ref.cka(x[2], y[2]), abs=1e-6)
    png = (out / "similarity.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    said = capsys.readouterr().out
    assert "4 layer pairs on 120 rows" in said and "similarity.csv" in said


def test_one_store_against_itself(two, tmp_path):
    a, _, _, _ = two
    out = tmp_path / "self"
    assert main(["compare", a, "--metric", "cka-debiased", "--out", str(out)]) == 0
    frame = pd.read_csv(out / "similarity.csv")
    assert len(frame) == 9 and (frame["store_a"] == frame["store_b"]).all()
    diagonal = frame[frame["layer_a"] == frame["layer_b"]]["value"]
    np.testing.assert_allclose(diagonal, 1.0, atol=1e-9)


@pytest.mark.parametrize(("args", "said"), [
    (["--layers-a", "9"], "error: layer 9 is not in the store; stored layers: 0, 1, 2"),
    (["--layers-b", "x"], "error: --layers-b must be 'all' or comma-separated ints"),
    (["--layers-a", ","], "error: --layers-a must be 'all' or comma-separated ints"),
    (["--max-memory", "1KB"], "error: --max-memory of 1000 bytes holds not even one pair"),
    (["--metric", "mutual-knn", "--max-memory", "10KB"], "raise --max-memory"),
    (["--metric", "mutual-knn", "--k", "-3"], "error: mutual-knn's k must be at least 1, not -3"),
], ids=["layer", "layers-syntax", "layers-empty", "memory", "knn-memory", "knn-k"])
def test_bad_input_exits_2_with_one_error_line(two, tmp_path, capsys, args, said):
    a, b, _, _ = two
    assert main(["compare", a, b, "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said in err[0]
    assert not (tmp_path / "o" / "similarity.csv").exists()


def test_unknown_metric_is_a_usage_error(two, capsys):
    a, _, _, _ = two
    assert main(["compare", a, "--metric", "procrustes"]) == 2
    assert "procrustes" in capsys.readouterr().err


def _console(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(CONSOLE), *args], capture_output=True, text=True, env=env,
                          timeout=120, check=False)


def test_console_script_writes_both_files(two, tmp_path):
    a, b, x, y = two
    out = tmp_path / "real"
    done = _console("compare", a, b, "--metric", "cka-debiased", "--out", str(out))
    assert done.returncode == 0, done.stderr
    frame = pd.read_csv(out / "similarity.csv")
    assert len(frame) == 6 and set(frame["metric"]) == {"cka-debiased"}
    first = frame.iloc[0]
    assert first["value"] == pytest.approx(ref.cka_debiased(x[0], y[0]), abs=1e-6)
    assert (out / "similarity.png").read_bytes().startswith(b"\x89PNG")
    assert "6 layer pairs on 120 rows shared by id" in done.stdout


def test_console_script_bad_input_is_one_line_and_exit_2(two, tmp_path):
    a, _, _, _ = two
    done = _console("compare", a, str(tmp_path / "nowhere.zarr"), "--out", str(tmp_path / "o"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nowhere.zarr" in lines[0]
    assert not (tmp_path / "o").exists()
