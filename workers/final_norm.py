"""The model's final norm, for ``final_norm: true`` jobs.

``hidden_states[-1]`` is not ``last_hidden_state`` for most vision encoders: only the
latter carries the final layer norm. A ``final_norm`` job applies that norm to every
stored layer, as DINOv2's and timm's intermediate-layer APIs do. Where the norm sits
is a fact of each architecture, listed here; a model type not listed is refused rather
than guessed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from actcache.schemas.errors import ConfigError

#: model_type -> (attribute paths of the final norm, tried in order; whether the model's
#: own ``hidden_states[-1]`` already carries it, so the last layer is left as it is).
FINAL_NORMS: dict[str, tuple[tuple[str, ...], bool]] = {
    "vit": (("layernorm",), False),
    "vit_mae": (("layernorm",), False),
    "vit_msn": (("layernorm",), False),
    "deit": (("layernorm",), False),
    "dinov2": (("layernorm",), False),
    "dinov2_with_registers": (("layernorm",), False),
    "ijepa": (("layernorm",), False),
    "clip_vision_model": (("vision_model.post_layernorm", "post_layernorm"), False),
    "clip": (("post_layernorm",), False),
    "siglip_vision_model": (("vision_model.post_layernorm", "post_layernorm"), False),
    "siglip": (("post_layernorm",), False),
    "whisper": (("layer_norm",), True),
    # Only the "stable layer norm" variants end with a norm; the others norm first.
    "wav2vec2": (("encoder.layer_norm",), False),
    "hubert": (("encoder.layer_norm",), False),
    "wavlm": (("encoder.layer_norm",), False),
}
_NORM_FIRST = ("wav2vec2", "hubert", "wavlm")


def check_final_norm(config: Any) -> None:
    """Refuse a ``final_norm`` job for a model without a known final norm (before any run)."""
    model_type = str(getattr(config, "model_type", ""))
    if model_type in _NORM_FIRST and not getattr(config, "do_stable_layer_norm", False):
        raise ConfigError(
            f"this {model_type} model norms before its blocks, not after: it has no final "
            "norm to apply; remove `final_norm`"
        )
    if model_type not in FINAL_NORMS:
        raise ConfigError(
            f"actcache does not know where the final norm of a {model_type!r} model sits "
            f"(known: {', '.join(sorted(FINAL_NORMS))}); remove `final_norm`"
        )


def final_norm(model: Any, config: Any, n_layers: int) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """``apply(layer, states)``: the model's final norm applied to one layer's states."""
    check_final_norm(config)
    model_type = str(getattr(config, "model_type", ""))
    paths, last_has_it = FINAL_NORMS[model_type]
    norm = next((m for m in (_get(model, p) for p in paths) if m is not None), None)
    if norm is None:
        raise ConfigError(f"the {model_type} model has no module {paths[0]!r}; remove `final_norm`")

    def apply(layer: int, states: torch.Tensor) -> torch.Tensor:
        if last_has_it and layer == n_layers:
            return states
        out: torch.Tensor = norm(states)
        return out

    return apply


def _get(model: Any, path: str) -> Any:
    for part in path.split("."):
        model = getattr(model, part, None)
        if model is None:
            return None
    return model
