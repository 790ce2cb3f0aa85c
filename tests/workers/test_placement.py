"""Placing a model on GPUs, worked out on the CPU: the device map, the size estimate, the dtype."""

from __future__ import annotations

import pytest
import torch

from actcache.schemas.errors import ModelTooLargeError
from actcache.schemas.job import JobConfig
from actcache.workers.model import cut_config, load_config, load_model, resolve_model_dtype
from actcache.workers.placement import check_placement, off_gpu, plan_device_map, weight_bytes


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A 4-block Llama of ~5.5 MB in float32, saved in bfloat16."""
    from transformers import LlamaConfig, LlamaModel

    folder = tmp_path_factory.mktemp("llama")
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(0)
    LlamaModel(config).to(torch.bfloat16).save_pretrained(folder)
    return str(folder)


def job(model: str, model_dtype: str) -> JobConfig:
    return JobConfig(model=model, inputs="in.jsonl", store="s.zarr", model_dtype=model_dtype)


def params_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_two_gpus_split_the_model_and_too_little_memory_is_refused(llama):
    config = load_config(llama)
    size = params_bytes(load_model(llama, job(llama, "float32")))
    split = plan_device_map(config, torch.float32, {0: size, 1: size})
    assert set(split.values()) == {0, 1}
    assert split["embed_tokens"] == 0  # the inputs' device is the first GPU
    small = plan_device_map(config, torch.float32, {0: size // 4})
    assert off_gpu(small)
    with pytest.raises(ModelTooLargeError, match="does not fit the actor's 1 GPU"):
        check_placement(small, llama, [0], offload=False)
    check_placement(small, llama, [0], offload=True)  # asked for: allowed


def test_the_size_estimate_is_the_loaded_models_bytes(llama):
    for depth, dtype in ((4, "float32"), (2, "float32"), (1, "bfloat16")):
        model = load_model(llama, job(llama, dtype), depth if depth < 4 else None)
        assert weight_bytes(llama, depth, 4, dtype, None) == params_bytes(model), (depth, dtype)
    assert weight_bytes(llama, 4, 4, "bfloat16", "4bit") == weight_bytes(llama, 4, 4, "float32",
                                                                         None) // 8


def test_auto_dtype_is_the_checkpoints(llama, tiny_bert):
    assert resolve_model_dtype(llama, None, False, "auto") == "bfloat16"
    assert resolve_model_dtype(tiny_bert, None, False, "auto") == "float32"
    assert resolve_model_dtype(llama, None, False, "float16") == "float16"
    model = load_model(llama, job(llama, "auto"), 2)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert cut_config(load_config(llama), 2).num_hidden_layers == 2
