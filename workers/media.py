"""Reading and decoding image and audio inputs: one home for both the driver and the actors.

An input row of an image or audio job holds a *reference*: a local path, an fsspec URL,
or the encoded bytes themselves (carried in a task as ``base64:`` text). The driver reads
every reference once to hash its bytes (so an edited file is an edited row) and to refuse
an unreadable one before anything is written; the actor reads it again and checks that
the bytes still hash the same.
"""

from __future__ import annotations

import base64
import hashlib
import io
from typing import Any

import numpy as np

from actcache.schemas.errors import InputDataError

BYTES_PREFIX = "base64:"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
IMAGE_BACKEND = "pil"
"""The image processors' backend, pinned: torchvision's and PIL's resizing differ."""


def bytes_hash(data: bytes) -> str:
    """Hash of the encoded bytes, the same 32 hex digits as a text row's hash."""
    return hashlib.sha256(data).hexdigest()[:32]


def reference(value: Any, base: str | None = None) -> str:
    """A row's cell as a task reference: bytes become ``base64:`` text, paths stay paths.

    A relative path resolves against ``base`` (the folder of the inputs file). A dict as
    Hugging Face datasets writes images (``{"bytes": ..., "path": ...}``) gives its bytes.
    """
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes | bytearray | memoryview):
        return BYTES_PREFIX + base64.b64encode(bytes(value)).decode("ascii")
    if not isinstance(value, str) or not value.strip():
        raise ValueError("neither a path, a URL nor encoded bytes")
    if base and "://" not in value and not value.startswith("/"):
        return f"{base.rstrip('/')}/{value}"
    return value


def describe(ref: str) -> str:
    """A reference as an error message names it (bytes by their size, not their content)."""
    if ref.startswith(BYTES_PREFIX):
        return f"<{len(ref) * 3 // 4 - 1} encoded bytes>"
    return repr(ref)


def fetch(ref: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The encoded bytes behind a reference."""
    if ref.startswith(BYTES_PREFIX):
        return base64.b64decode(ref[len(BYTES_PREFIX) :])
    import fsspec

    from actcache.workers.storage import with_retries

    with fsspec.open(ref, "rb", **with_retries(ref, storage_options)) as f:
        data: bytes = f.read()
    return data


def decode_image(data: bytes) -> Any:
    """A PIL image, fully decoded (a truncated file fails here, not in the processor)."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def decode_audio(data: bytes, rate: int | None = None) -> tuple[np.ndarray, int]:
    """(mono float32 samples, sampling rate), resampled to ``rate`` when given."""
    import soundfile

    samples, source_rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    mono = samples.mean(axis=1)
    if rate is None or rate == source_rate:
        return mono.astype(np.float32), int(source_rate)
    return resample(mono, int(source_rate), rate), rate


def resample(samples: np.ndarray, source: int, target: int) -> np.ndarray:
    """Polyphase resampling (scipy), the rational factor reduced by the rates' gcd."""
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(source, target)
    return resample_poly(samples, target // g, source // g).astype(np.float32)


def check_decodes(modality: str, data: bytes) -> None:
    """Raise whatever the decoder raises for bytes that are not a readable image or audio."""
    if modality == "image":
        decode_image(data)
    else:
        decode_audio(data)


def read_checked(
    modality: str, ref: str, where: str, storage_options: dict[str, Any] | None = None
) -> bytes:
    """The bytes behind ``ref``, decoded once to prove them readable; errors name ``where``."""
    try:
        data = fetch(ref, storage_options)
    except FileNotFoundError as e:
        raise InputDataError(
            f"{where}: {modality} file {describe(ref)} does not exist; fix the path (relative "
            "paths resolve against the inputs file's folder) or remove the row"
        ) from e
    except (OSError, ValueError) as e:
        raise InputDataError(
            f"{where}: cannot read {modality} file {describe(ref)} ({e}); fix the path or "
            "remove the row"
        ) from e
    try:
        check_decodes(modality, data)
    except Exception as e:  # PIL and soundfile raise their own error types
        raise InputDataError(
            f"{where}: {modality} file {describe(ref)} is corrupt or not a readable {modality} "
            f"file ({type(e).__name__}); replace it or remove the row"
        ) from e
    return data
