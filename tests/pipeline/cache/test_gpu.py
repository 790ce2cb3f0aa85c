"""On CUDA devices the same code caches the same values (skipped without one).

The model is placed by the device map over the actor's GPUs: with one GPU the same code
path with k = 1, with two or more the model split across two of them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from actcache import open_store
from actcache.cache.driver import parse_job, run_job
from tests.conftest import SENTENCES
from tests.reference import pooled, reference_states

pytestmark = pytest.mark.gpu


def cache(tmp_path, model, **extra):
    tmp_path.mkdir(exist_ok=True)
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"text": t}) + "\n" for t in SENTENCES))
    store = str(tmp_path / "s.zarr")
    job = parse_job({"model": model, "inputs": str(inputs), "store": store,
                     "pooling": ["mean", "tokens"], "batch_size": 4, **extra})
    run_job(job, inline=True, echo=lambda *_: None)
    return open_store(store)


def assert_matches_reference(store, model, layers, tol):
    states = reference_states(model, SENTENCES, list(layers))
    for layer in layers:
        for pooling in ("mean", "tokens"):
            want = pooled(states, layer, pooling)
            np.testing.assert_allclose(store.read(layer, pooling), want, rtol=tol,
                                       atol=tol * np.abs(want).max())


@pytest.mark.parametrize("model_dtype", ["float32", "bfloat16"])
def test_gpu_cache_matches_cpu_reference(tmp_path, tiny_bert, model_dtype):
    store = cache(tmp_path, tiny_bert, model_dtype=model_dtype)
    assert store.manifest["model_dtype"] == model_dtype
    assert_matches_reference(store, tiny_bert, range(4), 2e-3 if model_dtype == "float32" else 5e-2)


def test_a_model_split_across_the_actors_gpus_matches_cpu_reference(tmp_path, tiny_gpt2_right,
                                                                     monkeypatch):
    import torch

    from actcache.schemas.job import JobConfig
    from actcache.workers import placement
    from actcache.workers.model import input_device, load_model

    job = JobConfig(model=tiny_gpt2_right, inputs="in.jsonl", store="s.zarr", model_dtype="float32")

    k = min(2, torch.cuda.device_count())
    gpus = placement.actor_gpus(k)
    assert gpus == list(range(k))
    if k == 2:
        # A tiny model fits one GPU: cap each GPU at about half of it so it must span both.
        whole = load_model(tiny_gpt2_right, job)
        half = sum(p.numel() * p.element_size() for p in whole.parameters()) * 6 // 10
        monkeypatch.setattr(placement, "max_memory", lambda g, offload: dict.fromkeys(g, half))
    model = load_model(tiny_gpt2_right, job, None, gpus)
    assert {p.device.index for p in model.parameters()} == set(gpus)
    assert input_device(model) == torch.device("cuda", 0)
    assert not placement.offloaded(model)
    store = cache(tmp_path, tiny_gpt2_right, model_dtype="float32", gpus_per_worker=k,
                  layers=[0, 1, 3])
    assert_matches_reference(store, tiny_gpt2_right, [0, 1, 3], 2e-3)


def test_offload_only_when_asked_and_then_said(tmp_path, tiny_gpt2_right, monkeypatch, capsys):
    from actcache.schemas.errors import ModelTooLargeError
    from actcache.workers import placement

    # One GPU with room for almost nothing: the model fits only with the CPU's help.
    monkeypatch.setattr(placement, "max_memory", lambda g, offload: {
        **dict.fromkeys(g, 64 << 10), **({"cpu": 1 << 30} if offload else {})})
    with pytest.raises(ModelTooLargeError, match="does not fit the actor's 1 GPU"):
        cache(tmp_path / "refused", tiny_gpt2_right, model_dtype="float32")
    store = cache(tmp_path / "asked", tiny_gpt2_right, model_dtype="float32", offload=True)
    assert "modules offloaded to CPU/disk (slow)" in capsys.readouterr().err
    assert_matches_reference(store, tiny_gpt2_right, range(4), 2e-3)
