"""Loading a Hugging Face model and finding what the store needs to know about it."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from actcache.schemas.errors import LayerNotFoundError, ModelLoadError

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


PACKAGE_SCHEME = "pkg://"


def resolve_model_path(name: str) -> str:
    """A local folder for ``pkg://package/sub/folder`` (a model shipped inside a Python package).

    Any other name is returned as it is: a local folder or a hub id.
    """
    if not name.startswith(PACKAGE_SCHEME):
        return name
    package, _, sub = name[len(PACKAGE_SCHEME) :].partition("/")
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model {name!r}: Python package {package!r} is not installed; install it "
            "(e.g. `pip install actcache[demo]`) or give a model folder"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / sub
    if not folder.is_dir():
        raise ModelLoadError(f"model {name!r}: package {package!r} has no folder {sub!r}")
    return str(folder)


def load_config(name: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The model's config, from a local folder or the local hub cache; never downloads."""
    from transformers import AutoConfig

    path = resolve_model_path(name)
    if name.startswith((".", "/")) and not os.path.isdir(path):
        raise ModelLoadError(f"model folder {name!r} does not exist; fix `model` in the job")
    if not os.path.isdir(path):
        _require_cached(name, revision)
    try:
        return AutoConfig.from_pretrained(
            path, revision=revision, trust_remote_code=trust_remote_code, **_offline(path)
        )
    except Exception as e:  # transformers raises OSError/ValueError/EnvironmentError variants
        raise ModelLoadError(
            f"cannot load model {name!r}: {first_line(e)}; give a local model folder "
            "(with config.json) or a hub id already in the local cache"
        ) from e


def _require_cached(name: str, revision: str | None) -> None:
    """A hub id must already be in the local cache: nothing is downloaded at run time."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        found = try_to_load_from_cache(name, "config.json", revision=revision)
    except HFValidationError:
        raise ModelLoadError(
            f"model {name!r} is neither a local folder nor a hub id (org/name); fix `model` "
            "in the job"
        ) from None
    if not isinstance(found, str):
        at = f" at revision {revision!r}" if revision else ""
        raise ModelLoadError(
            f"model {name!r}{at} is not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and actcache never downloads: put it there with "
            f"`hf download {name}{' --revision ' + revision if revision else ''}` "
            "(or set HF_HUB_CACHE to a cache that has it), or give a local model folder"
        )


def _offline(name: str) -> dict[str, Any]:
    # A local folder never needs the hub; for hub ids only the local cache is consulted.
    return {} if os.path.isdir(name) else {"local_files_only": True}


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _config_int(config: Any, attrs: tuple[str, ...], what: str) -> int:
    """The first int among ``attrs`` of the config (or of its ``text_config``)."""
    for attr in attrs:
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    text_config = getattr(config, "text_config", None)
    if text_config is not None:
        return _config_int(text_config, attrs, what)
    raise ModelLoadError(f"cannot tell {what} of {type(config).__name__}")


def num_layers(config: Any) -> int:
    """Blocks in the model (hidden-state indices run 0..this)."""
    return _config_int(config, ("num_hidden_layers", "n_layer", "num_layers"), "the layer count")


def hidden_size(config: Any) -> int:
    """Width of the hidden states."""
    return _config_int(config, ("hidden_size", "n_embd", "d_model"), "the hidden size")


def resolve_layers(requested: str | Sequence[int], n_layers: int) -> tuple[int, ...]:
    """Non-negative, sorted hidden-state indices; negatives count from the end."""
    count = n_layers + 1
    if requested == "all":
        return tuple(range(count))
    resolved: list[int] = []
    for layer in requested:
        layer = int(layer)
        index = layer + count if layer < 0 else layer
        if not 0 <= index < count:
            raise LayerNotFoundError(
                f"layer {layer} is out of range: the model has {n_layers} blocks, so layers "
                f"run 0..{n_layers} (or -{count}..-1); fix `layers` in the job"
            )
        resolved.append(index)
    if len(set(resolved)) != len(resolved):
        raise LayerNotFoundError(f"layers {list(requested)} name the same layer twice")
    return tuple(sorted(resolved))


def weights_fingerprint(name: str, revision: str | None = None) -> tuple[str, str | None]:
    """(sha256 fingerprint of the weight files, resolved hub commit or None).

    The fingerprint covers each weight file's name, size and first and last MiB: cheap on
    multi-GB checkpoints, and it changes whenever the weights are replaced.
    """
    folder, commit = _model_folder(resolve_model_path(name), revision)
    digest = hashlib.sha256()
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix in _WEIGHT_SUFFIXES)
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder)}:{size}".encode())
        with path.open("rb") as f:
            digest.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                digest.update(f.read())
    return digest.hexdigest(), commit


def _model_folder(name: str, revision: str | None) -> tuple[str, str | None]:
    if os.path.isdir(name):
        return name, None
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(name, revision=revision, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"model {name!r} is not in the local cache: {first_line(e)}") from e
    return folder, Path(folder).name


def block_list(model: Any, n_layers: int) -> Any | None:
    """The ModuleList of transformer blocks (``h``, ``encoder.layer``, ``layers`` ...)."""
    import torch

    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return module
    return None
