"""Input adapters: the one place that knows the modality of the inputs.

``make_adapter`` picks the adapter from the job's input column. An adapter encodes a
unit's inputs once into per-example model inputs (``Encoded``) and pads a batch of them
(``Batch``). Everything past the adapter (capture, pooling, writer, self-check) sees only
``Encoded.lengths`` and ``Batch``: forward kwargs, a mask of the positions that belong to
each example, and the number of leading prefix positions that ``mean`` leaves out.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from actcache.schemas.errors import ModelLoadError
from actcache.workers.model import first_line, resolve_model_path

# Tokenizers report "no limit" as a huge sentinel; beyond this we use the model config.
_NO_LIMIT = 1_000_000


@dataclass(frozen=True)
class Encoded:
    """A unit's inputs, encoded once.

    ``examples[i]`` is everything the model needs for example i, unpadded; ``lengths[i]``
    the sequence positions stored for it under ``tokens``; ``truncated[i]`` whether its
    input was cut; ``extra`` what an adapter records beside (e.g. a rendered prompt).
    """

    examples: list[dict[str, Any]]
    lengths: list[int]
    truncated: list[bool]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Batch:
    """Padded forward kwargs, and which hidden-state positions belong to which example.

    ``mask[i, t]`` is True where position t of the hidden states belongs to example i;
    ``prefix`` leading positions of each example (class, register tokens) are left out of
    ``mean``.
    """

    inputs: dict[str, torch.Tensor]
    mask: torch.Tensor
    prefix: int = 0

    def to(self, device: torch.device) -> Batch:
        inputs = {k: v.to(device) for k, v in self.inputs.items()}
        return Batch(inputs, self.mask.to(device), self.prefix)


def forward_parameters(config: Any) -> set[str] | None:
    """Named parameters of the forward of ``AutoModel``'s class for ``config``.

    None when the class is not known here (remote code): then nothing is filtered.
    """
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        cls: Any = MODEL_MAPPING[type(config)]
    except (KeyError, ValueError):
        return None
    params = inspect.signature(cls.forward).parameters.values()
    return {
        p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"
    }


class TextAdapter:
    """Tokenizes a text column; pads batches on the tokenizer's own padding side.

    Every tokenizer output the model's forward accepts (``input_ids``, ``token_type_ids``
    ...) travels with each example, so a batch sees what ``model(**tokenizer(text))`` sees.
    """

    modality = "text"

    def __init__(
        self,
        name: str,
        *,
        revision: str | None = None,
        trust_remote_code: bool = False,
        max_length: int | None = None,
        truncation_side: str = "right",
        model_config: Any = None,
    ) -> None:
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                resolve_model_path(name),
                revision=revision,
                trust_remote_code=trust_remote_code,
                local_files_only=True,
            )
        except Exception as e:
            raise ModelLoadError(
                f"cannot load a tokenizer for {name!r}: {first_line(e)}; "
                "the model folder needs its tokenizer files"
            ) from e
        if self.tokenizer.pad_token is None:
            # Decoder-only models often ship without a pad token; padding positions are masked
            # out of every pooling, so any token id serves.
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.tokenizer.truncation_side = truncation_side
        self.max_length = max_length or self.model_limit(model_config)
        self.accepted = forward_parameters(model_config) if model_config is not None else None

    @property
    def padding_side(self) -> str:
        return str(self.tokenizer.padding_side)

    @padding_side.setter
    def padding_side(self, side: str) -> None:
        self.tokenizer.padding_side = side

    @property
    def description(self) -> str:
        return f"{type(self.tokenizer).__name__}({self.tokenizer.name_or_path})"

    def model_limit(self, config: Any) -> int:
        limits = [int(self.tokenizer.model_max_length)]
        for attr in ("max_position_embeddings", "n_positions"):
            value = getattr(config, attr, None)
            if isinstance(value, int):
                limits.append(value)
        usable = [v for v in limits if 0 < v < _NO_LIMIT]
        return min(usable) if usable else 512

    def _tokenize(self, texts: Sequence[str], **kwargs: Any) -> dict[str, list[list[int]]]:
        out = self.tokenizer(list(texts), add_special_tokens=True, **kwargs)
        return {
            k: list(v)
            for k, v in out.items()
            if k != "attention_mask" and (self.accepted is None or k in self.accepted)
        }

    def encode(self, inputs: Sequence[Any]) -> Encoded:
        full = self._tokenize(inputs, truncation=False)
        lengths = [len(ids) for ids in full["input_ids"]]
        if all(n <= self.max_length for n in lengths):
            return Encoded(_rows(full), lengths, [False] * len(lengths))
        cut = self._tokenize(inputs, truncation=True, max_length=self.max_length)
        return Encoded(
            _rows(cut),
            [len(ids) for ids in cut["input_ids"]],
            [n > self.max_length for n in lengths],
        )

    def batch(self, examples: Sequence[dict[str, Any]]) -> Batch:
        """Padded tensors for a batch of encoded examples (every key padded alike)."""
        padded = dict(
            self.tokenizer.pad(
                [dict(e) for e in examples],
                padding=True,
                return_tensors="pt",
                return_attention_mask=True,
            )
        )
        return Batch(padded, padded["attention_mask"].bool())


def _rows(columns: dict[str, list[list[int]]]) -> list[dict[str, Any]]:
    keys = list(columns)
    return [dict(zip(keys, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def make_adapter(job: dict[str, Any], config: Any, max_length: int | None,
                 truncation_side: str, storage_options: dict[str, Any] | None = None) -> Any:
    """The adapter for the job's input column: text here, images and audio in their modules.

    ``storage_options`` reach image and audio files at fsspec URLs.
    """
    common = {
        "revision": job.get("revision"),
        "trust_remote_code": bool(job.get("trust_remote_code")),
        "max_length": max_length,
        "model_config": config,
    }
    if job.get("image_column") is not None:
        from actcache.workers.vision import ImageAdapter

        return ImageAdapter(job["model"], storage_options=storage_options, **common)
    if job.get("audio_column") is not None:
        from actcache.workers.audio import AudioAdapter

        return AudioAdapter(job["model"], truncation_side=truncation_side,
                            storage_options=storage_options, **common)
    return TextAdapter(job["model"], truncation_side=truncation_side, **common)
