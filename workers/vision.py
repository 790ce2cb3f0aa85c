"""Image inputs: the checkpoint's own image processor (PIL backend, pinned), patches as tokens.

A ViT-style encoder's sequence is ``prefix`` tokens (class token, then any register or
distillation tokens) followed by a ``rows x columns`` grid of patches. ``mean`` averages
the patches only (as timm's average pooling and DINOv2's linear evaluation do), ``first``
is the class token, ``tokens`` keeps every position; the grid of each example is kept
in ``Encoded.extra["grid"]`` for the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from actcache.schemas.errors import ConfigError, MediaFileError, ModelLoadError
from actcache.workers.adapters import Batch, Encoded
from actcache.workers.media import IMAGE_BACKEND, decode_image, describe, fetch
from actcache.workers.model import encoder_config, first_line, resolve_model_path

#: Leading non-patch tokens per model type (registers are added from the config). A type
#: not listed is refused: a wrong prefix count would give plausible, wrong poolings.
PREFIX_TOKENS = {
    "vit": 1, "vit_mae": 1, "vit_msn": 1, "dinov2": 1, "dinov2_with_registers": 1,
    "clip_vision_model": 1, "clip": 1, "deit": 2, "beit": 1, "data2vec-vision": 1,
    "siglip_vision_model": 0, "siglip": 0, "ijepa": 0,
}


def prefix_tokens(config: Any) -> int:
    model_type = str(getattr(config, "model_type", ""))
    if model_type not in PREFIX_TOKENS:
        raise ModelLoadError(
            f"model type {model_type!r} is not a vision encoder actcache knows the token layout "
            f"of (known: {', '.join(sorted(PREFIX_TOKENS))}); use one of those for `image_column`"
        )
    return PREFIX_TOKENS[model_type] + int(getattr(encoder_config(config, "image"), "num_register_tokens", 0) or 0)


class ImageAdapter:
    """Decodes each image and runs the processor on it alone, as the reference does."""

    modality = "image"
    padding_side = "right"

    def __init__(
        self,
        name: str,
        *,
        revision: str | None = None,
        trust_remote_code: bool = False,
        model_config: Any = None,
        max_length: int | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        from transformers import AutoImageProcessor

        try:
            self.processor = AutoImageProcessor.from_pretrained(
                resolve_model_path(name), revision=revision, trust_remote_code=trust_remote_code,
                backend=IMAGE_BACKEND, local_files_only=True,
            )
        except Exception as e:
            raise ModelLoadError(
                f"cannot load an image processor for {name!r}: {first_line(e)}; an image job "
                "needs a model folder with its preprocessor_config.json"
            ) from e
        self.model_type = str(getattr(model_config, "model_type", ""))
        self.prefix = prefix_tokens(model_config)
        vision = encoder_config(model_config, "image")
        self.patch = int(vision.patch_size)
        self.channels = int(getattr(vision, "num_channels", 3))
        self.storage_options = storage_options
        self.has_class_token = self.prefix > 0
        longest = self._longest()
        if max_length is not None and max_length < longest:
            raise ConfigError(
                f"max_length {max_length} is below the {longest} positions of one image "
                f"({self.prefix} prefix + patches); patches are never cut: remove `max_length`"
            )
        self.max_length = max_length or longest

    @property
    def description(self) -> str:
        return f"{type(self.processor).__name__}(backend={IMAGE_BACKEND})"

    def _longest(self) -> int:
        from PIL import Image

        probe = Image.new("RGB" if self.channels == 3 else "L", (224, 224))
        return self._length(self._pixels(probe))

    def _pixels(self, image: Any) -> torch.Tensor:
        if self.channels == 3 and image.mode != "RGB":
            # Grey, palette and RGBA images become RGB for a three-channel model, as
            # PIL's convert does; multi-channel inputs pass through to the processor.
            image = image.convert("RGB")
        values: torch.Tensor = self.processor(image, return_tensors="pt")["pixel_values"][0]
        return values

    def _grid(self, pixels: torch.Tensor) -> tuple[int, int]:
        return pixels.shape[-2] // self.patch, pixels.shape[-1] // self.patch

    def _length(self, pixels: torch.Tensor) -> int:
        rows, cols = self._grid(pixels)
        return self.prefix + rows * cols

    def render(self, _ref: str) -> None:
        """No text rendering: the model sees the decoded image (the manifest notes none)."""
        return None

    def encode(self, refs: Sequence[str]) -> Encoded:
        examples, lengths, grids = [], [], []
        for ref in refs:
            try:
                image = decode_image(fetch(ref, self.storage_options))
            except Exception as e:  # the driver checked every file; it changed since
                raise MediaFileError(
                    f"cannot read image {describe(ref)}: {first_line(e)}; the file changed "
                    "after the run checked it: restore or fix it, or remove its row, and rerun"
                ) from e
            pixels = self._pixels(image)
            examples.append({"pixel_values": pixels})
            lengths.append(self._length(pixels))
            grids.append(self._grid(pixels))
        return Encoded(examples, lengths, [False] * len(examples), {"grid": grids})

    def batch(self, examples: Sequence[dict[str, Any]]) -> Batch:
        pixels = torch.stack([e["pixel_values"] for e in examples])
        rows, cols = self._grid(pixels)
        inputs: dict[str, Any] = {"pixel_values": pixels}
        if self.model_type == "vit_mae":
            # Identity noise keeps every patch in place: MAE's random masking otherwise
            # shuffles (and, with mask_ratio > 0, drops) patches on every call.
            inputs["noise"] = torch.arange(rows * cols, dtype=torch.float32).expand(len(examples), -1)
        mask = torch.ones(len(examples), self.prefix + rows * cols, dtype=torch.bool)
        return Batch(inputs, mask, self.prefix)

    def batch_key(self, example: dict[str, Any]) -> Any:
        """Examples batch together only with the same pixel shape (no padding of images)."""
        return tuple(example["pixel_values"].shape)
