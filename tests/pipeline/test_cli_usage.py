"""The console script as a new user meets it: usage errors, help, version, and errors that
name what the user typed. Every case runs the real ``actcache`` process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from actcache import __version__
from actcache.testing import synthetic_store

CONSOLE = Path(sys.executable).with_name("actcache")


def _run(*args: str, log_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "ACTCACHE_LOG_DIR": str(log_dir), "HF_HUB_OFFLINE": "1", **env}
    environ.pop("RAY_ADDRESS", None)
    return subprocess.run([str(CONSOLE), *args], capture_output=True, text=True, timeout=300,
                          check=False, env=environ)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    rng = np.random.default_rng(5)
    url = str(tmp_path_factory.mktemp("usage") / "s.zarr")
    x = {(p, layer): rng.standard_normal((60, 8)).astype(np.float32)
         for p in ("mean", "max") for layer in (0, 1)}
    meta = [{"label": i % 2, "y": i * 0.37, "split": "test" if i % 4 == 0 else "train"}
            for i in range(60)]
    synthetic_store(url, x, [f"r{i}" for i in range(60)], meta, rows_per_unit=32,
                    poolings=("mean", "max"), num_hidden_layers=1)
    return url


@pytest.mark.parametrize(("args", "message"), [
    (["query", "STORE", "--layr", "4"], "No such option: --layr (Possible options: --class, --layer)"),
    (["frobnicate"], "No such command 'frobnicate'"),
    (["query", "STORE", "--layer", "four"], "Invalid value for '--layer'"),
    (["query"], "Missing argument 'store'"),
])
def test_usage_errors_are_click_messages_exit_2_without_a_log(args, message, store, tmp_path):
    done = _run(*[store if a == "STORE" else a for a in args], log_dir=tmp_path / "logs")
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "internal error" not in done.stderr
    assert not (tmp_path / "logs").exists()


def test_short_help_and_version(tmp_path):
    assert "Usage: actcache" in _run("-h", log_dir=tmp_path).stdout
    helped = _run("query", "-h", log_dir=tmp_path)
    assert helped.returncode == 0 and "--where" in helped.stdout
    version = _run("--version", log_dir=tmp_path)
    assert (version.returncode, version.stdout.strip()) == (0, f"actcache {__version__}")


def test_a_metadata_only_query_needs_no_layer(store, tmp_path):
    done = _run("query", store, "--where", "label=1", "--limit", "3", log_dir=tmp_path,
                COLUMNS="200")
    assert done.returncode == 0, done.stderr
    assert ["r1", "r3", "r5"] == [w for w in done.stdout.split() if w.startswith("r")][:3]
    ranked = _run("query", store, "--nearest", "r1", log_dir=tmp_path)
    assert ranked.returncode == 2
    assert ranked.stderr.strip() == (
        "error: --nearest reads activations: give the layer with --layer, e.g. --layer 6")


def test_errors_name_the_flag_the_user_typed(store, tmp_path):
    done = _run("probe", store, "--label", "label", "--out", str(tmp_path / "p"),
                log_dir=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: the store has poolings mean, max: name one with --pooling"
    twice = _run("probe", store, "--label", "label", "--pooling", "mean", "--layers", "0,0",
                 log_dir=tmp_path)
    assert (twice.returncode, twice.stderr.strip()) == (2, "error: --layers names a layer twice")


def test_task_regression_alone_trains_ridge(store, tmp_path):
    out = tmp_path / "p"
    done = _run("probe", store, "--label", "y", "--task", "regression", "--pooling", "mean",
                "--out", str(out), log_dir=tmp_path, COLUMNS="200")
    assert done.returncode == 0, done.stderr
    import pandas as pd

    assert set(pd.read_csv(out / "metrics.csv")["probe"]) == {"ridge"}


@pytest.mark.slow  # the console script with torch and transformers imported: ~9 s
def test_a_hub_id_not_in_the_cache_says_so_and_how_to_fetch_it(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"text": "a"}\n')
    job = tmp_path / "job.yaml"
    job.write_text("model: someorg/some-model\ninputs: in.jsonl\nstore: s.zarr\n")
    done = _run("cache", str(job), log_dir=tmp_path / "logs", HF_HUB_CACHE=str(tmp_path / "hub"))
    assert done.returncode == 2
    line = done.stderr.strip()
    assert line.startswith("error: model 'someorg/some-model' is not in the local Hugging Face "
                           f"cache ({tmp_path / 'hub'})")
    assert "`hf download someorg/some-model`" in line
    assert "connect" not in line and "\n" not in line
    assert not (tmp_path / "s.zarr").exists()


def test_schedule_without_a_cluster_runs_cache_locally(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("model: m\ninputs: in.jsonl\nstore: s.zarr\n")
    done = _run("schedule", str(job), "--cron", "0 2 * * *", log_dir=tmp_path)
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert line.startswith(f"0 2 * * * mkdir -p {tmp_path}")
    assert f"-m actcache.cli cache {job}" in line
    assert "submit" not in line and "--address" not in line
