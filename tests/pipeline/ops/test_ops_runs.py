"""Nightly runs against one store: incremental inputs, a killed run, concurrent runs, history."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import yaml

from actcache import open_store
from actcache.cache.driver import load_job, run_job
from actcache.cache.lease import Lease
from actcache.cli import main
from actcache.ops.runs import history, shown_status, table
from tests.conftest import SENTENCES


def write_inputs(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w") as f:
        for row_id, text in rows:
            f.write(json.dumps({"id": row_id, "text": text, "n": len(text)}) + "\n")
    return path


def write_job(folder: Path, model: str, name: str = "job", **fields: Any) -> Path:
    spec = {"model": model, "inputs": "inputs.jsonl", "id_column": "id",
            "store": "store.zarr", "layers": [0, 2, 3], "rows_per_unit": 8, **fields}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def snapshot(url: str) -> dict[str, dict[int, np.ndarray]]:
    """Every stored row's values by id, per layer."""
    store = open_store(url)
    return {i: {layer: store.read(layer)[k] for layer in store.layers}
            for k, i in enumerate(store.ids)}


def test_incremental_run_adds_new_rows_and_recaches_the_edited_one(
    tiny_bert: str, tmp_path: Path
) -> None:
    first = [(f"s{i:02d}", text) for i, text in enumerate(SENTENCES[:20])]
    write_inputs(tmp_path / "inputs.jsonl", first)
    job_path = write_job(tmp_path, tiny_bert)
    run_job(load_job(job_path), inline=True, echo=lambda *_: None)
    store_url = str(tmp_path / "store.zarr")
    before = snapshot(store_url)

    edited = "Paris is the capital of France, and Lyon is its third city."
    second = [(i, edited if i == "s01" else t) for i, t in first]
    new = [(f"n{i}", f"A new sentence number {i} arrived tonight.") for i in range(6)]
    write_inputs(tmp_path / "inputs.jsonl", second + new)  # 30% new rows, one edit
    summary = run_job(load_job(job_path), inline=True, echo=lambda *_: None)
    after = snapshot(store_url)

    assert (summary.plan.added, summary.plan.updated, summary.plan.skipped) == (6, 1, 19)
    assert list(open_store(store_url).ids) == [i for i, _ in first] + [i for i, _ in new]
    for row_id, layers in before.items():
        if row_id != "s01":
            for layer, values in layers.items():
                assert np.array_equal(after[row_id][layer], values), (row_id, layer)

    fresh_dir = tmp_path / "fresh"
    fresh_dir.mkdir()
    write_inputs(fresh_dir / "inputs.jsonl", [("s01", edited)])
    run_job(load_job(write_job(fresh_dir, tiny_bert)), inline=True, echo=lambda *_: None)
    fresh = snapshot(str(fresh_dir / "store.zarr"))["s01"]
    for layer in (0, 2, 3):
        np.testing.assert_allclose(after["s01"][layer], fresh[layer], rtol=1e-3, atol=1e-3)
        assert not np.allclose(after["s01"][layer], before["s01"][layer], atol=1e-2)

    runs = history(store_url)
    assert [(r["status"], r["added"], r["updated"], r["skipped"], r["missing"]) for r in runs] == [
        ("succeeded", 20, 0, 0, 0),
        ("succeeded", 6, 1, 19, 0),
    ]


