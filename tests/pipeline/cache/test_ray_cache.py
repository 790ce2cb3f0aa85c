"""Caching through Ray actors: several actors equal one, crashes lose and duplicate nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from actcache import open_store
from actcache.cache.driver import parse_job, run_job
from actcache.workers.actor import CachingWorker
from tests.conftest import SENTENCES

# Each test starts Ray and its actors and caches a store: 40-50 s each on two cores.
pytestmark = [pytest.mark.ray, pytest.mark.slow]

TEXTS = [f"{s} (variant {i})" for i in range(4) for s in SENTENCES]  # 92 rows


def write_inputs(folder: Path) -> Path:
    path = folder / "in.jsonl"
    path.write_text("".join(
        json.dumps({"id": f"r{i:03d}", "text": t, "group": i % 3}) + "\n"
        for i, t in enumerate(TEXTS)
    ))
    return path


def job(folder: Path, model: str, store: str, **extra: object):
    return parse_job({
        "model": model, "inputs": str(write_inputs(folder)), "store": store, "id_column": "id",
        "layers": [0, 2, 3], "pooling": ["mean", "tokens"], "rows_per_unit": 10,
        "batch_size": 4, **extra,
    })


def assert_same_store(a, b) -> None:
    assert a.ids == b.ids
    assert a.metadata.equals(b.metadata)
    for pooling in a.poolings:
        for layer in a.layers:
            np.testing.assert_allclose(a.read(layer, pooling), b.read(layer, pooling),
                                       rtol=1e-3, atol=1e-4)


def test_two_actors_equal_one(ray_local, tmp_path, tiny_bert):
    quiet = {"echo": lambda *_: None}
    run_job(job(tmp_path, tiny_bert, str(tmp_path / "one.zarr"), workers=1), **quiet)
    run_job(job(tmp_path, tiny_bert, str(tmp_path / "two.zarr"), workers=2), **quiet)
    one, two = open_store(str(tmp_path / "one.zarr")), open_store(str(tmp_path / "two.zarr"))
    assert one.complete and two.complete
    assert one.ids == tuple(f"r{i:03d}" for i in range(len(TEXTS)))
    assert {r.host for r in two.receipts}  # receipts came back from the actors
    assert_same_store(one, two)


class CrashOnce(CachingWorker):
    """Dies (the whole actor process) half-way through writing unit 3, the first time only."""

    marker = ""

    def process(self, task, counter=None):  # type: ignore[no-untyped-def]
        unit = task["unit"]
        marker = Path(self.marker)
        if unit == 3 and not marker.exists():
            marker.write_text("crashed")
            arr = self.group["mean/layer_2"]
            arr[unit * 10 : unit * 10 + 5] = np.full((5, arr.shape[1]), 7.0)  # torn write
            os._exit(1)
        return super().process(task, counter)


def test_actor_killed_mid_unit_is_replaced_and_the_unit_redone(ray_local, tmp_path, tiny_bert):
    marker = tmp_path / "crashed"
    reference = tmp_path / "ref.zarr"
    run_job(job(tmp_path, tiny_bert, str(reference)), inline=True, echo=lambda *_: None)
    # A class made here is shipped to the actors by value, marker path included.
    crashing = type("CrashOnceHere", (CrashOnce,), {"marker": str(marker)})
    store = str(tmp_path / "crash.zarr")
    run_job(job(tmp_path, tiny_bert, store, workers=2), worker_cls=crashing,
            echo=lambda *_: None)
    assert marker.read_text() == "crashed"
    got = open_store(store)
    assert got.complete
    assert len(got.ids) == len(set(got.ids)) == len(TEXTS)
    assert_same_store(got, open_store(str(reference)))


def test_one_actor_per_gpu(tmp_path, tiny_bert):
    """With GPUs declared (fake here), each actor holds its own GPU."""
    import ray

    from actcache.cache.plan import empty_stored, make_plan
    from actcache.cache.pool import ActorPool, worker_options
    from actcache.cache.wiring import describe_job, worker_spec

    ray.shutdown()
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        config = job(tmp_path, tiny_bert, str(tmp_path / "gpu.zarr"))
        described = describe_job(config)
        plan = make_plan(described.inputs, empty_stored(), config.rows_per_unit, "r")
        spec = worker_spec(described.manifest, plan)
        run_job(config, inline=True, echo=lambda *_: None)  # creates the store
        count, options = worker_options(None, None, None, ray.cluster_resources())
        assert (count, options["num_gpus"]) == (2, 1)
        pool = ActorPool(str(tmp_path / "gpu.zarr"), spec, None, count, options)
        placed = ray.get([a.ping.remote() for a in pool.actors])
        pool.shutdown()
    finally:
        ray.shutdown()
    assert sorted(g for p in placed for g in p["gpus"]) == ["0", "1"]
    assert all(p["device"] == "cpu" for p in placed)  # no CUDA here: the same code runs on CPU


@pytest.mark.slow
def test_driver_killed_then_rerun_completes_with_every_row_once(tmp_path):
    """SIGKILL the whole `actcache cache` process group mid-run, then run it again."""
    from tests.conftest import MINILM
    from tests.reference import pooled, reference_states

    root = Path(__file__).resolve().parents[3]
    rows = [json.loads(line) for line in (root / "examples" / "cities.jsonl").open()][:1200]
    inputs = tmp_path / "cities.jsonl"
    inputs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = tmp_path / "s.zarr"
    (tmp_path / "job.yaml").write_text(
        f"model: {MINILM}\ninputs: {inputs}\nstore: {store}\nid_column: id\n"
        "layers: [1, 3]\npooling: [mean]\nrows_per_unit: 60\nbatch_size: 30\n"
    )
    cmd = [sys.executable, "-m", "actcache.cli", "cache", str(tmp_path / "job.yaml")]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300  # Ray, the actor and its self-check start first
    while time.time() < deadline and len(list((store / "units").glob("0*"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list((store / "units").glob("0*")))
    assert 3 <= done_before < 20, "the kill must land mid-run"
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    got = open_store(str(store))
    assert got.complete
    assert got.ids == tuple(r["id"] for r in rows)  # every row once, in input order
    sample = [0, 59, 60, 333, 700, 1199]
    want = reference_states(MINILM, [rows[i]["text"] for i in sample], [3])
    np.testing.assert_allclose(got.read(3, rows=sample), pooled(want, 3, "mean"),
                               rtol=2e-3, atol=2e-3)
    assert [r["status"] for r in got.runs][-1] == "succeeded"
