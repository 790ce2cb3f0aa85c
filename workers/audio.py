"""Audio inputs: decoded, resampled to the feature extractor's rate, frames as tokens.

Each example's number of real frames comes from the model's own output-length formula
(``_get_feat_extract_output_lengths``), not from the extractor's mask, which some
extractors omit. Whisper's encoder always sees 30 s of features: only the frames of the
real audio are pooled and stored. Feature encoders that normalise over time (wav2vec
2.0's group norm) see zero padding as signal, so their examples batch only with
examples of the same length: the stored values then equal the one-example reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch

from actcache.schemas.errors import MediaFileError, ModelLoadError
from actcache.workers.adapters import Batch, Encoded
from actcache.workers.media import decode_audio, describe, fetch
from actcache.workers.model import first_line, resolve_model_path

#: Audio read per example when no ``max_length`` is given (Whisper's window).
DEFAULT_SECONDS = 30


class AudioAdapter:
    """Runs the feature extractor on each example alone, as the reference does."""

    modality = "audio"
    side: str | None = None
    padding_side = "right"
    padding_sides: tuple[str, ...] = ("right",)
    prefix = 0
    # Frames have no class token: `first` would be an arbitrary frame.
    defines_first = False
    row_extras: tuple[str, ...] = ()
    # The feature extractor runs on each clip alone, as the reference does: over a list it
    # pads every clip to the longest.
    batched_processor = False

    def __init__(
        self,
        name: str,
        *,
        revision: str | None = None,
        trust_remote_code: bool = False,
        model_config: Any = None,
        max_length: int | None = None,
        truncation_side: str = "right",
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        from transformers import AutoFeatureExtractor

        try:
            self.extractor = AutoFeatureExtractor.from_pretrained(
                resolve_model_path(name), revision=revision, trust_remote_code=trust_remote_code,
                local_files_only=True,
            )
        except Exception as e:
            raise ModelLoadError(
                f"{name!r} has no audio feature extractor ({type(e).__name__}); an audio job needs "
                "a speech model folder with its preprocessor_config.json: remove `audio_column` "
                "or use a speech model"
            ) from e
        if not hasattr(self.extractor, "sampling_rate"):
            raise ModelLoadError(f"{name!r} has no audio feature extractor; remove `audio_column`")
        self.config = model_config
        self.rate = int(self.extractor.sampling_rate)
        self.whisper = getattr(model_config, "model_type", "") == "whisper"
        # Group norm over time: zero padding changes every frame (transformers' docs say
        # such models take no attention mask); batching equal lengths only stays exact.
        self.pad_exact = getattr(model_config, "feat_extract_norm", "layer") != "group"
        self.truncation_side = truncation_side
        self.storage_options = storage_options
        window = DEFAULT_SECONDS * self.rate
        if self.whisper:
            window = int(self.extractor.n_samples)
        self.max_samples = window if max_length is None else self._samples_for(max_length)
        self.max_length = self.frames(self.max_samples)

    @property
    def description(self) -> str:
        return f"{type(self.extractor).__name__}(sampling_rate={self.rate})"

    def encoder_config(self, config: Any) -> Any:
        return config

    def encoder(self, model: Any) -> Any:
        """The whole model: an encoder–decoder (Whisper) runs its encoder side in Capture."""
        return model

    def frames(self, samples: int) -> int:
        """Real frames of ``samples`` samples, by the model class's own length formula."""
        from transformers.models.auto.modeling_auto import MODEL_MAPPING

        model_cls: Any = MODEL_MAPPING[type(self.config)]
        if self.whisper:
            mel = min(samples // self.extractor.hop_length, self.extractor.nb_max_frames)
            samples = mel
        owner = SimpleNamespace(config=self.config)
        lengths = model_cls._get_feat_extract_output_lengths(owner, torch.tensor(samples))
        return max(int(lengths), 0)

    def _samples_for(self, max_frames: int) -> int:
        """The most samples whose frames fit ``max_frames`` (the formula is monotonic)."""
        lo, hi = 1, max_frames * self.rate
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.frames(mid) <= max_frames:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def render(self, _ref: str) -> None:
        """No text rendering: the model sees the decoded audio (the manifest notes none)."""
        return None

    def encode(self, refs: Sequence[str]) -> Encoded:
        examples, lengths, truncated = [], [], []
        for ref in refs:
            try:
                samples, _ = decode_audio(fetch(ref, self.storage_options), self.rate)
            except Exception as e:  # the driver checked every file; it changed since
                raise MediaFileError(
                    f"cannot read audio {describe(ref)}: {first_line(e)}; the file changed "
                    "after the run checked it: restore or fix it, or remove its row, and rerun"
                ) from e
            cut = len(samples) > self.max_samples
            if cut:
                keep = self.max_samples
                samples = samples[:keep] if self.truncation_side == "right" else samples[-keep:]
            features = self.extractor(samples, sampling_rate=self.rate, return_tensors="pt")
            examples.append({k: v[0] for k, v in features.items()} | {"samples": len(samples)})
            lengths.append(self.frames(len(samples)))
            truncated.append(cut)
        return Encoded(examples, lengths, truncated, {})

    def batch(self, examples: Sequence[dict[str, Any]]) -> Batch:
        frames = [self.frames(int(e["samples"])) for e in examples]
        if self.whisper:
            inputs = {"input_features": torch.stack([e["input_features"] for e in examples])}
            seq = self.frames(int(self.extractor.n_samples))
        else:
            if not self.pad_exact and len({int(e["samples"]) for e in examples}) > 1:
                raise ValueError("a group-norm feature encoder batches equal lengths only")
            longest = max(e["input_values"].shape[-1] for e in examples)
            values = torch.zeros(len(examples), longest)
            attention = torch.zeros(len(examples), longest, dtype=torch.long)
            for i, e in enumerate(examples):
                n = e["input_values"].shape[-1]
                values[i, :n] = e["input_values"]
                attention[i, :n] = 1
            inputs = {"input_values": values}
            if "attention_mask" in examples[0]:
                inputs["attention_mask"] = attention
            seq = self.frames(longest)
        positions = torch.arange(seq)
        mask = positions[None, :] < torch.tensor(frames)[:, None]
        return Batch(inputs, mask, 0)

    def batch_key(self, example: dict[str, Any]) -> Any:
        """Group-norm encoders batch equal lengths only; others batch anything."""
        return None if self.pad_exact else int(example["samples"])