def test_runs_command_prints_the_history_table(
    tiny_bert: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_inputs(tmp_path / "inputs.jsonl", [(f"s{i}", t) for i, t in enumerate(SENTENCES[:5])])
    job_path = write_job(tmp_path, tiny_bert)
    first = run_job(load_job(job_path), inline=True, echo=lambda *_: None)
    write_inputs(tmp_path / "inputs.jsonl", [(f"s{i}", SENTENCES[i]) for i in range(1, 9)])
    second = run_job(load_job(job_path), inline=True, echo=lambda *_: None)

    assert main(["runs", str(tmp_path / "store.zarr")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run_id", "status", "started", "ended", "added", "updated",
                                "meta", "skipped", "missing", "errors"]
    cells = [line.split() for line in lines[1:]]
    assert [c[0] for c in cells] == [first.run_id, second.run_id]
    assert [c[1] for c in cells] == ["succeeded", "succeeded"]
    # s0 missing from the second input; s1..s4 unchanged; s5..s8 new.
    assert [c[4:9] for c in cells] == [["5", "0", "0", "0", "0"], ["4", "0", "0", "4", "1"]]

    assert main(["runs", str(tmp_path / "store.zarr"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["run_id"] for r in rows] == [first.run_id, second.run_id]


def test_a_run_without_an_end_shows_running_while_its_lease_lives_and_crashed_after(
    tiny_bert: str, tmp_path: Path
) -> None:
    write_inputs(tmp_path / "inputs.jsonl", [(f"s{i}", t) for i, t in enumerate(SENTENCES[:4])])
    run_job(load_job(write_job(tmp_path, tiny_bert)), inline=True, echo=lambda *_: None)
    url = str(tmp_path / "store.zarr")
    record = {"run_id": "20250101T000000-abcdef", "started": "2025-01-01T00:00:00+00:00",
              "status": "running"}
    assert shown_status(record, live="20250101T000000-abcdef") == "running"
    assert shown_status(record, live=None) == "crashed"
    assert shown_status({**record, "status": "failed", "ended": "x"}, live=None) == "failed"

    from actcache.cache.runrecord import record as _record
    from actcache.schemas.store import RunRecord
    from actcache.workers.storage import open_group

    _record(open_group(url, "r+"), RunRecord.model_validate(record))
    with Lease(url, record["run_id"]):
        assert history(url)[-1]["status"] == "running"
    assert history(url)[-1]["status"] == "crashed"
    assert "crashed" in table(history(url)).splitlines()[-1]


def test_runs_on_a_folder_that_is_no_store_is_a_user_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["runs", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: no actcache store at {str(tmp_path / 'nothing')!r}"
    )


# -- real processes: a killed driver, a concurrent run --------------------------------------

SLOW_ROWS = [(f"r{i:03d}", f"row {i}: " + "words about cities and rivers " * (3 + i % 5))
             for i in range(80)]


def kill_tree(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the driver, its process group and every process it started, by pid."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        family = []
    os.killpg(proc.pid, signal.SIGKILL)
    for child in family:
        try:
            child.kill()
        except psutil.Error:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(family, timeout=10)


def end_processes_of(folder: str) -> None:
    """End (by pid) the processes whose command line names ``folder``: those we started."""
    procs = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if folder in " ".join(proc.info["cmdline"] or []):
                procs.append(proc)
        except psutil.Error:
            continue
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


@pytest.fixture
def ray_tmp() -> Iterator[str]:
    """A private Ray temp dir for the driver subprocess; its leftovers are ended by pid."""
    folder = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths
    yield folder
    end_processes_of(folder)


def start_cache(job_path: Path, ray_tmp: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, RAY_AUTH_MODE="disabled")
    return subprocess.Popen(
        [sys.executable, "-m", "actcache.cli", "cache", str(job_path)],
        env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )


def complete_units(store: Path) -> int:
    units = store / "units"
    return sum(1 for p in units.iterdir() if p.is_dir()) if units.exists() else 0


def wait_for_units(proc: subprocess.Popen[str], store: Path, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (n := complete_units(store)) > 0:
            return n
        if proc.poll() is not None:
            pytest.fail(f"the run ended before any unit committed:\n{proc.stdout.read()}")  # type: ignore[union-attr]
        time.sleep(0.05)
    kill_tree(proc)
    pytest.fail("no unit committed in time")


def slow_run_under_way(folder: Path, model: str, ray_tmp: str
                      ) -> tuple[Path, Path, subprocess.Popen[str]]:
    """A ``actcache cache`` process on ``SLOW_ROWS`` (units of 4), once a unit committed:
    its job, its store and the process."""
    write_inputs(folder / "inputs.jsonl", SLOW_ROWS)
    job_path = write_job(folder, model, rows_per_unit=4, batch_size=2, layers="all")
    store = folder / "store.zarr"
    proc = start_cache(job_path, ray_tmp)
    wait_for_units(proc, store)
    return job_path, store, proc


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_run_is_finished_by_the_next_one(
    tiny_bert: str, tmp_path: Path, ray_tmp: str
) -> None:
    job_path, store, proc = slow_run_under_way(tmp_path, tiny_bert, ray_tmp)
    kill_tree(proc)  # the actors too, so that nothing commits after the count
    end_processes_of(ray_tmp)
    done_at_kill = complete_units(store)
    assert 0 < done_at_kill < len(SLOW_ROWS) // 4, "the run was not killed mid-way"
    crashed = history(str(store))
    assert [r["status"] for r in crashed] == ["crashed"]
    assert crashed[0]["ended"] == "-"

    summary = run_job(load_job(job_path, batch_size=32), inline=True, echo=lambda *_: None)

    result = open_store(str(store))
    assert result.complete
    assert list(result.ids) == [i for i, _ in SLOW_ROWS]  # every row exactly once, in order
    assert summary.plan.skipped == 4 * done_at_kill  # 4 rows per unit
    assert summary.plan.added + summary.plan.skipped == len(SLOW_ROWS)
    runs = history(str(store))
    assert [r["status"] for r in runs] == ["crashed", "succeeded"]
    assert runs[1]["run_id"] == summary.run_id
    assert (runs[1]["added"], runs[1]["skipped"]) == (summary.plan.added, summary.plan.skipped)

    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    write_inputs(reference_dir / "inputs.jsonl", SLOW_ROWS)
    run_job(load_job(write_job(reference_dir, tiny_bert, rows_per_unit=4, batch_size=32,
                               layers="all")), inline=True, echo=lambda *_: None)
    reference = open_store(str(reference_dir / "store.zarr"))
    for layer in result.layers:
        np.testing.assert_allclose(result.read(layer), reference.read(layer), rtol=1e-3, atol=1e-3)


@pytest.mark.ray
@pytest.mark.slow
def test_a_second_run_on_a_busy_store_is_refused_naming_the_holder(
    tiny_bert: str, tmp_path: Path, ray_tmp: str, capsys: pytest.CaptureFixture[str]
) -> None:
    job_path, store, proc = slow_run_under_way(tmp_path, tiny_bert, ray_tmp)
    holder = Lease(str(store), "probe").current()
    assert holder is not None

    code = main(["cache", str(job_path)])

    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == (
        f"error: store {store} is being written by run {holder['run_id']} on "
        f"{socket.gethostname()} (pid {proc.pid}, heartbeat "
        f"{err.split('heartbeat ')[1].split('s ago')[0]}s ago); "
        "wait for it to finish, or stop it and run again"
    )
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    result = open_store(str(store))
    assert result.complete
    assert list(result.ids) == [i for i, _ in SLOW_ROWS]
    runs = history(str(store))
    assert [(r["run_id"], r["status"], r["added"]) for r in runs] == [
        (holder["run_id"], "succeeded", len(SLOW_ROWS))
    ]


def test_a_run_meeting_a_lease_on_a_store_being_created_is_refused_by_the_lease(
    tiny_bert: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_inputs(tmp_path / "inputs.jsonl", [(f"s{i}", t) for i, t in enumerate(SENTENCES[:4])])
    job_path = write_job(tmp_path, tiny_bert)
    store = tmp_path / "store.zarr"
    store.mkdir()
    with Lease(str(store), "20250101T000000-other1"):  # a live run that is creating the store
        assert main(["cache", str(job_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: store {store} is being written by run 20250101T000000-other1 on "
                          f"{socket.gethostname()} (pid {os.getpid()}, heartbeat 0s ago)")
    assert not (store / "zarr.json").exists()  # refused before creating anything
