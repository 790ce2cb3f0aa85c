"""``actcache query``: tables, exports, and one clear error line (exit 2) per bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import save_file

from actcache.cli import main
from actcache.testing import synthetic_store

N, HIDDEN = 40, 8
CONSOLE = Path(sys.executable).with_name("actcache")


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return np.random.default_rng(11).standard_normal((N, HIDDEN)).astype(np.float32)


@pytest.fixture(scope="module")
def store_url(tmp_path_factory, data) -> str:  # type: ignore[no-untyped-def]
    url = str(tmp_path_factory.mktemp("cli") / "s.zarr")
    meta = [{"label": i % 2, "split": "test" if i % 4 == 0 else "train"} for i in range(N)]
    synthetic_store(url, {0: data * 0.5, 3: data}, [f"ex-{i}" for i in range(N)], meta,
                    rows_per_unit=16, chunk_rows=8, num_hidden_layers=3)
    return url


@pytest.fixture(scope="module")
def probes(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    w = np.linspace(-1, 1, HIDDEN, dtype=np.float32)
    path = tmp_path_factory.mktemp("probes") / "probes.safetensors"
    save_file({"logistic.layer3.weight": w[None, :], "logistic.layer3.bias": np.zeros(1, "f4"),
               "mean-diff.layer3.weight": -w[None, :],
               "multi.layer3.weight": np.stack([w, -w, w * 2])},
              str(path), metadata={"classes": json.dumps(["no", "yes"])})
    return path


def _ids_in(text: str) -> list[str]:
    return [word for line in text.splitlines() for word in line.split() if word.startswith("ex-")]


def test_where_lists_matching_rows_with_metadata(store_url, capsys) -> None:
    assert main(["query", store_url, "--layer", "3", "--where", "label=1",
                 "--where", "split=test"]) == 0
    out = capsys.readouterr().out
    assert _ids_in(out) == []  # label 1 rows are odd, test rows are multiples of 4
    assert "0 rows" in out
    assert main(["query", store_url, "--layer", "3", "--where", "split=test", "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert _ids_in(out) == ["ex-0", "ex-4", "ex-8"]
    assert "label" in out and "split" in out and "3 rows" in out


def test_top_k_by_probe_direction(store_url, probes, data, capsys) -> None:
    w = np.linspace(-1, 1, HIDDEN, dtype=np.float32)
    scores = data @ w
    best = np.lexsort((np.arange(N), -scores))[:4]
    assert main(["query", store_url, "--layer", "-1", "--top-k", "4",
                 "--direction", str(probes)]) == 0
    out = capsys.readouterr().out
    assert _ids_in(out) == [f"ex-{i}" for i in best]
    assert f"{scores[best[0]]:.6g}" in out
    # The negative class of a binary probe ranks along minus the direction.
    worst = np.lexsort((np.arange(N), scores))[:4]
    assert main(["query", store_url, "--layer", "3", "--top-k", "4", "--direction", str(probes),
                 "--class", "no"]) == 0
    assert _ids_in(capsys.readouterr().out) == [f"ex-{i}" for i in worst]
    assert main(["query", store_url, "--layer", "3", "--top-k", "4", "--direction", str(probes),
                 "--probe", "multi", "--class", "yes"]) == 0
    assert _ids_in(capsys.readouterr().out) == [f"ex-{i}" for i in worst]


def test_top_k_within_a_filter_exported_to_parquet(store_url, probes, data, tmp_path,
                                                   capsys) -> None:
    w = np.linspace(-1, 1, HIDDEN, dtype=np.float32)
    rows = np.flatnonzero(np.arange(N) % 2 == 1)
    best = rows[np.lexsort((rows, -(data[rows] @ w)))[:3]]
    out = tmp_path / "top.parquet"
    assert main(["query", store_url, "--layer", "3", "--where", "label=1", "--top-k", "3",
                 "--direction", str(probes), "--out", str(out)]) == 0
    assert f"wrote 3 rows to {out}" in capsys.readouterr().out
    frame = pd.read_parquet(out)
    assert frame["id"].tolist() == [f"ex-{i}" for i in best]
    np.testing.assert_allclose(frame["score"], data[best] @ w, rtol=1e-6)
    np.testing.assert_array_equal(np.stack(frame["activation"]), data[best])


def test_nearest_and_ids_export_npy(store_url, data, tmp_path, capsys) -> None:
    assert main(["query", store_url, "--layer", "3", "--nearest", "ex-5", "--k", "3"]) == 0
    assert _ids_in(capsys.readouterr().out)[0] == "ex-5"
    out = tmp_path / "slice.npy"
    assert main(["query", store_url, "--layer", "0", "--ids", "ex-9,ex-2", "--out", str(out)]) == 0
    assert _ids_in(capsys.readouterr().out) == ["ex-9", "ex-2"]
    np.testing.assert_array_equal(np.load(out), data[[9, 2]] * 0.5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layer", "3", "--ids", "ex-1,ex-404"], "error: id 'ex-404' not in the store"),
        (["--layer", "3", "--where", "colour=red"],
         "error: column 'colour' is not in the store's metadata; "
         "available columns: label, split"),
        (["--layer", "5"], "error: layer 5 is not in the store; stored layers: 0, 3"),
        (["--layer", "3", "--where", "label"],
         "error: --where 'label' is not of the form column=value; write e.g. --where label=1"),
        (["--layer", "3", "--nearest", "ex-1", "--metric", "l1"],
         "error: metric 'l1' is not one of cosine, dot, euclidean"),
        (["--layer", "3", "--top-k", "2"],
         "error: --top-k needs --direction probes.safetensors"),
        (["--layer", "3", "--out", "x.csv"], "error: --out 'x.csv' must end in .npy, .npz or .parquet"),
        (["--where", "label=1", "--out", "x.npy"], "error: --out reads activations: give the layer with --layer"),
    ],
    ids=["id", "column", "layer", "where", "metric", "no-direction", "format", "no-layer"],
)
def test_bad_input_is_one_error_line_exit_2(store_url, args, message, capsys) -> None:
    assert main(["query", store_url, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message)
    assert err.count("\n") == 1


def test_wrong_width_direction_and_class(store_url, tmp_path, probes, capsys) -> None:
    narrow = tmp_path / "narrow.safetensors"
    save_file({"logistic.layer3.weight": np.ones((1, HIDDEN - 2), "f4")}, str(narrow))
    assert main(["query", store_url, "--layer", "3", "--top-k", "2",
                 "--direction", str(narrow)]) == 2
    assert capsys.readouterr().err == (
        "error: the direction has shape (6,) but rows of layer 3 have 8 values; "
        "give a vector of length 8\n")
    assert main(["query", store_url, "--layer", "3", "--top-k", "2", "--direction", str(probes),
                 "--class", "maybe"]) == 2
    assert capsys.readouterr().err == (
        "error: class 'maybe' is not one of the probe's classes: no, yes\n")
    assert main(["query", store_url, "--layer", "0", "--top-k", "2",
                 "--direction", str(probes)]) == 2
    assert "has no 'logistic.layer0.weight'" in capsys.readouterr().err


def test_console_script_as_a_real_process(store_url) -> None:
    ok = subprocess.run([str(CONSOLE), "query", store_url, "--layer", "3", "--ids", "ex-3"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "ex-3" in ok.stdout
    bad = subprocess.run([str(CONSOLE), "query", store_url, "--layer", "3", "--ids", "nope"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr == "error: id 'nope' not in the store\n"
    assert "Traceback" not in bad.stdout + bad.stderr


def test_a_cached_store_end_to_end(tiny_gpt2_left, sentences_jsonl, tmp_path, capsys) -> None:
    from actcache import open_store
    from actcache.cache.driver import parse_job, run_job

    url = str(tmp_path / "cached.zarr")
    run_job(parse_job({"model": tiny_gpt2_left, "inputs": str(sentences_jsonl), "store": url,
                       "layers": [1, 3], "pooling": ["mean", "last"], "rows_per_unit": 8, "id_column": "id",
                       "batch_size": 4}), inline=True)
    s = open_store(url)
    q = s.select(where={"label": 1, "split": "test"})
    assert q.ids == ("s05", "s15")
    np.testing.assert_array_equal(q.read(3, "last"), s.read(3, "last", rows=q.rows))
    query = s.read(1, "mean", rows=s.rows_for_ids(["s07"]))[0]
    assert s.nearest(1, query, k=3, pooling="mean").ids[0] == "s07"
    assert main(["query", url, "--layer", "1", "--pooling", "mean", "--nearest", "s07",
                 "--k", "2", "--metric", "euclidean"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if "│" in line]
    assert lines[0][0] == "s07"
    assert lines[0][-1] == "0"  # distance 0 to itself
    assert float(lines[1][-1]) < 0
