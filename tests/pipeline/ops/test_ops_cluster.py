"""`actcache submit` and `actcache jobs` against a real Ray head started by the test."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from actcache import open_store
from actcache.cache.driver import load_job, run_job
from actcache.cli import main
from tests.conftest import SENTENCES

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def head_processes(temp_dir: str) -> list[psutil.Process]:
    """The head's processes (their command lines name its temp dir) and their children."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if temp_dir in " ".join(proc.info["cmdline"] or []):
                found[proc.pid] = proc
                found.update({c.pid: c for c in proc.children(recursive=True)})
        except psutil.Error:
            continue
    return list(found.values())


def stop_head(temp_dir: str) -> None:
    """End this head's processes by pid (``ray stop`` would end every Ray on the machine)."""
    procs = head_processes(temp_dir)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A Ray head with its dashboard on a free loopback port; yields the dashboard URL."""
    bindir = Path(sys.executable).parent
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths
    dashboard = free_port()
    workers = 20000 + (dashboard % 200) * 100
    ports = {name: free_port() for name in (
        "node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
        "ray-client-server-port")}
    command = [
        str(bindir / "ray"), "start", "--head", f"--port={free_port()}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
        "--include-dashboard=true", f"--temp-dir={temp_dir}", "--disable-usage-stats",
        f"--min-worker-port={workers}", f"--max-worker-port={workers + 99}",
        *(f"--{name}={port}" for name, port in ports.items()),
    ]
    # The job's entrypoint runs `python` from PATH: the head shares this environment.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", RAY_AUTH_MODE="disabled")
    started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120,
                             check=False)
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        stop_head(temp_dir)


def write_job(folder: Path, model: str, inputs: Path, **fields: object) -> Path:
    # Relative paths: they must resolve against the YAML's folder, not the job's working dir.
    spec = {"model": model, "inputs": inputs.name, "id_column": "id", "store": "store.zarr",
            "layers": [1, 3], "rows_per_unit": 8, **fields}
    path = folder / "nightly.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def actcache(*args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen([sys.executable, "-m", "actcache.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def failing_submit(
    ray_head: str, tiny_bert: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """`submit --wait` of a job asking for a layer the model lacks, started in the background
    by the first test so that both jobs run side by side."""
    folder = tmp_path_factory.mktemp("failing")
    inputs = folder / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n"
                              for i, t in enumerate(SENTENCES)))
    job_path = write_job(folder, tiny_bert, inputs, layers=[1, 9])
    proc = actcache("submit", str(job_path), "--address", ray_head, "--wait")
    yield proc, folder
    proc.kill()


def test_submit_wait_runs_the_job_on_the_cluster(
    ray_head: str, failing_submit: object, tiny_bert: str, sentences_jsonl: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    job_path = write_job(tmp_path, tiny_bert, sentences_jsonl)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    code, out, err = finish(actcache("submit", str(job_path), "--address", ray_head, "--wait"))

    assert code == 0, out + err
    job_id = out.splitlines()[0]
    assert job_id.startswith("actcache-nightly-")
    assert "23 rows cached in 3 units" in out  # the job's own summary, followed live
    assert err.strip().endswith(f"job {job_id} succeeded")
    store = open_store(str(tmp_path / "store.zarr"))
    assert store.complete
    assert len(store.ids) == 23

    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    (reference_dir / sentences_jsonl.name).write_text(sentences_jsonl.read_text())
    run_job(load_job(write_job(reference_dir, tiny_bert, sentences_jsonl)), inline=True,
            echo=lambda *_: None)
    reference = open_store(str(reference_dir / "store.zarr"))
    assert store.ids == reference.ids
    for layer in (1, 3):
        np.testing.assert_array_equal(store.read(layer), reference.read(layer))

    assert main(["jobs", "status", job_id, "--address", ray_head]) == 0
    status = capsys.readouterr().out
    assert f"job:        {job_id}" in status
    assert "status:     SUCCEEDED" in status
    assert f"store:      {tmp_path / 'store.zarr'}" in status

    assert main(["jobs", "logs", job_id, "--address", ray_head]) == 0
    assert "23 rows cached in 3 units" in capsys.readouterr().out

    monkeypatch.setenv("RAY_ADDRESS", ray_head)
    assert main(["jobs", "list"]) == 0
    listed = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [job_id, "SUCCEEDED"] in [row[:2] for row in listed]


def test_a_failing_job_makes_submit_wait_exit_1_with_its_error_line(
    failing_submit: tuple[subprocess.Popen[str], Path],
) -> None:
    proc, folder = failing_submit
    code, out, err = finish(proc)

    assert code == 1, out + err
    job_id = out.splitlines()[0]
    assert err.strip().splitlines()[-1] == (
        f"error: job {job_id} failed: layer 9 is out of range: the model has 3 blocks, so "
        "layers run 0..3 (or -4..-1); fix `layers` in the job"
    )
    assert not (folder / "store.zarr").exists()


def test_submit_without_wait_prints_the_id_and_jobs_stop_stops_it(
    ray_head: str, tiny_bert: str, sentences_jsonl: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    job_path = write_job(tmp_path, tiny_bert, sentences_jsonl)
    assert main(["submit", str(job_path), "--address", ray_head]) == 0
    captured = capsys.readouterr()
    job_id = captured.out.strip()
    assert captured.err.strip() == f"follow it with: actcache jobs logs {job_id} --follow"

    assert main(["jobs", "stop", job_id, "--address", ray_head]) == 0
    assert capsys.readouterr().out.strip() == f"job {job_id}: stop requested"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        main(["jobs", "status", job_id, "--address", ray_head])
        if "status:     STOPPED" in capsys.readouterr().out:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the job did not stop")

    assert main(["jobs", "logs", "no-such-job", "--address", ray_head]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: no job 'no-such-job' on this cluster; `actcache jobs list` shows the jobs"
    )
