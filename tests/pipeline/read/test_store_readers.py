"""A store as plain readers see it (zarr, xarray, tensorstore), and the model input kept per
row: shown by query, carried by exports, left out on request; format-1 stores still read."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from actcache.cache.driver import load_job, run_job
from actcache.store import open_store
from tests.conftest import SENTENCES

CONSOLE = Path(sys.executable).with_name("actcache")


def _cache(folder: Path, model: str, texts: list[str], **fields: object) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "in.jsonl").open("w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": f"s{i:02d}", "text": text, "label": i % 2}) + "\n")
    extra = "".join(f"{k}: {json.dumps(v)}\n" for k, v in fields.items())
    (folder / "job.yaml").write_text(f"model: {model}\ninputs: in.jsonl\nstore: s.zarr\nid_column: id\n"
                                     f"rows_per_unit: 16\nbatch_size: 8\n{extra}")
    run_job(load_job(folder / "job.yaml"), inline=True, echo=lambda *_: None)
    return str(folder / "s.zarr")


@pytest.fixture(scope="module")
def edited(tmp_path_factory: pytest.TempPathFactory, tiny_bert: str) -> tuple[str, list[str]]:
    """23 rows in two units of 16 (9 unused slots), then row 3 edited: re-cached into a
    third unit, superseding its old slot."""
    folder = tmp_path_factory.mktemp("readers")
    texts = list(SENTENCES)
    _cache(folder, tiny_bert, texts)
    texts[3] = "An edited sentence replaces the old one."
    return _cache(folder, tiny_bert, texts), texts


def test_valid_marks_exactly_the_live_rows_for_plain_zarr(edited):
    url, texts = edited
    s = open_store(url)
    g = zarr.open_group(url, mode="r")
    valid = g["rows/valid"][:]
    assert g["rows/ids"].shape == (48,) and valid.sum() == len(SENTENCES)
    order = np.argsort(g["rows/seq"][:][valid], kind="stable")
    assert tuple(g["rows/ids"][:][valid][order]) == s.ids
    assert list(g["rows/input"][:][valid][order]) == texts
    x = g["mean/layer_3"][:][valid][order].astype(np.float32)
    np.testing.assert_array_equal(x, s.read(3))


def test_the_store_opens_as_one_xarray_datatree(edited):
    xr = pytest.importorskip("xarray")
    url, texts = edited
    s = open_store(url)
    tree = xr.open_datatree(url, engine="zarr", consolidated=False)
    layer = tree["mean"]["layer_3"]
    assert layer.dims == ("row", "hidden") and layer.shape == (48, 32)
    rows = xr.open_zarr(url, group="rows", consolidated=False)
    assert rows["valid"].dims == ("row",)
    live = rows.assign(x=layer.variable).isel(row=rows["valid"].values).sortby("seq")
    assert list(live["ids"].values) == list(s.ids)
    assert list(live["input"].values) == texts
    np.testing.assert_array_equal(live["x"].values.astype(np.float32), s.read(3))


def test_tensorstore_reads_every_numeric_array(edited):
    ts = pytest.importorskip("tensorstore")
    url, _ = edited
    g = zarr.open_group(url, mode="r")
    numeric = [(path, arr) for path, arr in _arrays(g) if arr.dtype.kind in "biuf"]
    assert {"mean/layer_0", "rows/seq", "rows/valid", "units/00000002"} <= {p for p, _ in numeric}
    for path, arr in numeric:
        t = ts.open({"driver": "zarr3", "kvstore": {"driver": "file",
                                                    "path": os.path.join(url, path)}}).result()
        np.testing.assert_array_equal(t.read().result(), arr[:], err_msg=path)
        assert t.domain.labels[0] in ("row", "marker")


def _arrays(group: zarr.Group, prefix: str = "") -> list[tuple[str, zarr.Array]]:
    found = []
    for name, member in group.members():
        path = f"{prefix}{name}"
        if isinstance(member, zarr.Group):
            found += _arrays(member, path + "/")
        else:
            found.append((path, member))
    return found


@pytest.mark.slow  # four runs of the console script in subprocesses: ~27 s
def test_query_shows_the_input_and_exports_carry_it_with_ids(edited, tmp_path):
    url, texts = edited
    env = {**os.environ, "ACTCACHE_LOG_DIR": str(tmp_path)}
    done = subprocess.run([str(CONSOLE), "query", url, "--where", "label=1", "--limit", "2"],
                          capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    header, _, first, second = done.stdout.splitlines()[:4]
    assert [c.strip() for c in header.split("┃")][:2] == ["id", "input"]
    assert first.split("│")[1].strip() == texts[1] and second.split("│")[1].strip() == texts[3]

    s = open_store(url)
    wanted = ["s05", "s03"]
    for name in ("x.npy", "x.npz", "x.parquet"):
        out = subprocess.run([str(CONSOLE), "query", url, "--layer", "2", "--ids", ",".join(wanted),
                              "--out", str(tmp_path / name)], capture_output=True, text=True,
                             env=env, check=False)
        assert out.returncode == 0, out.stderr
    expected = s.read(2, rows=s.rows_for_ids(wanted))
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), expected)
    assert json.loads((tmp_path / "x.ids.json").read_text()) == wanted
    npz = np.load(tmp_path / "x.npz")
    assert list(npz["ids"]) == wanted
    np.testing.assert_array_equal(npz["activations"], expected)
    table = pd.read_parquet(tmp_path / "x.parquet")
    assert list(table["input"]) == [texts[5], texts[3]]


def test_a_job_can_keep_the_inputs_out(tmp_path, tiny_bert):
    url = _cache(tmp_path, tiny_bert, SENTENCES[:5], store_inputs=False)
    g = zarr.open_group(url, mode="r")
    assert set(g["rows/input"][:]) == {""}
    s = open_store(url)
    assert s.inputs() is None
    done = subprocess.run([str(CONSOLE), "query", url, "--where", "label=1"], capture_output=True,
                          text=True, check=False, env={**os.environ, "ACTCACHE_LOG_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert [c.strip() for c in done.stdout.splitlines()[0].split("┃")] == ["id", "label"]
    assert SENTENCES[1] not in done.stdout


def test_a_format_1_store_still_reads(edited, tmp_path):
    url, texts = edited
    old = tmp_path / "v1.zarr"
    shutil.copytree(url, old)
    for key in ("rows/input", "rows/valid"):
        shutil.rmtree(old / key)
    meta = json.loads((old / "zarr.json").read_text())
    meta["attributes"]["actcache"]["format_version"] = 1
    (old / "zarr.json").write_text(json.dumps(meta))
    s, new = open_store(str(old)), open_store(url)
    assert s.ids == new.ids and s.inputs() is None
    np.testing.assert_array_equal(s.read(3), new.read(3))
    done = subprocess.run([str(CONSOLE), "query", str(old), "--layer", "3", "--ids", "s03",
                           "--out", str(tmp_path / "v1.parquet")], capture_output=True, text=True,
                          check=False, env={**os.environ, "ACTCACHE_LOG_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "input" not in pd.read_parquet(tmp_path / "v1.parquet").columns
