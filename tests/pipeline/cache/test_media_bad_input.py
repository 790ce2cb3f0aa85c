"""Bad image and audio inputs: one clear error line each, exit 2, the store byte-identical."""

from __future__ import annotations

import json

import pytest

from actcache.cache.driver import parse_job, run_job
from tests.media import write_audio, write_images
from tests.pipeline.cache.test_bad_input import run_cli, tree_digest


@pytest.fixture
def image_store(tmp_path, media_models):
    """A complete image store, and the job that wrote it."""
    files = write_images(tmp_path / "images")[:4]
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"id": f"im{i}", "image": str(f)}) + "\n"
                              for i, f in enumerate(files)))
    job = {"model": media_models("vit"), "inputs": str(inputs), "store": str(tmp_path / "s.zarr"),
           "image_column": "image", "id_column": "id", "layers": [0, 2],
           "pooling": ["first", "mean"], "rows_per_unit": 2}
    run_job(parse_job(job), inline=True, echo=lambda *_: None)
    return tmp_path, job


def _rows(folder, rows: list[dict]) -> str:
    path = folder / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _corrupt(folder) -> str:
    good = (folder / "images" / "img0.png").read_bytes()
    (folder / "broken.png").write_bytes(good[: len(good) // 2])
    return _rows(folder, [{"id": "ok", "image": str(folder / "images" / "img1.jpg")},
                          {"id": "torn", "image": str(folder / "broken.png")}])


def _not_audio(folder) -> str:
    (folder / "notes.wav").write_text("these are not samples")
    return _rows(folder, [{"id": "a", "audio": str(folder / "notes.wav")}])


CASES = [
    ("corrupt-image", lambda f, j, m: {**j, "inputs": _corrupt(f)},
     "row 1 (id 'torn'): image file", "broken.png' is corrupt"),
    ("missing-image", lambda f, j, m: {**j, "inputs": _rows(f, [{"id": "x", "image": "gone.png"}])},
     "row 0 (id 'x'): image file", "gone.png' does not exist"),
    ("not-a-reference", lambda f, j, m: {**j, "inputs": _rows(f, [{"id": "x", "image": 7}])},
     "row 0 (id 'x'): 'image' is neither a path", "give each row a path"),
    ("image-column-text-model", lambda f, j, m: {**j, "model": m("tiny_bert")},
     "cannot load an image processor", "preprocessor_config.json"),
    ("text-job-image-model", lambda f, j, m: {k: v for k, v in j.items() if k != "image_column"},
     "cannot load a tokenizer", "tokenizer files"),
    ("audio-column-image-model", lambda f, j, m: {
        **{k: v for k, v in j.items() if k != "image_column"}, "audio_column": "image"},
     "has no audio feature extractor", "remove `audio_column` or use a speech model"),
    ("first-without-class-token", lambda f, j, m: {**j, "model": m("siglip_vision")},
     "no class token", "use mean or tokens"),
    ("final-norm-group-norm-wav2vec2", lambda f, j, m: {
        **{k: v for k, v in j.items() if k != "image_column"}, "audio_column": "audio",
        "model": m("wav2vec2_group"), "pooling": ["mean"], "final_norm": True},
     "norms before its blocks", "remove `final_norm`"),
    ("corrupt-audio", lambda f, j, m: {
        **{k: v for k, v in j.items() if k != "image_column"}, "audio_column": "audio",
        "model": m("wav2vec2_layer"), "pooling": ["mean"], "inputs": _not_audio(f)},
     "row 0 (id 'a'): audio file", "notes.wav' is corrupt"),
    ("image-and-audio-column", lambda f, j, m: {**j, "audio_column": "audio"},
     "`image_column` or `audio_column`", "not both"),
]


@pytest.mark.parametrize(("case", "change", "first", "second"), CASES, ids=[c[0] for c in CASES])
def test_bad_media_job_is_one_line_and_store_untouched(image_store, media_models, request, capsys,
                                                       case, change, first, second):
    folder, job = image_store

    def model(name: str) -> str:
        return request.getfixturevalue(name) if name == "tiny_bert" else media_models(name)

    before = tree_digest(folder / "s.zarr")
    bad = change(folder, job, model)
    capsys.readouterr()  # building a model fixture prints its progress
    code, err = run_cli(folder, bad, capsys)
    assert code == 2, err
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    assert first in err[0] and second in err[0], err[0]
    assert tree_digest(folder / "s.zarr") == before


def test_audio_files_decode_whatever_their_rate(tmp_path):
    """WAV and FLAC at 22.05 kHz (espeak-ng's rate) come back at the extractor's 16 kHz."""
    import soundfile

    from actcache.workers.media import decode_audio

    for path in write_audio(tmp_path)[:2]:
        info = soundfile.info(path)
        samples, rate = decode_audio(path.read_bytes(), 16_000)
        assert rate == 16_000 and info.samplerate != 16_000
        assert abs(len(samples) - info.frames * 16_000 / info.samplerate) <= 1
