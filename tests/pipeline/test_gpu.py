"""On a CUDA device the same code caches the same values (skipped without one)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from actcache import open_store
from actcache.driver import parse_job, run_job
from tests.conftest import SENTENCES
from tests.reference import pooled, reference_states

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("model_dtype", ["float32", "bfloat16"])
def test_gpu_cache_matches_cpu_reference(tmp_path, tiny_bert, model_dtype):
    import torch

    from actcache.workers.actor import pick_device

    assert pick_device().type == "cuda"
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"text": t}) + "\n" for t in SENTENCES))
    job = parse_job({"model": tiny_bert, "inputs": str(inputs), "store": str(tmp_path / "s.zarr"),
                     "pooling": ["mean", "tokens"], "model_dtype": model_dtype})
    run_job(job, inline=True, echo=lambda *_: None)
    store = open_store(str(tmp_path / "s.zarr"))
    states = reference_states(tiny_bert, SENTENCES, list(range(4)))
    tol = 2e-3 if model_dtype == "float32" else 5e-2
    for layer in range(4):
        for pooling in ("mean", "tokens"):
            want = pooled(states, layer, pooling)
            np.testing.assert_allclose(store.read(layer, pooling), want, rtol=tol,
                                       atol=tol * np.abs(want).max())
    assert torch.cuda.is_available()
