"""`actcache cache --in-process`: one worker in the command's own process, no Ray, with the
same store, resume, run record and progress as a run on Ray actors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from actcache import open_store
from actcache.cache.driver import load_job, parse_job, run_job
from actcache.cli import main
from tests.conftest import SENTENCES

CONSOLE = Path(sys.executable).with_name("actcache")
TEXTS = [f"{s} (variant {i})" for i in range(4) for s in SENTENCES]  # 92 rows
QUIET = {"echo": lambda *_: None}


def write_job(folder: Path, model: str, store: str, name: str = "job.yaml", **extra: object
              ) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "in.jsonl").write_text("".join(
        json.dumps({"id": f"r{i:04d}", "text": t, "group": i % 3}) + "\n"
        for i, t in enumerate(TEXTS)))
    fields = {"model": model, "inputs": "in.jsonl", "store": store, "id_column": "id",
              "layers": [0, 2, 3], "pooling": ["mean", "tokens"], "rows_per_unit": 10,
              "batch_size": 4, **extra}
    path = folder / name
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in fields.items()))
    return path


def assert_identical(a, b) -> None:
    """Same ids, metadata, token lengths and bit-identical values in every array."""
    assert a.ids == b.ids
    assert a.metadata.equals(b.metadata)
    np.testing.assert_array_equal(a.token_lengths(), b.token_lengths())
    for pooling in a.poolings:
        for layer in a.layers:
            np.testing.assert_array_equal(a.read(layer, pooling), b.read(layer, pooling))


def comparable(manifest: dict) -> dict:
    """A manifest less what differs between any two runs: the store's path, the check's time."""
    job = {k: v for k, v in manifest["job"].items() if k != "store"}
    check = {k: v for k, v in manifest["self_check"].items() if k != "seconds"}
    return {**manifest, "job": job, "self_check": check}


@pytest.mark.ray
def test_an_in_process_run_stores_what_a_ray_run_stores(ray_local, tmp_path, tiny_bert):
    local = run_job(load_job(write_job(tmp_path, tiny_bert, "a.zarr", "a.yaml")), inline=True,
                    **QUIET)
    on_ray = run_job(load_job(write_job(tmp_path, tiny_bert, "b.zarr", "b.yaml")), **QUIET)
    a, b = open_store(str(tmp_path / "a.zarr")), open_store(str(tmp_path / "b.zarr"))
    assert a.complete and b.complete and len(a.ids) == len(TEXTS)
    assert_identical(a, b)
    assert comparable(a.manifest) == comparable(b.manifest)
    assert a.manifest["self_check"]["examples"] > 1  # the in-process worker checked itself
    assert [(r.unit, r.rows) for r in a.receipts] == [(r.unit, r.rows) for r in b.receipts]
    assert (local.rows, local.units) == (on_ray.rows, on_ray.units) == (len(TEXTS), 10)
    (run_a,), (run_b,) = a.runs, b.runs
    counts = ("status", "units", "rows_added", "rows_updated", "rows_skipped", "rows_missing")
    assert [run_a[k] for k in counts] == [run_b[k] for k in counts]


# The real console entry point, each unit slowed so that Ctrl-C lands mid-run.
SLOW_UNITS = """
import sys, time
from actcache.workers.actor import CachingWorker
process = CachingWorker.process
def slow(self, task, counter=None):
    time.sleep(0.4)
    return process(self, task, counter)
CachingWorker.process = slow
from actcache.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_then_rerun_in_process_finishes_the_store(tmp_path, tiny_bert):
    job = write_job(tmp_path, tiny_bert, "s.zarr")
    env = {**os.environ, "ACTCACHE_LOG_DIR": str(tmp_path / "logs"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_UNITS, "cache", str(job), "--in-process"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = tmp_path / "s.zarr" / "units" / "00000001" / "zarr.json"
    deadline = time.monotonic() + 180
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert first.exists(), proc.communicate()[1] if proc.poll() is not None else "too slow"
    assert psutil.Process(proc.pid).children(recursive=True) == []  # no Ray processes
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)

    assert proc.returncode == 130, err
    store = open_store(str(tmp_path / "s.zarr"))
    committed = store.n_rows
    assert 0 < committed < len(TEXTS)
    assert err.strip().splitlines()[-1] == f"interrupted; {committed} rows committed, rerun to finish"
    (record,) = store.runs
    assert record["status"] == "interrupted" and record["ended"]
    assert (record["rows_added"], record["units"]) == (committed, len(store.receipts))

    again = subprocess.run([str(CONSOLE), "cache", str(job), "--in-process"], env=env,
                           capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr
    # The progress line and the summary, as a Ray run prints them.
    left = len(TEXTS) - committed
    assert f"caching: {left}/{left} rows, " in again.stderr
    assert again.stderr.rstrip().endswith("units committed")
    assert f"{left} rows cached in " in again.stdout
    assert f"; {left} added, 0 updated, {committed} skipped" in again.stdout
    assert not list((tmp_path / "logs").glob("cache-*.log"))  # no Ray, so no Ray log
    resumed = open_store(str(tmp_path / "s.zarr"))
    assert [r["status"] for r in resumed.runs] == ["interrupted", "succeeded"]
    reference = write_job(tmp_path / "ref", tiny_bert, "s.zarr")
    run_job(load_job(reference), inline=True, **QUIET)
    assert_identical(resumed, open_store(str(tmp_path / "ref" / "s.zarr")))


def test_in_process_refuses_a_job_for_several_workers(tmp_path, tiny_bert, capsys):
    job = write_job(tmp_path, tiny_bert, "s.zarr", workers=2)
    assert main(["cache", str(job), "--in-process"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: `workers: 2` asks for 2 Ray actors, and an in-process run (--in-process) is "
        "one worker; drop --in-process, or set `workers: 1`")
    assert not (tmp_path / "s.zarr").exists()


def test_a_memory_store_runs_in_process(tmp_path, tiny_bert):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"text": t}) + "\n" for t in SENTENCES))
    url = f"memory://in-process-{os.getpid()}/s.zarr"
    job = parse_job({"model": tiny_bert, "inputs": str(inputs), "store": url, "rows_per_unit": 10})
    summary = run_job(job, inline=True, **QUIET)
    store = open_store(url)
    assert store.complete and summary.rows == len(store.ids) == len(SENTENCES)
    assert store.ids == tuple(str(i) for i in range(len(SENTENCES)))
