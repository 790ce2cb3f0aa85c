"""Image inputs: the checkpoint's own image processor (PIL backend, pinned), patches as tokens.

A ViT-style encoder's sequence is ``prefix`` tokens (class token, then any register or
distillation tokens) followed by a ``rows x columns`` grid of patches. ``mean`` averages
the patches only (as timm's average pooling and DINOv2's linear evaluation do), ``first``
is the class token, ``tokens`` keeps every position; the grid of each example is kept
in ``Encoded.extra["grid"]`` for the store.

The adapter also holds what the rest of the code needs to know of vision encoders: a
two-tower checkpoint (CLIP, SigLIP) runs its image tower alone, ViT-MAE runs with its
random masking off, and a processor that treats images independently runs over many
images per call (``processes_independently``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from actcache.schemas.errors import ConfigError, MediaFileError, ModelLoadError
from actcache.workers.adapters import Batch, Encoded
from actcache.workers.media import IMAGE_BACKEND, decode_image, describe, fetch
from actcache.workers.model import first_line, resolve_model_path

#: Leading non-patch tokens per model type (registers are added from the config). A type
#: not listed is refused: a wrong prefix count would give plausible, wrong poolings.
PREFIX_TOKENS = {
    "vit": 1, "vit_mae": 1, "vit_msn": 1, "dinov2": 1, "dinov2_with_registers": 1,
    "clip_vision_model": 1, "clip": 1, "deit": 2, "beit": 1, "data2vec-vision": 1,
    "siglip_vision_model": 0, "siglip": 0, "ijepa": 0,
}


#: Two-tower checkpoints (CLIP, SigLIP): an image job runs the image tower alone.
TWO_TOWER = ("clip", "siglip")

#: Images per call of a processor that treats them independently: the per-call overhead
#: (argument validation, dispatch) is paid once per chunk, and only a chunk of decoded
#: images is held at a time.
PROCESS_CHUNK = 64


def vision_config(config: Any) -> Any:
    """The config of the encoder an image job runs: the image tower of a two-tower model."""
    if getattr(config, "model_type", None) in TWO_TOWER:
        return config.vision_config
    return config


def prefix_tokens(config: Any) -> int:
    model_type = str(getattr(config, "model_type", ""))
    if model_type not in PREFIX_TOKENS:
        raise ModelLoadError(
            f"model type {model_type!r} is not a vision encoder actcache knows the token layout "
            f"of (known: {', '.join(sorted(PREFIX_TOKENS))}); use one of those for `image_column`"
        )
    return PREFIX_TOKENS[model_type] + int(getattr(vision_config(config), "num_register_tokens", 0) or 0)


def fixed_output_size(processor: Any) -> tuple[int, int] | None:
    """(height, width) of every image out of ``processor`` whatever its input, else None."""
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    if crop is not None and crop.height and crop.width:
        return int(crop.height), int(crop.width)
    size = getattr(processor, "size", None) if getattr(processor, "do_resize", False) else None
    # The PIL backend reads shortest_edge and max_height before height x width.
    if (size is not None and size.height and size.width and not size.shortest_edge
            and not size.max_height):
        return int(size.height), int(size.width)
    return None


def processes_independently(processor: Any, channels: int) -> bool:
    """Whether ``processor`` over a list of images gives each image's own output, stacked.

    Decided from the class and config, conservatively. The PIL backend's own pipeline
    prepares, resizes, crops, rescales and normalises each image of a list alone; it
    qualifies when the processor keeps that pipeline unchanged (a model-specific override
    of ``preprocess``, the image-like dispatch, ``process_image`` or ``_preprocess`` may
    tile, group or mix images: LLaVA-NeXT's patches, BEiT's segmentation maps), pads
    nothing (padding goes to the largest image of the call), gives one fixed size (a crop
    or a resize to height x width; an aspect-keeping resize gives each image its own
    grid) and sees three-channel images only (the adapter converts every image to RGB
    then; a multi-channel model's images pass through as they come). ViT, DeiT, CLIP,
    SigLIP and DINOv2 (BiT's processor) checkpoints qualify. The self-check still
    compares each check input processed alone with the batched path, and falls back to
    one image per call if they ever differ.
    """
    from transformers.image_processing_backends import PilBackend

    if channels != 3 or not isinstance(processor, PilBackend):
        return False
    pipeline = ("preprocess", "_preprocess_image_like_inputs", "_prepare_image_like_inputs",
                "_prepare_images_structure", "process_image", "_preprocess")
    if any(getattr(type(processor), name) is not getattr(PilBackend, name) for name in pipeline):
        return False
    if getattr(processor, "do_pad", False):
        return False
    return fixed_output_size(processor) is not None


class ImageAdapter:
    """Decodes images and runs the checkpoint's processor on them: on a chunk of images per
    call where it treats them independently, else on each alone, as the reference does."""

    modality = "image"
    side: str | None = None
    padding_side = "right"
    padding_sides: tuple[str, ...] = ("right",)
    row_extras: tuple[str, ...] = ("grid",)

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
        vision = vision_config(model_config)
        self.patch = int(vision.patch_size)
        self.channels = int(getattr(vision, "num_channels", 3))
        self.storage_options = storage_options
        self.defines_first = self.prefix > 0
        self.batched_processor = processes_independently(self.processor, self.channels)
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

    def encoder_config(self, config: Any) -> Any:
        return vision_config(config)

    def encoder(self, model: Any) -> Any:
        """The image tower of a two-tower model; ViT-MAE with its random masking off
        (``mask_ratio = 0``): every patch is kept, and ``batch``'s identity noise keeps
        them in place."""
        if self.model_type in TWO_TOWER:
            return model.vision_model
        if self.model_type == "vit_mae":
            model.config.mask_ratio = 0.0
        return model

    def _pixels(self, image: Any) -> torch.Tensor:
        return self._process([image])[0]

    def _process(self, images: Sequence[Any]) -> list[torch.Tensor]:
        """Pixel values per image, from one call of the processor on all of ``images``."""
        if self.channels == 3:
            # Grey, palette and RGBA images become RGB for a three-channel model, as
            # PIL's convert does; multi-channel inputs pass through to the processor.
            images = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        values: torch.Tensor = self.processor(list(images), return_tensors="pt")["pixel_values"]
        return list(values.unbind(0))

    def _decode(self, ref: str) -> Any:
        try:
            return decode_image(fetch(ref, self.storage_options))
        except Exception as e:  # the driver checked every file; it changed since
            raise MediaFileError(
                f"cannot read image {describe(ref)}: {first_line(e)}; the file changed "
                "after the run checked it: restore or fix it, or remove its row, and rerun"
            ) from e

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
        chunk = PROCESS_CHUNK if self.batched_processor else 1
        for start in range(0, len(refs), chunk):
            for pixels in self._process([self._decode(r) for r in refs[start : start + chunk]]):
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
