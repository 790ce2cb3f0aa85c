"""Out-of-core logistic probes: on a store ten times the budget, the passes over the store
are counted and bounded, and the result lands within the stated tolerance of the in-memory
run on the same store (``assert_close_to_in_memory``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from actcache.probes import train_probes
from actcache.probes.testing import assert_close_to_in_memory
from actcache.schemas.probe import ProbeConfig
from actcache.testing import synthetic_store

#: The issue's goal: about ten full passes for everything (moments and sample, every Newton
#: step of every layer, scoring). Measured on this store: 5.5 (logistic) and 6.5 (with
#: ridge, whose Gram matrices take a pass of their own).
MAX_PASSES = 10
BUDGET = 2**20


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    rng = np.random.default_rng(1)
    n, hidden = 44_000, 64
    y = rng.integers(0, 2, n)
    x = {}
    for layer in (0, 1):
        mix = rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)
        base = rng.standard_normal((n, hidden)) @ mix + rng.normal(0, 2, hidden)
        x[layer] = (base + 0.1 * (layer + 1) * np.outer(y - 0.5, rng.standard_normal(hidden))
                    ).astype(np.float32)
    meta = [{"label": int(v), "split": "test" if i % 5 == 0 else "train"}
            for i, v in enumerate(y)]
    url = tmp_path_factory.mktemp("passes") / "s.zarr"
    return synthetic_store(str(url), x, metadata=meta, rows_per_unit=1024, dtype="float16")


def _stored_bytes(url: str) -> int:
    return sum(p.stat().st_size for p in Path(url).rglob("*") if p.is_file())


@pytest.mark.parametrize("probes", [("logistic",), ("logistic", "ridge", "mean-diff")])
def test_store_ten_times_the_budget_takes_few_passes_and_matches_in_memory(store, probes):
    assert _stored_bytes(store.url) >= 10 * BUDGET
    cfg = ProbeConfig(label="label", split_column="split", precision="fp32", probes=probes,
                      strengths=[0.01, 1.0, 100.0])
    whole = train_probes(store, cfg)
    streamed = train_probes(store, cfg.model_copy(update={"max_memory": BUDGET}))
    assert whole.passes == 1
    assert 2 < streamed.passes <= MAX_PASSES, streamed.iterations
    assert streamed.iterations["newton"] >= 1
    assert_close_to_in_memory(whole, streamed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_out_of_core_on_the_gpu_matches_in_memory(store):
    """The same run with the probe on the GPU: the sample, the Newton directions and every
    pass's arithmetic on the device, the reading on the CPU."""
    cfg = ProbeConfig(label="label", split_column="split", precision="fp32",
                      strengths=[0.01, 1.0, 100.0])
    whole = train_probes(store, cfg)
    streamed = train_probes(store, cfg.model_copy(update={"max_memory": BUDGET}))
    assert streamed.device == "cuda" and whole.device == "cuda"
    assert 2 < streamed.passes <= MAX_PASSES, streamed.iterations
    assert_close_to_in_memory(whole, streamed)
