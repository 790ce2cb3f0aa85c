"""Two writers: racing runs on one store (local and S3), a SIGKILLed holder, the lease folder."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from actcache.cache.lease import Lease
from actcache.schemas.errors import LeaseHeldError
from actcache.workers.storage import filesystem

WRITES = 4


def racer(url: str, run_id: str, start_at: float) -> dict[str, Any]:
    """One run: take the lease at ``start_at``, then write WRITES keys slowly, then release."""
    lease = Lease(url, run_id)
    fs, root = filesystem(url)
    time.sleep(max(0.0, start_at - time.time()))
    try:
        lease.acquire()
    except LeaseHeldError:
        return {"run_id": run_id, "won": False}
    got = time.time()
    try:
        fs.makedirs(f"{root}/data", exist_ok=True)
        for i in range(WRITES):
            fs.pipe_file(f"{root}/data/{i}", run_id.encode())
            time.sleep(0.08)
    finally:
        ended = time.time()
        lease.release()
    return {"run_id": run_id, "won": True, "held": (got, ended)}


def stale_lease(url: str) -> None:
    """A lease left by a run on another node that died long ago."""
    fs, root = filesystem(url)
    fs.makedirs(f"{root}/lease", exist_ok=True)
    attrs = {"actcache_lease": {"host": "node-gone", "pid": 1, "run_id": "dead",
                                "heartbeat": time.time() - 3600}}
    fs.pipe_file(f"{root}/lease/zarr.json",
                 json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs}).encode())


def race(url_for_round: Any, rounds: int, budget_s: float) -> dict[str, int]:
    counts = {"rounds": 0, "one_writer": 0, "none": 0, "one_after_the_other": 0,
              "interleaved": 0, "overlapping": 0}
    started = time.time()
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(time.sleep, [0, 0]))  # both workers up before the first round
        for n in range(rounds):
            if time.time() - started > budget_s:
                break
            url = url_for_round(n)
            if n % 2:
                stale_lease(url)  # odd rounds: both racers find a stale lease to take over
            start_at = time.time() + 0.2
            futures = [pool.submit(racer, url, f"run-{n}-{k}", start_at) for k in (0, 1)]
            results = [f.result(timeout=60) for f in futures]
            winners = [r for r in results if r["won"]]
            counts["rounds"] += 1
            counts["one_writer"] += len(winners) == 1
            counts["none"] += not winners
            if len(winners) == 2:
                # A racer delayed past the other's whole run (a loaded machine) takes the
                # lease after it: one writer at a time still, unless the two overlap.
                (a0, a1), (b0, b1) = (w["held"] for w in winners)
                overlap = a0 < b1 and b0 < a1
                counts["overlapping"] += overlap
                counts["one_after_the_other"] += not overlap
            fs, root = filesystem(url)
            written = {fs.cat_file(f"{root}/data/{i}") for i in range(WRITES)}
            counts["interleaved"] += len(written) != 1
            assert not fs.exists(f"{root}/lease/zarr.json")  # released by the winner
    return counts


@pytest.mark.slow
def test_racing_runs_on_a_local_store_never_both_write(tmp_path: Path) -> None:
    counts = race(lambda n: str(tmp_path / f"store-{n}.zarr"), rounds=20, budget_s=40)
    print(f"local race: {counts}")
    assert counts["rounds"] >= 10
    assert counts["interleaved"] == 0 and counts["overlapping"] == 0
    assert counts["none"] == 0 and counts["one_writer"] >= counts["rounds"] - 2, counts


@pytest.mark.slow
@pytest.mark.s3
def test_racing_runs_on_an_s3_store_never_both_write(s3_bucket: str) -> None:
    counts = race(lambda n: f"s3://{s3_bucket}/store-{n}.zarr", rounds=12, budget_s=40)
    print(f"S3 race: {counts}")
    assert counts["rounds"] >= 6
    assert counts["interleaved"] == 0 and counts["overlapping"] == 0
    assert counts["none"] == 0 and counts["one_writer"] >= counts["rounds"] - 2, counts


HOLDER = """
import socket, sys, time
{patch}
from actcache.cache.lease import Lease
lease = Lease(sys.argv[1], "holder")
lease.acquire()
print("held", flush=True)
time.sleep(600)
"""


def start_holder(url: str, other_node: bool, **env: str) -> subprocess.Popen[str]:
    # On "another node" the pid cannot be checked: only the heartbeat's age tells.
    patch = "socket.gethostname = lambda: 'node-b'" if other_node else ""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(patch=patch), url],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, **env})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.slow
def test_a_sigkilled_holder_on_another_node_is_taken_over_after_the_timeout_never_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale_s = 3.0
    monkeypatch.setenv("ACTCACHE_LEASE_STALE_S", str(stale_s))
    url = str(tmp_path / "store.zarr")
    proc = start_holder(url, other_node=True, ACTCACHE_LEASE_HEARTBEAT_S="0.3")
    time.sleep(1.0)  # a few heartbeats
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    holder = Lease(url, "probe").current()
    assert holder is not None and holder["host"] == "node-b"
    last_beat = float(holder["heartbeat"])
    refused_at: list[float] = []
    messages: set[str] = set()
    nxt = Lease(url, "next")
    deadline = time.time() + stale_s + 10
    while time.time() < deadline:
        try:
            nxt.acquire()
            break
        except LeaseHeldError as e:
            messages.add(str(e).split(" (pid")[0])
            refused_at.append(time.time())
            time.sleep(0.1)
    taken_at = time.time()
    nxt.release()
    assert messages == {f"store {url} is being written by run holder on node-b"}
    assert refused_at, "the fresh lease of a killed holder must first be refused"
    assert max(refused_at) - last_beat <= stale_s + 0.1
    assert stale_s <= taken_at - last_beat < stale_s + 2


def test_a_sigkilled_holder_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    url = str(tmp_path / "store.zarr")
    proc = start_holder(url, other_node=False)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    started = time.time()
    with Lease(url, "next"):
        assert Lease(url, "probe").current()["run_id"] == "next"  # type: ignore[index]
    assert time.time() - started < 2


def test_a_released_lease_leaves_no_folder_so_zarr_reads_the_store_without_warnings(
    tmp_path: Path,
) -> None:
    import zarr

    url = str(tmp_path / "store.zarr")
    zarr.open_group(url, mode="w").create_array("x", shape=(2,), dtype="int8")
    with Lease(url, "a"):
        assert (tmp_path / "store.zarr" / "lease" / "zarr.json").exists()
    assert sorted(p.name for p in (tmp_path / "store.zarr").iterdir()) == ["x", "zarr.json"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [k for k, _ in zarr.open_group(url, mode="r").members()] == ["x"]


def test_a_holder_whose_lease_was_taken_over_knows_it(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACTCACHE_LEASE_HEARTBEAT_S", "0.1")
    url = str(tmp_path / "store.zarr")
    first = Lease(url, "first")
    first.acquire()
    first._stop.set()  # a holder that stalls (paused VM, stuck I/O): its lease goes stale
    first._thread.join()  # type: ignore[union-attr]
    monkeypatch.setenv("ACTCACHE_LEASE_STALE_S", "0.2")
    time.sleep(0.3)
    second = Lease(url, "second")
    second.acquire()
    assert not first._beat()  # its next heartbeat finds another run's lease
    first.release()  # and leaves that lease alone
    assert Lease(url, "probe").current()["run_id"] == "second"  # type: ignore[index]
    second.release()
