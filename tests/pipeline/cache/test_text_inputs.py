"""Sentence pairs, chat templates and the decoder side: each equals the same tokenizer call
and forward on one example alone."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from actcache import open_store
from actcache.cache.driver import parse_job, run_job
from tests.conftest import SENTENCES
from tests.families import build

REL_TOL = 1e-4
TEMPLATE = (
    "{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def run(tmp_path: Path, model: str, records: list[dict], **job: object):  # type: ignore[no-untyped-def]
    inputs = tmp_path / f"{uuid.uuid4().hex}.jsonl"
    inputs.write_text("".join(json.dumps(r) + "\n" for r in records))
    store = f"memory://text-inputs/{uuid.uuid4().hex}"
    config = {"model": model, "inputs": str(inputs), "store": store, "layers": "all",
              "pooling": ["mean", "last"], "dtype": "float32", "batch_size": 3, **job}
    run_job(parse_job(config), inline=True, echo=lambda *_: None)
    return open_store(store)


def assert_equal_to(store, states: list[tuple[torch.Tensor, ...]]) -> None:  # type: ignore[no-untyped-def]
    for layer in store.layers:
        for pooling in ("mean", "last"):
            rows = [s[layer][0] for s in states]
            want = torch.stack([r.mean(0) if pooling == "mean" else r[-1] for r in rows]).numpy()
            err = np.abs(store.read(layer, pooling) - want).max() / np.abs(want).max()
            assert err <= REL_TOL, f"layer {layer} {pooling}: relative error {err:.3g}"


def load(model: str):  # type: ignore[no-untyped-def]
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(model), AutoModel.from_pretrained(model).eval()


def test_sentence_pairs_equal_the_pair_tokenized_alone(tmp_path, tiny_bert):
    pairs = [(SENTENCES[i], SENTENCES[j]) for i, j in ((0, 17), (2, 3), (17, 18), (5, 12), (9, 10))]
    store = run(tmp_path, tiny_bert, [{"premise": a, "hypothesis": b} for a, b in pairs],
                text_column="premise", text_pair_column="hypothesis")
    tok, net = load(tiny_bert)
    with torch.inference_mode():
        states = [net(**tok(a, b, return_tensors="pt"), output_hidden_states=True).hidden_states
                  for a, b in pairs]
    assert tok(*pairs[0])["token_type_ids"][-1] == 1  # the pair's segment ids reach the model
    assert_equal_to(store, states)
    assert list(store.metadata.columns) == []


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> str:
    from transformers import AutoTokenizer

    folder = build("llama", tmp_path_factory.mktemp("chat-llama"), "left")
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("generation", [False, True], ids=["plain", "generation-prompt"])
def test_chat_template_equals_apply_chat_template_alone(tmp_path, chat_model, generation):
    texts = [SENTENCES[i] for i in (2, 0, 3, 6)]
    system = "You are terse."
    store = run(tmp_path, chat_model, [{"text": t} for t in texts], chat_template=True,
                system_prompt=system, add_generation_prompt=generation)
    tok, net = load(chat_model)

    def messages(text: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": system}, {"role": "user", "content": text}]

    with torch.inference_mode():
        states = [net(**tok.apply_chat_template(messages(t), add_generation_prompt=generation,
                                                return_dict=True, return_tensors="pt"),
                      output_hidden_states=True).hidden_states for t in texts]
    assert_equal_to(store, states)
    rendered = tok.apply_chat_template(messages(texts[0]), tokenize=False,
                                       add_generation_prompt=generation)
    assert store.manifest["rendered_example"] == rendered
    assert rendered.endswith("assistant:") == generation


def test_decoder_side_for_a_fixed_decoder_prompt(tmp_path):
    model = build("t5", tmp_path / "t5", "right")
    texts = [SENTENCES[i] for i in (2, 0, 3, 6)]
    store = run(tmp_path, model, [{"text": t} for t in texts], side="decoder",
                decoder_prompt="The answer is", pooling=["mean", "last", "tokens"])
    tok, net = load(model)
    prompt = [net.config.decoder_start_token_id,
              *tok("The answer is", add_special_tokens=False)["input_ids"]]
    with torch.inference_mode():
        states = [net(**tok(t, return_tensors="pt"), decoder_input_ids=torch.tensor([prompt]),
                      output_hidden_states=True).decoder_hidden_states for t in texts]
    assert store.manifest["side"] == "decoder"
    assert store.layers == (0, 1, 2)
    assert_equal_to(store, states)
    assert list(store.token_lengths()) == [len(prompt)] * len(texts)
