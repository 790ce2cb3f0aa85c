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
from actcache.cache.driver import parse_job, run_job
from tests.conftest import SENTENCES
from tests.families import DECODERS, ENCODER_DECODERS, ENCODERS, build

# Every family is cached in full and checked against its own forward pass: minutes in all.
pytestmark = pytest.mark.slow

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


#: Where each family keeps its blocks, written out here (not looked up the way actcache
#: does) so the reference shares nothing with the code under test.
LAST_BLOCKS = {"gpt2": "h", "llama": "layers", "opt": "decoder.layers", "bert": "encoder.layer",
               "t5": "encoder.block"}
BLOCK_TOL = 1e-5


def block_reference(model: str, texts: tuple[str, ...], blocks: str) -> list[dict[int, torch.Tensor]]:
    """Per text, run alone: {L: the last block's own output (a forward hook on it),
    L + 1: the model's last hidden state}, float32."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    net = AutoModel.from_pretrained(model, dtype=torch.float32).eval()
    encoder_decoder = net.config.is_encoder_decoder
    run = net.get_encoder() if encoder_decoder else net
    last = net.get_submodule(blocks)
    n = len(last)
    seen: list[torch.Tensor] = []
    hook = last[n - 1].register_forward_hook(
        lambda _m, _i, out: seen.append(out[0] if isinstance(out, tuple) else out))
    out = []
    with torch.inference_mode():
        for text in texts:
            hidden = run(**tok(text, return_tensors="pt"), output_hidden_states=True).hidden_states
            out.append({n: seen.pop()[0], n + 1: hidden[-1][0]})
    hook.remove()
    return out


def pooled_rows(states: list[dict[int, torch.Tensor]], key: int, pooling: str) -> np.ndarray:
    return torch.stack([s[key].mean(0) if pooling == "mean" else s[key][-1]
                        for s in states]).numpy()


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize(("family", "padding_side", "has_final_norm"), [
    ("gpt2", "left", True), ("llama", "right", True), ("opt", "left", True),
    ("t5", "right", True), ("bert", "right", False),
])
def test_last_layer_block_stores_the_last_blocks_own_output(family_model, inputs_file, family,
                                                            padding_side, has_final_norm):
    model = family_model(family, padding_side)
    default = cache(model, inputs_file)
    block = cache(model, inputs_file, last_layer="block")
    assert default.manifest["job"]["last_layer"] == "hidden_states"
    assert block.manifest["job"]["last_layer"] == "block"
    want = block_reference(model, tuple(TEXTS), LAST_BLOCKS[family])
    n = default.manifest["model"]["num_hidden_layers"]
    for pooling in ("mean", "last"):
        raw, normed = pooled_rows(want, n, pooling), pooled_rows(want, n + 1, pooling)
        assert rel_error(block.read(n, pooling), raw) <= BLOCK_TOL
        assert rel_error(default.read(n, pooling), normed) <= BLOCK_TOL
        # Decoders' (and T5's) last hidden state is the final norm's output, far from the
        # block's; an encoder without a final norm stores the same values either way.
        assert (rel_error(normed, raw) > 0.1) is has_final_norm
        for layer in range(n):
            np.testing.assert_array_equal(block.read(layer, pooling), default.read(layer, pooling))


def test_last_layer_block_on_the_decoder_side(family_model, inputs_file):
    from transformers import AutoModel

    model = family_model("t5")
    store = cache(model, inputs_file, side="decoder", last_layer="block")
    net = AutoModel.from_pretrained(model, dtype=torch.float32).eval()
    seen: list[torch.Tensor] = []
    net.decoder.block[-1].register_forward_hook(lambda _m, _i, out: seen.append(out[0]))
    start = torch.tensor([[net.config.decoder_start_token_id]])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    with torch.inference_mode():
        for text in TEXTS:
            net(**tok(text, return_tensors="pt"), decoder_input_ids=start)
    want = torch.stack([s[0, -1] for s in seen]).numpy()
    n = store.manifest["model"]["num_hidden_layers"]
    assert rel_error(store.read(n, "last"), want) <= BLOCK_TOL


def test_a_store_refuses_a_job_that_changes_last_layer(family_model, inputs_file):
    from actcache.schemas.errors import StoreMismatchError

    model = family_model("gpt2")
    store = cache(model, inputs_file, last_layer="block")
    job = {"model": model, "inputs": str(inputs_file), "store": store.url,
           "pooling": ["mean", "last"], "dtype": "float32", "batch_size": 4, "rows_per_unit": 8}
    with pytest.raises(StoreMismatchError, match="last_layer"):
        run_job(parse_job(job), inline=True, echo=lambda *_: None)


def test_last_layer_block_is_refused_where_the_blocks_cannot_be_found(family_model, inputs_file):
    from actcache.schemas.errors import ConfigError

    model = family_model("albert")  # one shared block: no list of blocks to hook the last of
    with pytest.raises(ConfigError, match="remove `last_layer: block`"):
        cache(model, inputs_file, last_layer="block")


#: The README's table: the module whose output ``hidden_states[-1]`` is, per family and
#: side; None where it is the last block's own output (no final norm).
FINAL_NORM_IN_LAST = {
    **dict.fromkeys(["gpt2", "gptj", "bloom", "falcon"], "ln_f"),
    "gpt-neox": "final_layer_norm", "opt": "decoder.final_layer_norm",
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3",
                     "stablelm"], "norm"),
    **dict.fromkeys(ENCODERS, None),
    "t5-encoder": "encoder.final_layer_norm", "t5-decoder": "decoder.final_layer_norm",
    "bart-encoder": None, "bart-decoder": None,
}


@pytest.mark.parametrize("case", list(FINAL_NORM_IN_LAST))
def test_where_the_final_norm_sits(case):
    """``hidden_states[-1]`` is the named norm of the last block's output, bit for bit, or
    that output itself. The last block is found by actcache's own lookup; ALBERT runs its
    one shared block group L times, the last run is its output."""
    import transformers
    from transformers import AutoModel

    from actcache.workers.model import block_list

    family, _, side = case.partition("-") if case.startswith(("t5-", "bart-")) else (case, "", "")
    config_name, kwargs, _, _ = {**DECODERS, **ENCODERS, **ENCODER_DECODERS}[family]
    config = getattr(transformers, config_name)(vocab_size=64, pad_token_id=0, bos_token_id=1,
                                                eos_token_id=1, decoder_start_token_id=1, **kwargs)
    torch.manual_seed(0)
    net = AutoModel.from_config(config).eval()
    part = {"encoder": net.get_encoder(), "decoder": net.get_decoder()}.get(side, net)
    blocks = net.encoder.albert_layer_groups if family == "albert" else block_list(part, 2)
    seen: list[torch.Tensor] = []
    blocks[-1].register_forward_hook(
        lambda _m, _i, out: seen.append(out[0] if isinstance(out, tuple) else out))
    ids = torch.randint(2, 64, (1, 7))
    with torch.inference_mode():
        if side == "decoder":
            last = net(input_ids=ids, decoder_input_ids=ids[:, :3],
                       output_hidden_states=True).decoder_hidden_states[-1]
        else:
            last = part(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        norm = FINAL_NORM_IN_LAST[case]
        want = seen[-1] if norm is None else net.get_submodule(norm)(seen[-1])
    assert torch.equal(last, want)
    if norm is not None:  # and the norm is not a no-op that would pass either way
        assert not torch.allclose(last, seen[-1], rtol=1e-2, atol=1e-3)
