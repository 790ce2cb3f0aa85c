"""Tiny vision and speech encoders saved with their processors, inputs, and the reference.

Each model is built from a config and saved with its image processor or feature
extractor (``save_pretrained`` both), so it loads by path like a real checkpoint. The
reference runs each example alone through plain transformers with its own processor:
``model(**processor(example), output_hidden_states=True)``.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

RATE = 16_000
_TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 64}


def _save(folder: Path, model: Any, processor: Any) -> str:
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def _vit(folder: Path) -> str:
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    config = ViTConfig(image_size=32, patch_size=8, **_TINY)
    return _save(folder, ViTModel(config, add_pooling_layer=False),
                 ViTImageProcessorPil(size={"height": 32, "width": 32}))


def _dinov2_registers(folder: Path) -> str:
    from transformers import (
        BitImageProcessorPil,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    config = Dinov2WithRegistersConfig(image_size=32, patch_size=8, num_register_tokens=4,
                                       mlp_ratio=2, **{k: v for k, v in _TINY.items()
                                                       if k != "intermediate_size"})
    processor = BitImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                                     do_center_crop=True, do_convert_rgb=True)
    return _save(folder, Dinov2WithRegistersModel(config), processor)


def _clip_vision(folder: Path) -> str:
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(image_size=32, patch_size=8, **_TINY)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return _save(folder, CLIPVisionModel(config), processor)


def _siglip_vision(folder: Path) -> str:
    from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(image_size=32, patch_size=8, vision_use_head=False, **_TINY)
    return _save(folder, SiglipVisionModel(config),
                 SiglipImageProcessorPil(size={"height": 32, "width": 32}))


def _vit_mae(folder: Path) -> str:
    from transformers import ViTImageProcessorPil, ViTMAEConfig, ViTMAEModel

    config = ViTMAEConfig(image_size=32, patch_size=8, mask_ratio=0.75, **_TINY)
    return _save(folder, ViTMAEModel(config), ViTImageProcessorPil(size={"height": 32, "width": 32}))


def _wav2vec2(folder: Path, norm: str) -> str:
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    stable = norm == "layer"
    config = Wav2Vec2Config(conv_dim=(16, 16, 16), conv_stride=(5, 4, 4), conv_kernel=(10, 8, 8),
                            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                            feat_extract_norm=norm, do_stable_layer_norm=stable, **_TINY)
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=RATE, padding_value=0.0,
                                         do_normalize=True, return_attention_mask=stable)
    return _save(folder, Wav2Vec2Model(config), extractor)


def _whisper(folder: Path) -> str:
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    config = WhisperConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=1,
                           encoder_attention_heads=4, decoder_attention_heads=4,
                           encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
                           max_source_positions=1500, max_target_positions=32,
                           decoder_start_token_id=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return _save(folder, WhisperModel(config), WhisperFeatureExtractor(feature_size=80))


BUILDERS: dict[str, Callable[[Path], str]] = {
    "vit": _vit,
    "dinov2_registers": _dinov2_registers,
    "clip_vision": _clip_vision,
    "siglip_vision": _siglip_vision,
    "vit_mae": _vit_mae,
    "wav2vec2_group": lambda f: _wav2vec2(f, "group"),
    "wav2vec2_layer": lambda f: _wav2vec2(f, "layer"),
    "whisper": _whisper,
}
IMAGE_MODELS = ("vit", "dinov2_registers", "clip_vision", "siglip_vision", "vit_mae")
AUDIO_MODELS = ("wav2vec2_group", "wav2vec2_layer", "whisper")


@pytest.fixture(scope="session")
def media_models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
    """``media_models(name)``: the folder of a tiny model, built on first use."""
    built: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in built:
            torch.manual_seed(len(built))
            built[name] = BUILDERS[name](tmp_path_factory.mktemp(name))
        return built[name]

    return get


# --- inputs -----------------------------------------------------------------------------

def image_bytes(seed: int, size: tuple[int, int], fmt: str = "PNG", mode: str = "RGB") -> bytes:
    """A random image of ``size`` (width, height), encoded."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


#: Mixed sizes, grey and colour, three encodings: the processor resizes them all.
IMAGE_SPECS = [((32, 32), "PNG", "RGB"), ((48, 40), "JPEG", "RGB"), ((20, 28), "PNG", "L"),
               ((64, 64), "TIFF", "RGB"), ((33, 31), "PNG", "RGB"), ((40, 40), "JPEG", "L"),
               ((24, 50), "PNG", "RGB")]


def write_images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (size, fmt, mode) in enumerate(IMAGE_SPECS):
        path = folder / f"img{i}.{ {'PNG': 'png', 'JPEG': 'jpg', 'TIFF': 'tif'}[fmt] }"
        path.write_bytes(image_bytes(i, size, fmt, mode))
        paths.append(path)
    return paths


