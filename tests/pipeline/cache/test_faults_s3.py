"""A flaky S3: cache, probe and query through a fault-injecting proxy equal a fault-free run;
permanent refusals fail fast in one line."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from actcache import open_store
from actcache.cache.driver import parse_job, run_job
from actcache.cli import main
from actcache.probes import train_probes
from actcache.schemas.probe import ProbeConfig
from tests.conftest import SENTENCES
from tests.faultproxy import FAULTS, FaultProxy

pytestmark = [pytest.mark.s3]


@pytest.fixture
def flaky(s3_server: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    import s3fs

    with FaultProxy(s3_server, rate=0.05, seed=13, slow_s=2.0) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("ACTCACHE_S3_READ_TIMEOUT_S", "1.5")
        s3fs.S3FileSystem.clear_instance_cache()
        yield proxy
    s3fs.S3FileSystem.clear_instance_cache()


def job(tmp_path: Path, model: str, store: str):  # type: ignore[no-untyped-def]
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(
        json.dumps({"id": f"x{i}", "text": t, "label": i % 2}) + "\n"
        for i, t in enumerate(SENTENCES * 2)
    ))
    return parse_job({"model": model, "inputs": str(inputs), "id_column": "id", "store": store,
                      "layers": [0, 3], "pooling": ["mean", "tokens"], "rows_per_unit": 8})


@pytest.mark.slow
def test_cache_probe_and_query_through_a_flaky_s3_equal_a_fault_free_run(
    tmp_path: Path, tiny_bert: str, s3_bucket: str, flaky: FaultProxy
) -> None:
    local = str(tmp_path / "local.zarr")
    url = f"s3://{s3_bucket}/flaky.zarr"
    flaky.rate = 0.0
    run_job(job(tmp_path, tiny_bert, local), inline=True, echo=lambda *_: None)
    flaky.rate = 0.05

    run_job(job(tmp_path, tiny_bert, url), inline=True, echo=lambda *_: None)

    want, got = open_store(local), open_store(url)
    assert got.complete and got.ids == want.ids == tuple(f"x{i}" for i in range(46))
    assert got.metadata.equals(want.metadata)
    for pooling in ("mean", "tokens"):
        for layer in (0, 3):
            np.testing.assert_array_equal(got.read(layer, pooling), want.read(layer, pooling))
    config = ProbeConfig(label="label", pooling="mean", probes=("logistic", "ridge"))
    probe_want, probe_got = train_probes(want, config), train_probes(got, config)
    assert probe_got.metrics.equals(probe_want.metrics)
    direction = np.linspace(-1, 1, want.hidden_size).astype(np.float32)
    top_want, top_got = want.topk(3, direction, 5, "mean"), got.topk(3, direction, 5, "mean")
    assert list(top_got.ids) == list(top_want.ids)
    np.testing.assert_array_equal(top_got.scores, top_want.scores)
    near_want, near_got = want.nearest(3, want.read(3, "mean", [4])[0], 5, pooling="mean"), \
        got.nearest(3, want.read(3, "mean", [4])[0], 5, pooling="mean")
    assert list(near_got.ids) == list(near_want.ids)
    # Every kind of fault was met, and survived.
    assert all(flaky.counts[f] > 0 for f in FAULTS), flaky.counts
    print(f"faults injected: {dict(flaky.counts)}")


def test_permanent_refusals_fail_fast_in_one_line(
    s3_bucket: str, flaky: FaultProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    flaky.rate = 0.0
    flaky.deny = True
    url = f"s3://{s3_bucket}/s.zarr"
    started = time.perf_counter()
    assert main(["info", url]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: access to {url} was denied (403); check the AWS credentials "
        "(AWS_ACCESS_KEY_ID, AWS_PROFILE) and the bucket's policy"
    ]
    flaky.deny = False
    assert main(["info", "s3://no-such-bucket-here/s.zarr"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: bucket 'no-such-bucket-here' of s3://no-such-bucket-here/s.zarr does not "
        "exist; create it or fix the URL"
    ]
    assert time.perf_counter() - started < 10  # no retries with backoff on these
