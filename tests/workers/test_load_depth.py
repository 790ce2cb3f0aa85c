"""Loading only the blocks a job needs: values equal the full model's, memory is saved.

Each family is built tiny from its config, saved with a tokenizer, and loaded by path.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from actcache import open_store
from actcache.cache.driver import parse_job, run_job
from actcache.schemas.job import JobConfig
from actcache.workers.adapters import TextAdapter
from actcache.workers.capture import Capture
from actcache.workers.model import (
    block_list,
    cut_config,
    depth_needed,
    load_config,
    load_model,
    num_layers,
)
from tests.conftest import SENTENCES, _bpe_tokenizer

LAYERS = 4
SMALL = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64}
DECODER = {**SMALL, "num_hidden_layers": LAYERS, "num_key_value_heads": 2,
           "max_position_embeddings": 128}
ENCODER = {**SMALL, "num_hidden_layers": LAYERS, "max_position_embeddings": 128}

#: (config class, keyword arguments): one row per family.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": ("GPT2Config", {"n_embd": 32, "n_layer": LAYERS, "n_head": 4, "n_positions": 128}),
    "gpt_neo": ("GPTNeoConfig", {"hidden_size": 32, "num_layers": LAYERS, "num_heads": 4,
                                 "attention_types": [[["global", "local"], LAYERS // 2]],
                                 "window_size": 4, "max_position_embeddings": 128}),
    "gpt_neox": ("GPTNeoXConfig", ENCODER),
    "opt": ("OPTConfig", {"hidden_size": 32, "num_hidden_layers": LAYERS,
                          "num_attention_heads": 4, "ffn_dim": 64, "word_embed_proj_dim": 32,
                          "max_position_embeddings": 128}),
    "bloom": ("BloomConfig", {"hidden_size": 32, "n_layer": LAYERS, "n_head": 4}),
    "llama": ("LlamaConfig", DECODER),
    "mistral": ("MistralConfig", DECODER),
    "qwen2": ("Qwen2Config", DECODER),
    "qwen3": ("Qwen3Config", {**DECODER, "head_dim": 8}),
    "gemma2": ("Gemma2Config", {**DECODER, "head_dim": 8, "sliding_window": 4}),
    "phi3": ("Phi3Config", DECODER),
    "falcon": ("FalconConfig", {"hidden_size": 32, "num_hidden_layers": LAYERS,
                                "num_attention_heads": 4}),
    "bert": ("BertConfig", ENCODER),
    "roberta": ("RobertaConfig", ENCODER),
    "deberta_v2": ("DebertaV2Config", ENCODER),
    "distilbert": ("DistilBertConfig", {"dim": 32, "n_layers": LAYERS, "n_heads": 4,
                                        "hidden_dim": 64, "max_position_embeddings": 128}),
}


def build(folder: Path, family: str) -> str:
    import transformers
    from transformers import AutoModel

    cls_name, kwargs = FAMILIES[family]
    tok = _bpe_tokenizer("right")
    ids = {"vocab_size": len(tok) + 8, "pad_token_id": tok.eos_token_id,
           "bos_token_id": tok.eos_token_id, "eos_token_id": tok.eos_token_id}
    config = getattr(transformers, cls_name)(**ids, **kwargs)
    torch.manual_seed(0)
    AutoModel.from_config(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("families")
    return {family: build(root / family, family) for family in FAMILIES}


def float32_job(model: str) -> JobConfig:
    return JobConfig(model=model, inputs="in.jsonl", store="s.zarr", model_dtype="float32")


def captured(model_path: str, layers: tuple[int, ...], depth: int | None
             ) -> tuple[dict[Any, np.ndarray], bool]:
    """(pooled values per (pooling, layer), whether the model was built with ``depth`` blocks)."""
    config = load_config(model_path)
    adapter = TextAdapter(model_path, max_length=64, truncation_side="right", model_config=config)
    model = load_model(model_path, float32_job(model_path), depth)
    built_cut = block_list(model, LAYERS) is None and block_list(model, depth or 0) is not None
    capture = Capture(model, layers, num_layers(config), ("mean", "last", "tokens"))
    batch = adapter.batch(adapter.encode(SENTENCES[:6]).examples)
    return {key: value.numpy() for key, value in capture(batch).items()}, built_cut


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_model_cut_at_load_gives_the_full_models_values(family_models, family):
    path = family_models[family]
    full, _ = captured(path, tuple(range(LAYERS + 1)), None)
    for layers in ((0,), (1, 3)):
        depth = depth_needed(layers, LAYERS)
        got, built_cut = captured(path, layers, depth)
        assert built_cut, family  # built with `depth` blocks, not cut after loading
        assert set(got) == {(p, layer) for layer in layers for p in ("mean", "last", "tokens")}
        for key, value in got.items():
            np.testing.assert_allclose(value, full[key], rtol=1e-5, atol=1e-5,
                                       err_msg=f"{family} {key}")


def test_per_layer_lists_are_cut_with_the_layer_count(family_models):
    config = load_config(family_models["gpt_neo"])
    cut = cut_config(config, 2)
    assert (cut.num_layers, len(cut.attention_layers)) == (2, 2)
    assert (config.num_layers, len(config.attention_layers)) == (LAYERS, LAYERS)
    gemma = cut_config(load_config(family_models["gemma2"]), 3)
    assert (gemma.num_hidden_layers, len(gemma.layer_types)) == (3, 3)


def test_a_store_cut_at_load_equals_the_full_models_store(tmp_path, family_models):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"text": t}) + "\n" for t in SENTENCES))
    stores = {}
    for name, layers in (("cut", [0, 2]), ("full", "all")):
        job = parse_job({"model": family_models["llama"], "inputs": str(inputs), "layers": layers,
                         "store": str(tmp_path / f"{name}.zarr"), "pooling": ["mean", "tokens"],
                         "dtype": "float32", "batch_size": 4})
        run_job(job, inline=True, echo=lambda *_: None)
        stores[name] = open_store(str(tmp_path / f"{name}.zarr"))
    for layer in (0, 2):
        for pooling in ("mean", "tokens"):
            np.testing.assert_allclose(stores["cut"].read(layer, pooling),
                                       stores["full"].read(layer, pooling), rtol=1e-5, atol=1e-6)


PEAK_RSS = textwrap.dedent("""
    import sys
    import torch
    from actcache.schemas.job import JobConfig
    from actcache.workers.model import load_model
    job = JobConfig(model=sys.argv[1], inputs="in.jsonl", store="s.zarr", model_dtype="float32")
    model = load_model(sys.argv[1], job, int(sys.argv[2]) or None)
    with torch.inference_mode():  # a forward pass touches every weight the model holds
        model(input_ids=torch.arange(16)[None])
    # VmHWM: this process's own peak (ru_maxrss would carry the parent's over the exec).
    with open("/proc/self/status") as status:
        line = next(x for x in status if x.startswith("VmHWM:"))
    print(int(line.split()[1]) * 1024)
""")


@pytest.mark.slow
def test_loading_two_blocks_of_a_big_model_takes_less_memory(tmp_path):
    """Peak RSS of a fresh process loading and running blocks 0..1 of a 12-block model vs all.

    Weights are memory-mapped: a block counts once it is read, which a forward pass does.
    """
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaModel

    folder = tmp_path / "big"
    config = LlamaConfig(vocab_size=512, hidden_size=768, intermediate_size=2048,
                         num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=8)
    with torch.device("meta"):  # shapes only: random init of 85M weights is slow
        shapes = {k: v.shape for k, v in LlamaModel(config).state_dict().items()}
    config.save_pretrained(folder)
    save_file({k: torch.full(shape, 0.01) for k, shape in shapes.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    per_block = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 12
    peaks = {}
    for depth in (2, 0):
        out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(folder), str(depth)],
                             capture_output=True, text=True, check=True)
        peaks[depth] = int(out.stdout.strip().splitlines()[-1])
    # All 12 blocks against 2: at least 8 blocks' worth of bytes apart (~28 MB each).
    assert peaks[0] - peaks[2] > 8 * per_block, (peaks, per_block)
