"""The caching worker in-process: the threaded writer (GPU path) and the inline one agree."""

from __future__ import annotations

import json

import numpy as np
import pytest

from actcache import open_store
from actcache.cache.driver import parse_job
from actcache.cache.wiring import in_process_worker
from actcache.schemas.errors import OverflowStorageError
from tests.conftest import SENTENCES


def prepared(tmp_path, model, name, **extra):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"text": t}) + "\n" for t in SENTENCES))
    job = parse_job({"model": model, "inputs": str(inputs), "store": str(tmp_path / name),
                     "pooling": ["mean", "tokens"], "batch_size": 3, "rows_per_unit": 10, **extra})
    wired = in_process_worker(job, run_id="r")
    return wired.worker, wired.plan


@pytest.mark.parametrize("threaded", [False, True], ids=["inline", "threaded"])
def test_writer_paths_store_the_same_rows(tmp_path, tiny_bert, threaded):
    reference, plan = prepared(tmp_path, tiny_bert, "ref.zarr")
    worker, _ = prepared(tmp_path, tiny_bert, "s.zarr")
    worker.threaded_writer = threaded
    for task in plan.tasks:
        reference.process(task)
        worker.process(task)
    got, want = open_store(str(tmp_path / "s.zarr")), open_store(str(tmp_path / "ref.zarr"))
    for layer in got.layers:
        for pooling in ("mean", "tokens"):
            np.testing.assert_array_equal(got.read(layer, pooling), want.read(layer, pooling))


def test_threaded_writer_errors_reach_the_caller(tmp_path, tiny_bert, monkeypatch):
    worker, plan = prepared(tmp_path, tiny_bert, "s.zarr")
    worker.threaded_writer = True
    monkeypatch.setattr("actcache.workers.writer.FLOAT16_MAX", 1e-3)  # everything overflows
    with pytest.raises(OverflowStorageError, match="beyond float16"):
        worker.process(plan.tasks[0])
    assert open_store(str(tmp_path / "s.zarr")).n_rows == 0