def speech_available() -> bool:
    return shutil.which("espeak-ng") is not None


#: Words of different lengths; each spoken at a different sampling rate when resynthesised.
WORDS = ["one", "seven hundred and twelve", "three", "forty two", "nine", "zero zero five"]


def write_audio(folder: Path) -> list[Path]:
    """Spoken words (espeak-ng, offline) as WAV and FLAC at 22.05 kHz, else synthetic tones.

    Both give variable lengths, and a rate other than the models' 16 kHz, so every file
    is resampled on the way in.
    """
    import soundfile

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, words in enumerate(WORDS):
        path = folder / f"clip{i}.{'flac' if i % 2 else 'wav'}"
        if speech_available():
            wav = folder / f"raw{i}.wav"
            subprocess.run(["espeak-ng", "-w", str(wav), words], check=True, capture_output=True)
            samples, rate = soundfile.read(wav, dtype="float32")
            wav.unlink()
        else:
            rate = 22_050
            t = np.arange(int(rate * (0.3 + 0.25 * i))) / rate
            samples = (0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t)).astype(np.float32)
        soundfile.write(path, samples, rate)
        paths.append(path)
    return paths


# --- reference ----------------------------------------------------------------------------

def _load(path: str) -> tuple[Any, Any, str]:
    from transformers import AutoConfig, AutoFeatureExtractor, AutoImageProcessor, AutoModel

    config = AutoConfig.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    if getattr(config, "is_encoder_decoder", False):
        model = model.get_encoder()
    try:
        processor = AutoImageProcessor.from_pretrained(path, backend="pil")
        return model, processor, "image"
    except (OSError, ValueError):
        return model, AutoFeatureExtractor.from_pretrained(path), "audio"


def reference_states(path: str, files: Sequence[Path], layers: Sequence[int],
                     final_norm: Any = None) -> list[dict[int, np.ndarray]]:
    """Per file: {layer: (positions, hidden)}, each example alone through plain transformers.

    Audio keeps the frames of the real audio (the model's own output-length formula);
    ViT-MAE gets identity noise, so no patch is shuffled or dropped. ``final_norm``, a
    callable taking the model, gives its final norm module: applied to every layer but
    the last, which is then the model's own ``last_hidden_state``.
    """
    from PIL import Image

    from actcache.workers.media import decode_audio

    model, processor, modality = _load(path)
    if model.config.model_type == "vit_mae":
        model.config.mask_ratio = 0.0  # a real MAE checkpoint masks 75%: reference keeps all
    norm = final_norm(model) if final_norm else None
    out = []
    with torch.inference_mode():
        for file in files:
            if modality == "image":
                image = Image.open(file)
                image = image.convert("RGB") if image.mode != "RGB" else image
                inputs = dict(processor(image, return_tensors="pt"))
                if model.config.model_type == "vit_mae":
                    grid = (model.config.image_size // model.config.patch_size) ** 2
                    inputs["noise"] = torch.arange(grid, dtype=torch.float32)[None]
                frames = None
            else:
                samples, _ = decode_audio(Path(file).read_bytes(), processor.sampling_rate)
                inputs = dict(processor(samples, sampling_rate=processor.sampling_rate,
                                        return_tensors="pt"))
                frames = _real_frames(model, processor, len(samples))
            output = model(**inputs, output_hidden_states=True)
            hidden, last = output.hidden_states, len(output.hidden_states) - 1
            states = {}
            for layer in layers:
                h = hidden[layer][0]
                if norm is not None:
                    # The last layer with the norm is what the model itself returns.
                    h = output.last_hidden_state[0] if layer == last else norm(h)
                states[layer] = (h if frames is None else h[:frames]).float().numpy()
            out.append(states)
    return out


def _real_frames(model: Any, processor: Any, samples: int) -> int:
    if model.config.model_type == "whisper":
        mel = min(samples // processor.hop_length, processor.nb_max_frames)
        return int(model._get_feat_extract_output_lengths(torch.tensor(mel)))
    return int(model._get_feat_extract_output_lengths(torch.tensor(samples)))


def pooled(states: list[dict[int, np.ndarray]], layer: int, pooling: str, prefix: int) -> np.ndarray:
    rows = [s[layer] for s in states]
    if pooling == "mean":
        return np.stack([r[prefix:].mean(0) for r in rows])
    if pooling == "first":
        return np.stack([r[0] for r in rows])
    if pooling == "last":
        return np.stack([r[-1] for r in rows])
    if pooling == "tokens":
        return np.concatenate(rows)
    raise ValueError(pooling)
