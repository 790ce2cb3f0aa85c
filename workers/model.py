"""Loading a Hugging Face model and finding what the store needs to know about it."""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from actcache.schemas.errors import LayerNotFoundError, ModelLoadError
from actcache.schemas.job import JobConfig

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


def _bad_model_files() -> tuple[type[BaseException], ...]:
    """What loading raises for a model folder the user can fix, and nothing else.

    transformers raises ``OSError`` for a missing or unreadable file (config.json that is
    not JSON, no weights), ``ValueError`` for a config it cannot use (no or an unknown
    ``model_type``, code that needs ``trust_remote_code``, inconsistent sizes) and
    ``ImportError`` for a model that needs a package not installed; safetensors raises its
    own error for a truncated or garbled weight file. Anything else (CUDA out of memory, a
    RuntimeError from a bug) is a fault: exit 1, traceback in the log.
    """
    from safetensors import SafetensorError

    return (OSError, ValueError, ImportError, SafetensorError)


def _weights_mismatch(e: RuntimeError) -> bool:
    """Whether torch refused the checkpoint's tensors for the config's shapes: the model
    folder is wrong (a user can fix it), unlike any other RuntimeError."""
    text = str(e)
    return any(m in text for m in ("size mismatch", "Error(s) in loading state_dict",
                                   "ignore_mismatched_sizes"))


PACKAGE_SCHEME = "pkg://"
_LAYER_ATTRS = ("num_hidden_layers", "n_layer", "num_layers")


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
    except _bad_model_files() as e:
        raise ModelLoadError(
            f"cannot load model {name!r}: {first_line(e)}; give a local model folder "
            "(with config.json) or a hub id already in the local cache"
        ) from e


def _require_cached(name: str, revision: str | None) -> None:
    """A hub id must already be in the local cache: nothing is downloaded at run time."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        found = try_to_load_from_cache(name, "config.json", revision=revision)
    except HFValidationError:
        raise _not_a_model(name) from None
    if not isinstance(found, str):
        raise _not_cached(name, revision)


def _not_a_model(name: str) -> ModelLoadError:
    return ModelLoadError(
        f"model {name!r} is neither a local folder nor a hub id (org/name); fix `model` "
        "in the job"
    )


def _not_cached(name: str, revision: str | None) -> ModelLoadError:
    from huggingface_hub import constants

    at = f" at revision {revision!r}" if revision else ""
    return ModelLoadError(
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
    return _config_int(config, _LAYER_ATTRS, "the layer count")


def _layer_owner(config: Any) -> Any:
    """The config (itself or its ``text_config``) that holds the layer count."""
    for attr in _LAYER_ATTRS:
        if isinstance(getattr(config, attr, None), int):
            return config
    text_config = getattr(config, "text_config", None)
    return _layer_owner(text_config) if text_config is not None else config


#: Lists as long as the layer count that are not per layer.
_NOT_PER_LAYER = frozenset({"architectures"})


def depth_needed(layers: Sequence[int], n_layers: int) -> int:
    """Blocks to build for hidden-state indices ``layers``: up to the deepest, at least one."""
    return min(n_layers, max(max(layers), 1))


def cut_config(config: Any, depth: int) -> Any:
    """A copy of ``config`` describing the model's first ``depth`` blocks only.

    The layer count and every per-layer list (``layer_types``, ``attention_layers`` ...)
    are cut, so the model built from it has no weights past block ``depth``.
    """
    n_layers = num_layers(config)
    if depth >= n_layers:
        return config
    config = copy.deepcopy(config)
    owner = _layer_owner(config)
    for key, value in list(vars(owner).items()):
        if isinstance(value, list | tuple) and len(value) == n_layers and key not in _NOT_PER_LAYER:
            setattr(owner, key, type(value)(value[:depth]))
    for attr in _LAYER_ATTRS:
        if isinstance(getattr(owner, attr, None), int):
            setattr(owner, attr, depth)
            break
    return config


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


def model_folder(name: str, revision: str | None = None) -> str:
    """The local folder holding the model's files."""
    return _model_folder(resolve_model_path(name), revision)[0]


def resolve_model_dtype(name: str, revision: str | None, trust_remote_code: bool, dtype: str) -> str:
    """``dtype``, or for ``auto`` the checkpoint's own (float32 when it cannot be told)."""
    if dtype != "auto":
        return dtype
    from actcache.workers.placement import checkpoint_dtype

    config = load_config(name, revision, trust_remote_code)
    return checkpoint_dtype(config, model_folder(name, revision))


def _model_folder(name: str, revision: str | None) -> tuple[str, str | None]:
    if os.path.isdir(name):
        return name, None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(name, revision=revision, local_files_only=True)
    except HFValidationError:
        raise _not_a_model(name) from None
    except LocalEntryNotFoundError as e:
        # What an offline lookup raises for a model (or revision) the cache lacks; any
        # other failure (a permission error in the cache, a bug) is a fault, not a miss.
        raise _not_cached(name, revision) from e
    return folder, Path(folder).name


def block_list(model: Any, n_layers: int) -> Any | None:
    """The ModuleList of transformer blocks (``h``, ``encoder.layer``, ``layers`` ...)."""
    import torch

    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return module
    return None


def load_model(
    name: str, job: JobConfig, depth: int | None = None, gpus: Sequence[int] = ()
) -> Any:
    """The model in eval mode, built with its first ``depth`` blocks only (all when None).

    Weights past block ``depth`` are neither read nor held. Without ``gpus`` it lives on
    the CPU; with them it is placed by ``device_map`` over those GPUs (see placement.py).
    """
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    from actcache.workers import placement
    from actcache.workers.dtypes import torch_dtype

    revision, trust = job.revision, job.trust_remote_code
    config = load_config(name, revision, trust)
    if depth is not None:
        config = cut_config(config, depth)
    dtype = torch_dtype(resolve_model_dtype(name, revision, trust, job.model_dtype.value))
    kwargs = placement.load_kwargs(name, config, dtype, job, list(gpus))
    # The run reports its own progress; a weight-loading bar per worker is noise.
    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    if depth is not None:
        # The checkpoint's blocks past ``depth`` are reported as unexpected keys: by design.
        hf_logging.set_verbosity_error()
    try:
        model = AutoModel.from_pretrained(
            resolve_model_path(name), config=config, revision=revision,
            trust_remote_code=trust, local_files_only=True, **kwargs,
        )
    except _bad_model_files() as e:
        raise ModelLoadError(
            f"cannot load model {name!r}: {first_line(e)}; fix or replace the model folder"
        ) from e
    except RuntimeError as e:
        if not _weights_mismatch(e):
            raise
        raise ModelLoadError(
            f"cannot load model {name!r}: {first_line(e)}; fix or replace the model folder"
        ) from e
    finally:
        hf_logging.set_verbosity(verbosity)
    if gpus:
        placement.check_placement(model.hf_device_map, name, list(gpus), job.offload)
    return model.eval()


def input_device(model: Any) -> Any:
    """Where inputs go: the device the input embedding runs on (the first GPU of a split model).

    An offloaded embedding keeps its weight off the GPU (on ``meta``) and runs on the
    execution device of its dispatch hook.
    """
    import torch

    try:
        embeddings = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        embeddings = None
    weight = getattr(embeddings, "weight", None)
    if not isinstance(weight, torch.Tensor):
        # Vision and speech encoders embed with a convolution (no token table): their
        # first parameter sits where the input goes.
        return next(model.parameters()).device
    device = getattr(getattr(embeddings, "_hf_hook", None), "execution_device", None)
    return torch.device(device) if device is not None else weight.device
