"""Ctrl-C during `actcache cache`: one line saying what was committed, the run recorded as
interrupted with those counts, and every process the run started stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from actcache.store import open_store

CONSOLE = Path(sys.executable).with_name("actcache")


@pytest.mark.ray
@pytest.mark.slow
def test_ctrl_c_reports_committed_rows_records_interrupted_and_stops_ray(tmp_path, tiny_bert):
    rows = 400
    with (tmp_path / "in.jsonl").open("w") as f:
        for i in range(rows):
            f.write(json.dumps({"id": f"r{i:03d}", "text": f"sentence {i} " * (1 + i % 7)}) + "\n")
    (tmp_path / "job.yaml").write_text(
        f"model: {tiny_bert}\ninputs: in.jsonl\nstore: s.zarr\nrows_per_unit: 20\nbatch_size: 4\n")
    env = {**os.environ, "ACTCACHE_LOG_DIR": str(tmp_path / "logs"), "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([str(CONSOLE), "cache", str(tmp_path / "job.yaml")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = tmp_path / "s.zarr" / "units" / "00000001" / "zarr.json"
    deadline = time.monotonic() + 240
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.exists(), "no unit committed in time"
    started = psutil.Process(proc.pid).children(recursive=True)
    assert started  # Ray's processes, children of the run
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)

    assert proc.returncode == 130, err
    store = open_store(str(tmp_path / "s.zarr"))
    committed = store.n_rows
    assert 0 < committed < rows
    assert err.strip().splitlines()[-1] == (
        f"interrupted; {committed} rows committed, rerun to finish")
    (record,) = store.runs
    assert record["status"] == "interrupted" and record["ended"]
    assert (record["rows_added"], record["units"]) == (committed, len(store.receipts))
    time.sleep(5)
    alive = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [p.cmdline()[:2] for p in alive]

    again = subprocess.run([str(CONSOLE), "cache", str(tmp_path / "job.yaml")], env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"{rows - committed} added" in again.stdout
    assert open_store(str(tmp_path / "s.zarr")).ids == tuple(str(i) for i in range(rows))
