"""Image and audio stores equal each example run alone through plain transformers.

Every layer, ``first``/``mean``/``tokens``, images of mixed sizes and modes, audio of
mixed lengths and sampling rates; relative error <= 1e-4 in float32. The worker runs in
process (no Ray): Ray adds nothing to what is checked here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from actcache import open_store
from actcache.cache.driver import parse_job, run_job
from tests.media import (
    AUDIO_MODELS,
    IMAGE_MODELS,
    pooled,
    reference_states,
    write_audio,
    write_images,
)

# Every vision and speech model is cached in full and checked against a forward pass of each input.
pytestmark = pytest.mark.slow

PREFIX = {"vit": 1, "dinov2_registers": 5, "clip_vision": 1, "siglip_vision": 0, "vit_mae": 1}
TOLERANCE = 1e-4
NORMS = {"dinov2_registers": "layernorm", "whisper": "layer_norm",
         "wav2vec2_layer": "encoder.layer_norm"}


def _get(module, path: str):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def cache_media(tmp_path: Path, model: str, files: list[Path], column: str, **job: object):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({column: str(f), "n": i}) + "\n" for i, f in enumerate(files)))
    store = tmp_path / "store.zarr"
    config = {"model": model, "inputs": str(inputs), "store": str(store), f"{column}_column": column,
              "dtype": "float32", **job}
    run_job(parse_job(config), inline=True, echo=lambda *_: None)
    return open_store(str(store))


def assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape, what
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-12)
    assert err <= TOLERANCE, f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_image_encoders_match_the_one_image_reference(tmp_path, media_models, name):
    model = media_models(name)
    files = write_images(tmp_path / "images")
    poolings = ["mean", "tokens"] if name == "siglip_vision" else ["first", "mean", "tokens"]
    store = cache_media(tmp_path, model, files, "image", pooling=poolings, batch_size=3,
                        rows_per_unit=4)
    prefix = PREFIX[name]
    assert store.manifest["prefix_tokens"] == prefix
    assert store.manifest["processor_backend"] == "pil"
    assert store.manifest["modality"] == "image"
    states = reference_states(model, files, list(store.layers))
    assert list(store.token_lengths()) == [len(s[0]) for s in states]
    grid = store.patch_grid()
    assert (prefix + grid[:, 0] * grid[:, 1] == store.token_lengths()).all()
    for layer in store.layers:
        for pooling in poolings:
            assert_close(store.read(layer, pooling), pooled(states, layer, pooling, prefix),
                         f"{name} {pooling} layer {layer}")


@pytest.mark.parametrize("name", AUDIO_MODELS)
def test_speech_encoders_match_the_one_clip_reference(tmp_path, media_models, name):
    model = media_models(name)
    files = write_audio(tmp_path / "audio")
    store = cache_media(tmp_path, model, files, "audio", pooling=["mean", "last", "tokens"],
                        batch_size=4, rows_per_unit=4)
    states = reference_states(model, files, list(store.layers))
    lengths = [len(s[0]) for s in states]
    assert len(set(lengths)) == len(lengths), "clips of mixed lengths"
    assert list(store.token_lengths()) == lengths
    if name == "whisper":
        assert max(lengths) < 1500, "only the real audio's frames of the 30 s window are kept"
    for layer in store.layers:
        for pooling in ("mean", "last", "tokens"):
            assert_close(store.read(layer, pooling), pooled(states, layer, pooling, 0),
                         f"{name} {pooling} layer {layer}")


@pytest.mark.parametrize("name", ["dinov2_registers", "whisper", "wav2vec2_layer"])
def test_final_norm_applies_the_models_norm_to_every_layer(tmp_path, media_models, name):
    model = media_models(name)
    image = name in IMAGE_MODELS
    files = write_images(tmp_path / "in")[:4] if image else write_audio(tmp_path / "in")[:3]
    store = cache_media(tmp_path, model, files, "image" if image else "audio",
                        pooling=["mean", "tokens"], final_norm=True, layers=[0, 1, 2])
    assert store.manifest["final_norm"] is True
    states = reference_states(model, files, [0, 1, 2], final_norm=lambda net: _get(net, NORMS[name]))
    prefix = PREFIX.get(name, 0)
    for layer in (0, 1, 2):
        for pooling in ("mean", "tokens"):
            assert_close(store.read(layer, pooling), pooled(states, layer, pooling, prefix),
                         f"{name} {pooling} layer {layer}")
