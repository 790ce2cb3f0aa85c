"""Actors spanning several GPUs, on Ray's fake GPU resources; jobs that cannot be placed.

Every refusal here happens before any actor starts: one error line, exit 2, and the
existing store byte-identical.
"""

from __future__ import annotations

import pytest

from actcache.cache.driver import run_job
from actcache.schemas.errors import ConfigError
from tests.pipeline.cache.test_bad_input import existing, run_cli, tree_digest  # noqa: F401

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_4_gpus():
    """A local Ray instance declaring 4 GPUs (none exist: actors run torch on the CPU)."""
    import ray

    ray.shutdown()
    ray.init(num_cpus=2, num_gpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def add_a_row(folder):
    """A job with nothing to compute starts no actor and checks no GPU: give it a row."""
    (folder / "in.jsonl").write_text((folder / "in.jsonl").read_text() + '{"text": "new"}\n')


def test_two_gpus_per_worker_on_four_gpus_starts_two_actors_each_holding_two(
    ray_4_gpus, existing  # noqa: F811
):
    from actcache.cache.driver import parse_job
    from actcache.cache.plan import empty_stored, make_plan
    from actcache.cache.pool import ActorPool, worker_options
    from actcache.cache.wiring import describe_job, worker_spec

    folder, raw = existing
    job = parse_job({**raw, "gpus_per_worker": 2})
    described = describe_job(job)
    plan = make_plan(described.inputs, empty_stored(), job.rows_per_unit, "r")
    spec = worker_spec(described.manifest, plan)
    count, options = worker_options(job.workers, None, job.gpus_per_worker,
                                    ray_4_gpus.cluster_resources())
    assert (count, options["num_gpus"]) == (2, 2)
    pool = ActorPool(job.store, spec, None, count, options)
    try:
        placed = ray_4_gpus.get([a.ping.remote() for a in pool.actors])
    finally:
        pool.shutdown()
    held = [sorted(p["gpus"]) for p in placed]
    assert [len(h) for h in held] == [2, 2]
    assert sorted(g for h in held for g in h) == ["0", "1", "2", "3"]  # none shared


@pytest.mark.slow
def test_a_run_with_two_gpus_per_worker_completes(ray_4_gpus, existing, capsys):  # noqa: F811
    folder, raw = existing
    (folder / "s.zarr").rename(folder / "old.zarr")
    code, err = run_cli(folder, {**raw, "gpus_per_worker": 2}, capsys)
    assert code == 0, err
    from actcache import open_store

    got, want = open_store(str(folder / "s.zarr")), open_store(str(folder / "old.zarr"))
    assert list(got.ids) == list(want.ids)
    assert (got.read(1, "mean") == want.read(1, "mean")).all()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gpus_per_worker": 2, "workers": 3},
         "`workers: 3` with 2 GPUs each asks for more than the cluster's 4 GPUs; "
         "set `workers` to at most 2"),
        ({"gpus_per_worker": 8},
         "`gpus_per_worker: 8` is more than the cluster's 4 GPUs; set it to at most 4"),
    ],
    ids=["too-many-workers", "too-many-gpus-per-worker"],
)
def test_more_gpus_than_the_cluster_has_is_one_line(ray_4_gpus, existing, capsys, change,  # noqa: F811
                                                     message):
    folder, raw = existing
    add_a_row(folder)
    before = tree_digest(folder / "s.zarr")
    code, err = run_cli(folder, {**raw, **change}, capsys)
    assert (code, err) == (2, [f"error: {message}"])
    assert tree_digest(folder / "s.zarr") == before


def test_a_model_too_large_for_the_gpus_is_refused_before_any_actor(
    ray_4_gpus, existing, capsys, monkeypatch  # noqa: F811
):
    from actcache.cache import pool
    from actcache.workers.placement import HEADROOM_MIN_BYTES

    # Each GPU leaves 1 KB for weights once the headroom is set aside: tiny-bert's ~4 MB
    # of float32 weights (blocks 0..1 and the embeddings) cannot fit two of them.
    monkeypatch.setattr(pool, "cluster_gpu_memory", lambda: HEADROOM_MIN_BYTES + 1024)
    monkeypatch.setattr(pool.ActorPool, "__init__", lambda *a, **k: pytest.fail("actor started"))
    folder, raw = existing
    before = tree_digest(folder / "s.zarr")
    add_a_row(folder)
    code, err = run_cli(folder, {**raw, "gpus_per_worker": 2}, capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: model {raw['model']!r} needs about 0.0 GiB for its "
                             "weights up to block 1, more than the 0.0 GiB that 2 GPU(s) of 1 GiB")
    assert err[0].endswith("set `quantize`, cache fewer layers, or set `offload: true` (slow)")
    assert tree_digest(folder / "s.zarr") == before


def test_three_gpus_cannot_hold_two_workers_of_two(existing, capsys):  # noqa: F811
    import ray

    ray.shutdown()
    ray.init(num_cpus=2, num_gpus=3, include_dashboard=False, log_to_driver=False)
    capsys.readouterr()  # this test's own Ray start says so; the command under test must not
    try:
        folder, raw = existing
        add_a_row(folder)
        before = tree_digest(folder / "s.zarr")
        code, err = run_cli(folder, {**raw, "gpus_per_worker": 2, "workers": 2}, capsys)
    finally:
        ray.shutdown()
    assert (code, err) == (2, ["error: `workers: 2` with 2 GPUs each asks for more than the "
                               "cluster's 3 GPUs; set `workers` to at most 1"])
    assert tree_digest(folder / "s.zarr") == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gpus_per_worker": 1}, "`gpus_per_worker: 1` but the cluster has no GPUs"),
        ({"quantize": "8bit"}, "`quantize: 8bit` needs CUDA GPUs (bitsandbytes) and there are none"),
    ],
    ids=["gpus-without-gpus", "quantize-without-cuda"],
)
def test_gpu_options_without_cuda_are_refused(existing, change, message):  # noqa: F811
    import torch

    from actcache.cache.driver import parse_job

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    folder, raw = existing
    before = tree_digest(folder / "s.zarr")
    add_a_row(folder)
    if "quantize" not in change:  # quantize shapes values: that store would refuse it first
        with pytest.raises(ConfigError) as caught:
            run_job(parse_job({**raw, **change}), inline=True, echo=lambda *_: None)
        assert str(caught.value).startswith(message)
        assert tree_digest(folder / "s.zarr") == before
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_job(parse_job({**raw, **change, "store": str(folder / "new.zarr")}), inline=True,
                echo=lambda *_: None)
    assert not [p for p in (folder / "new.zarr").rglob("*") if p.is_file()]  # nothing written


def test_a_model_an_actor_cannot_load_is_one_line(ray_4_gpus, tmp_path, tiny_bert, capsys):
    """Weights whose shapes disagree with the config pass every check before the actors;
    the actor's own error then reaches the user as itself, not as "the actor died"."""
    import json
    import shutil

    from transformers import BertConfig, BertModel

    model = tmp_path / "model"
    shutil.copytree(tiny_bert, model)
    config = BertConfig.from_pretrained(model)
    config.intermediate_size = 96
    BertModel(config).save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "model.safetensors", model / "model.safetensors")
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "a"}) + "\n")
    raw = {"model": str(model), "inputs": str(tmp_path / "in.jsonl"),
           "store": str(tmp_path / "s.zarr"), "layers": [1]}
    capsys.readouterr()  # saving printed a progress bar
    code, err = run_cli(tmp_path, raw, capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: cannot load model {str(model)!r}: "), err
