"""Every family, exactly: stored values equal ``model(**tokenizer(text))`` run on each text alone.

One tiny model per architecture family, built from its config, saved with a tokenizer and
loaded by path. The worker runs in this process (Ray adds nothing to what is checked
here) against a memory store. Each case compares every stored layer under ``mean`` and
``last`` pooling with the plain-transformers reference in float32.
"""

from __future__ import annotations

import functools
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from actcache import open_store
from actcache.driver import parse_job, run_job
from tests.conftest import SENTENCES
from tests.families import DECODERS, ENCODER_DECODERS, ENCODERS, build

TEXTS = [SENTENCES[i] for i in (2, 0, 3, 6, 7, 11, 4)]
REL_TOL = 1e-4
EARLY = [0, 1]  # below the last of 2 blocks: the forward is cut after block 1


@pytest.fixture(scope="session")
def family_model(tmp_path_factory):
    """``(family, padding_side) -> model folder``, each built once per session."""
    built: dict[tuple[str, str], str] = {}

    def get(family: str, padding_side: str = "right") -> str:
        key = (family, padding_side)
        if key not in built:
            built[key] = build(family, tmp_path_factory.mktemp(f"{family}-{padding_side}"),
                               padding_side)
        return built[key]

    return get


@pytest.fixture(scope="session")
def inputs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("family-inputs") / "in.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


def cache(model: str, inputs: Path, **job: object):  # type: ignore[no-untyped-def]
    store = f"memory://families/{uuid.uuid4().hex}"
    config = {"model": model, "inputs": str(inputs), "store": store, "pooling": ["mean", "last"],
              "dtype": "float32", "batch_size": 4, "rows_per_unit": 8, **job}
    run_job(parse_job(config), inline=True, echo=lambda *_: None)
    return open_store(store)


@functools.cache
def reference(model: str, texts: tuple[str, ...], side: str | None = None
              ) -> list[tuple[torch.Tensor, ...]]:
    """Per text: the hidden states of ``model(**tokenizer(text))``, one text alone."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    net = AutoModel.from_pretrained(model, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for text in texts:
            enc = tok(text, return_tensors="pt")
            if side is None:
                out.append(net(**enc, output_hidden_states=True).hidden_states)
                continue
            start = torch.tensor([[net.config.decoder_start_token_id]])
            res = net(**enc, decoder_input_ids=start, output_hidden_states=True)
            out.append(res.encoder_hidden_states)
    return out


def assert_exact(store, want: list[tuple[torch.Tensor, ...]], layers: list[int]) -> None:  # type: ignore[no-untyped-def]
    assert store.layers == tuple(layers)
    for layer in layers:
        for pooling in ("mean", "last"):
            states = [w[layer][0] for w in want]
            expect = torch.stack([s.mean(0) if pooling == "mean" else s[-1] for s in states])
            got = store.read(layer, pooling)
            err = np.abs(got - expect.numpy()).max() / np.abs(expect.numpy()).max()
            assert err <= REL_TOL, f"layer {layer} {pooling}: relative error {err:.3g}"


CASES = (
    [pytest.param(f, side, "all", id=f"{f}-{side}") for f in DECODERS for side in ("left", "right")]
    + [pytest.param(f, "left", EARLY, id=f"{f}-left-early") for f in DECODERS]
    + [pytest.param(f, "right", layers, id=f"{f}-{'early' if layers != 'all' else 'all'}")
       for f in ENCODERS for layers in ("all", EARLY)]
)


@pytest.mark.parametrize(("family", "padding_side", "layers"), CASES)
def test_family_matches_each_text_alone(family_model, inputs_file, family, padding_side, layers):
    model = family_model(family, padding_side)
    store = cache(model, inputs_file, layers=layers)
    expected = list(range(3)) if layers == "all" else layers
    assert_exact(store, reference(model, tuple(TEXTS)), expected)
    check = store.manifest["self_check"]
    assert check["examples"] >= 3 and check["max_rel_error"] <= REL_TOL


@pytest.mark.parametrize("family", list(ENCODER_DECODERS))
@pytest.mark.parametrize("layers", ["all", EARLY], ids=["all", "early"])
def test_encoder_decoder_caches_the_encoder(family_model, inputs_file, family, layers):
    model = family_model(family)
    store = cache(model, inputs_file, layers=layers)
    assert store.manifest["side"] == "encoder"
    expected = list(range(3)) if layers == "all" else layers
    assert_exact(store, reference(model, tuple(TEXTS), side="encoder"), expected)
