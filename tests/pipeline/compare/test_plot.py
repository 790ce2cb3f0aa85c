"""``actcache plot``: depth curves of real probe runs; bad inputs are one line, exit 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from actcache.cli import main
from actcache.probes import train_probes, write_outputs
from actcache.schemas.probe import ProbeConfig
from actcache.similarity._depth import read_runs
from actcache.testing import synthetic_store

N = 240


def _store(root: Path, name: str, depth: int, stored: tuple[int, ...], rng) -> tuple[str, list]:
    """A store of a model with ``depth`` blocks; the label becomes readable with depth."""
    y = (rng.random(N) < 0.6).astype(int)
    x = {layer: rng.standard_normal((N, 6)).astype(np.float32)
         + np.float32(2 * layer / depth) * np.outer(y - 0.5, np.ones(6, np.float32))
         for layer in stored}
    meta = [{"label": int(v), "score": float(v) + rng.normal(), "split":
             "test" if i % 3 == 0 else "train"} for i, v in enumerate(y)]
    url = str(root / f"{name}.zarr")
    synthetic_store(url, x, metadata=meta, rows_per_unit=80, num_hidden_layers=depth)
    return url, meta


def _run(store: str, out: Path, model: str, **config) -> Path:
    result = train_probes(store, ProbeConfig(seed=0, split_column="split", **config))
    result.metadata["model"] = model  # synthetic stores all name their model "synthetic"
    return write_outputs(result, out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("depth")
    rng = np.random.default_rng(4)
    small, _ = _store(root, "small", 2, (0, 1, 2), rng)
    deep, _ = _store(root, "deep", 4, (0, 2, 4), rng)
    return {
        "small": _run(small, root / "small-run", "small-model", label="label", probes=("logistic",)),
        "deep": _run(deep, root / "deep-run", "deep-model", label="label", probes=("logistic",)),
        "regression": _run(small, root / "reg-run", "small-model", label="score",
                           task="regression"),
    }


def test_relative_depth_divides_by_the_models_number_of_layers(runs):
    curves, task = read_runs([runs["small"], runs["deep"]], "relative")
    assert task == "classification"
    assert [c.label for c in curves] == ["small-model", "deep-model"]
    assert [c.n_layers for c in curves] == [2, 4]
    np.testing.assert_allclose(curves[0].depth, [0, 0.5, 1])
    np.testing.assert_allclose(curves[1].depth, [0, 0.5, 1])  # layers 0, 2, 4 of 4


def test_values_are_the_runs_metrics(runs):
    import pandas as pd

    curves, _ = read_runs([runs["deep"]], "absolute")
    m = pd.read_csv(runs["deep"] / "metrics.csv")
    np.testing.assert_array_equal(curves[0].depth, [0, 2, 4])
    np.testing.assert_allclose(curves[0].score, m["test_accuracy"])
    np.testing.assert_allclose(curves[0].low, m["test_accuracy_low"])
    assert curves[0].chance == pytest.approx(m["majority_baseline"].iloc[0])


def test_depth_comes_from_the_run_when_its_store_is_gone(runs, tmp_path):
    import shutil

    moved = tmp_path / "copy"
    shutil.copytree(runs["deep"], moved)
    curves, _ = read_runs([moved], "relative")
    assert curves[0].n_layers == 4  # the store still opens
    # A run whose store is gone: the deepest probed layer stands for the model's depth.
    from safetensors.numpy import load_file, save_file

    from actcache.similarity._depth import _metadata

    meta = {**_metadata(moved / "probes.safetensors"), "store_url": str(tmp_path / "gone.zarr")}
    save_file(load_file(str(moved / "probes.safetensors")), str(moved / "probes.safetensors"),
              metadata=meta)
    curves, _ = read_runs([moved], "relative")
    assert curves[0].n_layers == 4


def test_command_writes_the_plot_and_names_each_best_layer(runs, tmp_path, capsys):
    out = tmp_path / "figs" / "depth.png"
    args = ["plot", str(runs["small"]), str(runs["deep"]), "--out", str(out)]
    assert main(args) == 0
    png = out.read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    said = capsys.readouterr().out.splitlines()
    assert said[0].startswith("small-model: best logistic ") and "of 2 (relative depth" in said[0]
    assert said[1].startswith("deep-model: best logistic ") and said[-1] == f"wrote {out}"
    assert main([*args[:-2], "--depth", "absolute", "--out", str(tmp_path / "abs.png")]) == 0


@pytest.mark.parametrize(("which", "extra", "said"), [
    (["small", "regression"], [], "error: cannot overlay regression runs ("),
    (["small", "missing"], [], "has no metrics.csv: give folders written by `actcache probe"),
    (["small"], ["--probe", "ridge"], "has no 'ridge' probe; its probes: logistic"),
    (["other"], [], "is not the metrics.csv of a probe run (no rows, or no test_accuracy"),
    (["empty"], [], "metrics.csv is not a readable CSV"),
], ids=["regression-mixed", "no-metrics", "no-such-probe", "other-csv", "empty-csv"])
def test_bad_input_exits_2_with_one_error_line(runs, tmp_path, capsys, which, extra, said):
    folders = [str(runs.get(w, tmp_path / w)) for w in which]
    for name in ("missing", "other", "empty"):
        (tmp_path / name).mkdir()
    (tmp_path / "other" / "metrics.csv").write_text("layer,probe,train_group\n0,logistic,a\n")
    (tmp_path / "empty" / "metrics.csv").write_text("")
    assert main(["plot", *folders, *extra, "--out", str(tmp_path / "d.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said in err[0], err
    assert not (tmp_path / "d.png").exists()
