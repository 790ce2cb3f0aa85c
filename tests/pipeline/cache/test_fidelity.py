"""Stored activations equal a plain-transformers ``output_hidden_states`` computation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from actcache import open_store
from actcache.cache.driver import parse_job, run_job
from tests.conftest import MINILM, SENTENCES
from tests.reference import pooled, reference_states

POOLINGS = ["mean", "first", "last", "max", "tokens"]
TOLERANCE = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 1e-5}


def cache(tmp_path: Path, model: str, texts: list[str], **job: object) -> object:
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts)))
    store = tmp_path / "store.zarr"
    config = {"model": model, "inputs": str(inputs), "store": str(store), **job}
    run_job(parse_job(config), inline=True, echo=lambda *_: None)
    return open_store(str(store))


def assert_matches(store, model: str, texts: list[str], layers: list[int], dtype: str) -> None:
    states = reference_states(model, texts, layers)
    tol = TOLERANCE[dtype]
    for pooling in store.poolings:
        for layer in layers:
            got = store.read(layer, pooling)
            want = pooled(states, layer, pooling)
            scale = np.abs(want).max()
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale,
                                       err_msg=f"{pooling} layer {layer}")


@pytest.mark.parametrize(
    ("fixture", "layers"),
    [
        pytest.param("tiny_bert", "all", id="bert-encoder"),
        pytest.param("tiny_gpt2_right", "all", id="gpt2-right-padding"),
        pytest.param("tiny_gpt2_left", "all", id="gpt2-left-padding"),
        pytest.param("tiny_gpt2_left", [0, 2], id="gpt2-early-stop"),
        pytest.param("tiny_bert", [1], id="bert-early-stop-single"),
    ],
)
def test_every_layer_and_pooling_matches_transformers(request, tmp_path, fixture, layers):
    model = request.getfixturevalue(fixture)
    store = cache(tmp_path, model, SENTENCES, layers=layers, pooling=POOLINGS,
                  batch_size=4, rows_per_unit=8)
    resolved = list(range(4)) if layers == "all" else layers
    assert store.manifest["model"]["padding_side"] == ("left" if "left" in fixture else "right")
    assert store.layers == tuple(resolved)
    assert store.ids == tuple(str(i) for i in range(len(SENTENCES)))
    assert_matches(store, model, SENTENCES, resolved, "float16")


def test_tokens_rows_are_the_unpadded_token_states(tmp_path, tiny_gpt2_left):
    store = cache(tmp_path, tiny_gpt2_left, SENTENCES, layers=[1], pooling=["tokens"],
                  batch_size=5, rows_per_unit=6)
    states = reference_states(tiny_gpt2_left, SENTENCES, [1])
    lengths = store.token_lengths()
    assert list(lengths) == [len(s[1]) for s in states]
    for row in (3, 0, 17):  # one row at a time, in any order
        np.testing.assert_allclose(store.read(1, "tokens", rows=[row]), states[row][1],
                                   rtol=2e-3, atol=2e-3)
    both = store.read(1, "tokens", rows=[5, 2])
    assert both.shape[0] == lengths[5] + lengths[2]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_storage_dtypes(tmp_path, tiny_bert, dtype):
    store = cache(tmp_path, tiny_bert, SENTENCES[:9], layers=[0, 3], pooling=["mean"],
                  dtype=dtype, rows_per_unit=4)
    assert_matches(store, tiny_bert, SENTENCES[:9], [0, 3], dtype)


def test_bfloat16_round_trips_exactly(tmp_path, tiny_bert):
    import torch
    import zarr

    store = cache(tmp_path, tiny_bert, SENTENCES[:6], layers=[2], pooling=["mean"],
                  dtype="bfloat16")
    want = torch.from_numpy(pooled(reference_states(tiny_bert, SENTENCES[:6], [2]), 2, "mean"))
    got = store.read(2)
    # Every stored value is a bfloat16 value, widened to float32 without change.
    assert np.array_equal(torch.from_numpy(got).bfloat16().float().numpy(), got)
    np.testing.assert_allclose(got, want.bfloat16().float().numpy(), rtol=8e-3, atol=1e-3)
    raw = zarr.open_array(str(tmp_path / "store.zarr" / "mean" / "layer_2"), mode="r")
    assert raw.dtype == np.uint16
    assert raw.attrs["actcache.dtype"] == "bfloat16"
    assert store.manifest["dtype"] == "bfloat16"


@pytest.mark.slow
def test_shipped_minilm_matches_transformers(tmp_path):
    texts = SENTENCES[:12]
    store = cache(tmp_path, MINILM, texts, layers="all", pooling=["mean", "last", "tokens"],
                  batch_size=4, rows_per_unit=5)
    assert store.hidden_size == 384
    assert store.layers == tuple(range(7))
    assert_matches(store, MINILM, texts, list(range(7)), "float16")


def test_truncation_is_counted_in_the_manifest(tmp_path, tiny_bert):
    texts = ["short one", "a much longer sentence that will certainly be cut at eight tokens"]
    store = cache(tmp_path, tiny_bert, texts, layers=[1], pooling=["tokens"], max_length=8)
    assert store.manifest["truncated"] == 1
    assert list(store.token_lengths()) == [4, 8]
    assert list(store.truncated()) == [False, True]
