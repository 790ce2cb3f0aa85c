"""Tiny models of many architecture families, built from their configs and saved with a
tokenizer, so the real loading code runs on each (see tests/pipeline/cache/test_families.py)."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

# Small but real: 2 blocks, hidden 32, 4 heads (2 key-value heads where the family has GQA).
_ROPE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128}
_ENCODER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 64, "max_position_embeddings": 128}
_NO_SEGMENTS = ["input_ids", "attention_mask"]

# family: (config class, config kwargs, tokenizer: "bpe" (trained here) or "bert" (MiniLM's),
#          the input names its real tokenizers return (None: the tokenizer's own))
DECODERS: dict[str, tuple[str, dict[str, Any], str, list[str] | None]] = {
    "gpt2": ("GPT2Config", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128}, "bpe", None),
    "gpt2-bert-tokenizer": ("GPT2Config", {"n_embd": 32, "n_layer": 2, "n_head": 4,
                                           "n_positions": 128}, "bert", None),
    "opt": ("OPTConfig", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "ffn_dim": 64, "word_embed_proj_dim": 32,
                          "max_position_embeddings": 128}, "bpe", None),
    "bloom": ("BloomConfig", {"hidden_size": 32, "n_layer": 2, "n_head": 4}, "bpe", None),
    "falcon": ("FalconConfig", {"hidden_size": 32, "num_hidden_layers": 2,
                                "num_attention_heads": 4}, "bpe", None),
    "gpt-neox": ("GPTNeoXConfig", {**_ROPE, "num_key_value_heads": None}, "bpe", None),
    "gptj": ("GPTJConfig", {"n_embd": 32, "n_layer": 2, "n_head": 4, "rotary_dim": 4,
                            "n_positions": 128}, "bpe", None),
    "llama": ("LlamaConfig", _ROPE, "bpe", None),
    "mistral": ("MistralConfig", {**_ROPE, "head_dim": 8}, "bpe", None),
    "qwen2": ("Qwen2Config", _ROPE, "bpe", None),
    "qwen3": ("Qwen3Config", {**_ROPE, "head_dim": 8}, "bpe", None),
    "gemma": ("GemmaConfig", {**_ROPE, "head_dim": 8}, "bpe", None),
    "gemma2": ("Gemma2Config", {**_ROPE, "head_dim": 8, "query_pre_attn_scalar": 8}, "bpe", None),
    "phi3": ("Phi3Config", _ROPE, "bpe", None),
    "stablelm": ("StableLmConfig", _ROPE, "bpe", None),
}

ENCODERS: dict[str, tuple[str, dict[str, Any], str, list[str] | None]] = {
    "bert": ("BertConfig", _ENCODER, "bert", None),
    "roberta": ("RobertaConfig", _ENCODER, "bert", _NO_SEGMENTS),
    "xlm-roberta": ("XLMRobertaConfig", _ENCODER, "bert", _NO_SEGMENTS),
    "camembert": ("CamembertConfig", _ENCODER, "bert", _NO_SEGMENTS),
    "deberta-v2": ("DebertaV2Config", _ENCODER, "bert", None),
    "distilbert": ("DistilBertConfig", {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64,
                                        "max_position_embeddings": 128}, "bert", _NO_SEGMENTS),
    "electra": ("ElectraConfig", {**_ENCODER, "embedding_size": 16}, "bert", None),
    "albert": ("AlbertConfig", {**_ENCODER, "embedding_size": 16}, "bert", None),
    "mpnet": ("MPNetConfig", _ENCODER, "bert", _NO_SEGMENTS),
}

ENCODER_DECODERS: dict[str, tuple[str, dict[str, Any], str, list[str] | None]] = {
    "t5": ("T5Config", {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2,
                        "num_decoder_layers": 2, "num_heads": 4}, "bpe", None),
    "bart": ("BartConfig", {"d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
                            "encoder_attention_heads": 4, "decoder_attention_heads": 4,
                            "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
                            "max_position_embeddings": 128}, "bpe", None),
}

FAMILIES = {**DECODERS, **ENCODERS, **ENCODER_DECODERS}


@functools.cache
def _trained_bpe() -> Any:
    from tests.conftest import _bpe_tokenizer

    return _bpe_tokenizer("right")


def _tokenizer(kind: str, padding_side: str, input_names: list[str] | None) -> Any:
    from transformers import AutoTokenizer

    from actcache.workers.model import resolve_model_path
    from tests.conftest import MINILM

    if kind == "bpe":
        tok = copy.deepcopy(_trained_bpe())  # training takes seconds: once per session
        tok.padding_side = padding_side
    else:
        tok = AutoTokenizer.from_pretrained(resolve_model_path(MINILM), padding_side=padding_side)
    if input_names is not None:
        tok.model_input_names = input_names
    return tok


def build(family: str, folder: Path, padding_side: str, seed: int = 0) -> str:
    """Save a tiny randomly initialised ``family`` model and its tokenizer into ``folder``."""
    import torch
    import transformers
    from transformers import AutoModel

    config_name, kwargs, kind, input_names = FAMILIES[family]
    tok = _tokenizer(kind, padding_side, input_names)
    special = {"pad_token_id": tok.pad_token_id or tok.eos_token_id or 0}
    if kind == "bpe":
        special.update(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    else:
        special.update(bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    if family in ENCODER_DECODERS:
        special["decoder_start_token_id"] = tok.eos_token_id
    config = getattr(transformers, config_name)(vocab_size=len(tok), **kwargs, **special)
    torch.manual_seed(seed)
    AutoModel.from_config(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)
