"""Every bad input ends in one clear error line (exit 2) and leaves the existing store intact."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from actcache import open_store
from actcache.cache.driver import parse_job, run_job
from actcache.cli import main
from tests.conftest import SENTENCES


def tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def existing(tmp_path, tiny_bert):
    """A complete store, and a job file that wrote it."""
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n"
                              for i, t in enumerate(SENTENCES[:6])))
    job = {"model": tiny_bert, "inputs": str(inputs), "store": str(tmp_path / "s.zarr"),
           "layers": [0, 1], "pooling": ["mean"], "rows_per_unit": 4}
    run_job(parse_job(job), inline=True, echo=lambda *_: None)
    return tmp_path, job


def run_cli(folder: Path, job: dict, capsys, *extra: str) -> tuple[int, list[str]]:
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    code = main(["cache", str(path), *extra])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


def write(folder: Path, name: str, text: str) -> str:
    (folder / name).write_text(text)
    return str(folder / name)


CASES = [
    ("missing-inputs", lambda f, j: {**j, "inputs": str(f / "nope.jsonl")},
     "inputs file", "does not exist"),
    ("malformed-jsonl-line", lambda f, j: {**j, "inputs": write(
        f, "bad.jsonl", '{"text": "fine"}\n{"text": "fine too"}\n{"text": oops}\n')},
     "line 3 is not valid JSON", "fix or remove that line"),
    ("missing-text-column", lambda f, j: {**j, "text_column": "sentence"},
     "no column 'sentence'", "columns found: text, label"),
    ("empty-text", lambda f, j: {**j, "inputs": write(
        f, "empty.jsonl", '{"text": "a"}\n{"text": "   "}\n')},
     "row 1 (id '1') has an empty", "remove it or give it text"),
    ("unknown-model-path", lambda f, j: {**j, "model": str(f / "no-such-model")},
     "model folder", "does not exist"),
    ("unknown-hub-model", lambda f, j: {**j, "model": "nobody/never-cached-model"},
     "model 'nobody/never-cached-model' is not in the local Hugging Face cache", "hf download"),
    ("layer-out-of-range", lambda f, j: {**j, "layers": [0, 7]},
     "layer 7 is out of range", "layers run 0..3"),
    ("unknown-pooling", lambda f, j: {**j, "pooling": ["mean", "median"]},
     "unknown pooling 'median'", "mean, last, first, max, tokens"),
    ("incompatible-store-layers", lambda f, j: {**j, "layers": [0, 2]},
     "store was written with layers=[0, 1]", "--overwrite"),
    ("incompatible-store-dtype", lambda f, j: {**j, "dtype": "float32"},
     "dtype='float16'", "--overwrite"),
    ("duplicate-ids", lambda f, j: {**j, "id_column": "label"},
     "appears twice", "ids must be unique"),
    ("unknown-field", lambda f, j: {**j, "layer": 3}, "`layer`", "Extra inputs"),
    ("missing-pair-column", lambda f, j: {**j, "text_pair_column": "hypothesis"},
     "no column 'hypothesis' (set by `text_pair_column`)", "columns found: text, label"),
    ("chat-template-missing", lambda f, j: {**j, "chat_template": True},
     "has no chat template", "remove `chat_template: true`"),
    ("side-the-model-lacks", lambda f, j: {**j, "side": "decoder"},
     "not an encoder–decoder model, so it has no decoder side", "remove `side`"),
]


@pytest.mark.parametrize(("case", "change", "first", "second"), CASES, ids=[c[0] for c in CASES])
def test_bad_job_is_one_clear_line_and_store_untouched(existing, capsys, case, change, first,
                                                       second):
    folder, job = existing
    before = tree_digest(folder / "s.zarr")
    code, err = run_cli(folder, change(folder, job), capsys)
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    assert first in err[0] and second in err[0], err[0]
    assert tree_digest(folder / "s.zarr") == before


def test_missing_job_file(tmp_path, capsys):
    assert main(["cache", str(tmp_path / "job.yaml")]) == 2
    assert "job file" in capsys.readouterr().err


def test_overwrite_replaces_an_incompatible_store(existing, capsys):
    folder, job = existing
    job = {**job, "layers": [2]}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    run_job(parse_job(job), overwrite=True, inline=True, echo=lambda *_: None)
    store = open_store(str(folder / "s.zarr"))
    assert store.layers == (2,) and store.n_rows == 6 and store.complete


def test_memory_store_needs_inline(existing, capsys):
    folder, job = existing
    code, err = run_cli(folder, {**job, "store": "memory://x"}, capsys)
    assert code == 2 and "memory:// store lives inside one process" in err[0]


@pytest.fixture(scope="module")
def overflowing_bert(tmp_path_factory):
    """A tiny BERT whose embedding output reaches ~1e6: beyond float16."""
    import torch
    from transformers import BertModel

    from tests.conftest import _bert_tokenizer

    folder = tmp_path_factory.mktemp("big-bert")
    torch.manual_seed(0)
    from transformers import BertConfig

    model = BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64))
    with torch.no_grad():
        model.embeddings.LayerNorm.weight.fill_(1e6)
    model.save_pretrained(folder)
    _bert_tokenizer(folder)
    return str(folder)


def test_float16_overflow_names_the_layer_and_marks_nothing_complete(tmp_path, overflowing_bert):
    from actcache.schemas.errors import OverflowStorageError

    inputs = write(tmp_path, "in.jsonl", '{"text": "big numbers"}\n{"text": "bigger"}\n')
    job = parse_job({"model": overflowing_bert, "inputs": inputs,
                     "store": str(tmp_path / "s.zarr"), "layers": [0], "pooling": ["mean"]})
    with pytest.raises(OverflowStorageError, match="layer 0 has values up to .* beyond float16"):
        run_job(job, inline=True, echo=lambda *_: None)
    store = open_store(str(tmp_path / "s.zarr"))
    assert store.n_rows == 0 and not store.complete
    assert store.runs[-1]["status"] == "failed"
    assert "bfloat16" in store.runs[-1]["errors"][0]


@pytest.mark.ray
def test_float16_overflow_inside_an_actor_is_one_line(tmp_path, overflowing_bert, capsys):
    inputs = write(tmp_path, "in.jsonl", '{"text": "big numbers"}\n')
    job = {"model": overflowing_bert, "inputs": inputs, "store": str(tmp_path / "s.zarr"),
           "layers": [0, 1]}
    code, err = run_cli(tmp_path, job, capsys)
    assert code == 2
    assert [e for e in err if e.startswith("error:")] == [err[-1]]
    assert "beyond float16's ±65504; set `dtype: bfloat16`" in err[-1]


LEAKY_MODEL = '''
from transformers import BertConfig, BertModel


class LeakyConfig(BertConfig):
    model_type = "leaky-bert"


class LeakyBert(BertModel):
    """A BERT that attends to padding: broken under padding on purpose."""

    config_class = LeakyConfig

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        return super().forward(input_ids=input_ids, **kwargs)
'''


@pytest.fixture(scope="module")
def leaky_bert(tmp_path_factory):
    """A model (shipped as remote code) whose values change when its batch is padded."""
    import torch
    from transformers import BertConfig, BertModel

    from tests.conftest import _bert_tokenizer

    folder = tmp_path_factory.mktemp("leaky-bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64)).save_pretrained(folder)
    _bert_tokenizer(folder)
    (folder / "modeling_leaky.py").write_text(LEAKY_MODEL)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="leaky-bert", auto_map={"AutoConfig": "modeling_leaky.LeakyConfig",
                                                      "AutoModel": "modeling_leaky.LeakyBert"})
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_self_check_refuses_a_model_broken_under_padding(tmp_path, leaky_bert, capsys):
    from actcache.schemas.errors import SelfCheckError

    # Each input alone (batch_size 1) is exact, so a store can be written that way.
    job = {"model": leaky_bert, "trust_remote_code": True, "layers": [0, 2],
           "inputs": write(tmp_path, "in.jsonl", "".join(
               json.dumps({"text": t}) + "\n" for t in SENTENCES[:4])),
           "store": str(tmp_path / "s.zarr"), "batch_size": 1, "rows_per_unit": 4}
    run_job(parse_job(job), inline=True, echo=lambda *_: None)
    assert open_store(job["store"]).manifest["self_check"]["examples"] == 0
    before = tree_digest(tmp_path / "s.zarr")
    grown = {**job, "batch_size": 4, "inputs": write(tmp_path, "more.jsonl", "".join(
        json.dumps({"text": t}) + "\n" for t in SENTENCES[:10]))}
    with pytest.raises(SelfCheckError, match="is not exact under padding: at layer "):
        run_job(parse_job(grown), inline=True, echo=lambda *_: None)
    assert tree_digest(tmp_path / "s.zarr") == before
    # --dry-run runs the same check in this process: the same one line, exit 2.
    capsys.readouterr()
    code, err = run_cli(tmp_path, grown, capsys, "--dry-run")
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith(f"error: model {leaky_bert!r} is not exact under padding: at layer ")
    assert "relative error of" in err[0] and "set `batch_size: 1`" in err[0]
    assert tree_digest(tmp_path / "s.zarr") == before
