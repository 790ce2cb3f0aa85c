"""Input adapters: the one place that knows the modality of the inputs.

``make_adapter`` picks the adapter from the job's modality (``JobConfig.modality``, the
one place it is derived). Every adapter satisfies ``InputAdapter``: it encodes a unit's
inputs once into per-example model inputs (``Encoded``), says which examples may share a
batch and pads a batch of them (``Batch``), and answers what the rest of the code would
otherwise ask of the modality: the encoder a job runs, its prefix positions, whether
``first`` means anything, and which per-row extras (an image's patch grid) go beside the
rows. Everything past the adapter (capture, pooling, writer, self-check, driver) sees
only that interface.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from actcache.schemas.errors import ConfigError, ModelLoadError
from actcache.schemas.job import JobConfig
from actcache.workers.model import first_line, num_layers, resolve_model_path

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


class InputAdapter(Protocol):
    """What every input adapter (text, image, audio) gives the worker, the self-check and
    the driver; mypy checks that each adapter class satisfies it (``make_adapter``)."""

    modality: str
    """text, image or audio."""
    side: str | None
    """Encoder–decoder models: whose hidden states are stored (None for other models)."""
    max_length: int
    """Sequence positions of the longest example (the manifest's ``max_length``)."""
    padding_side: str
    """The side a batch is padded on; the self-check may switch it."""
    prefix: int
    """Leading positions of every example that are not inputs (class and register tokens):
    ``mean`` leaves them out, the manifest records them."""
    defines_first: bool
    """Whether ``first`` pooling names a meaningful position (a text model's first token, a
    vision encoder's class token; not SigLIP's first patch or an audio frame)."""
    batched_processor: bool
    """Whether ``encode`` runs its processor over many inputs in one call, a choice the
    self-check proves exact (or undoes) by encoding each input alone."""

    @property
    def padding_sides(self) -> tuple[str, ...]:
        """Sides this adapter can pad on, the one in use first (the self-check tries them)."""
        ...

    @property
    def row_extras(self) -> tuple[str, ...]:
        """Keys of ``Encoded.extra`` that hold one value per row for the store (an image's
        patch grid)."""
        ...

    @property
    def description(self) -> str:
        """The tokenizer or processor, as the manifest names it."""
        ...

    def encoder_config(self, config: Any) -> Any:
        """The config of the encoder the job runs (a two-tower model's image tower)."""
        ...

    def encoder(self, model: Any) -> Any:
        """The module the job runs, set up to keep every position (see workers/vision.py)."""
        ...

    def render(self, value: Any) -> str | None:
        """The input as the model sees it, when that differs from the stored input."""
        ...

    def encode(self, inputs: Sequence[Any]) -> Encoded:
        ...

    def batch(self, examples: Sequence[dict[str, Any]]) -> Batch:
        ...

    def batch_key(self, example: dict[str, Any]) -> Any:
        """Only examples with equal keys share a batch (None: any may)."""
        ...


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
    side: str | None = None
    """Encoder–decoder models: whose hidden states are stored."""
    prefix = 0
    defines_first = True
    row_extras: tuple[str, ...] = ()
    # Tokenizers encode every text on its own; batching them is not a choice to check.
    batched_processor = False

    def __init__(
        self,
        name: str,
        *,
        revision: str | None = None,
        trust_remote_code: bool = False,
        max_length: int | None = None,
        truncation_side: str = "right",
        model_config: Any = None,
        chat: dict[str, Any] | None = None,
        decoder_prompt: str | None = None,
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
        self.chat = chat
        if chat is not None and not self.tokenizer.chat_template:
            raise ConfigError(
                f"the tokenizer of {name!r} has no chat template; remove `chat_template: true` "
                "from the job, or use a model whose tokenizer has one"
            )
        self.decoder_ids = (
            None if decoder_prompt is None else self._decoder_ids(model_config, decoder_prompt)
        )

    @property
    def padding_side(self) -> str:
        return str(self.tokenizer.padding_side)

    @padding_side.setter
    def padding_side(self, side: str) -> None:
        self.tokenizer.padding_side = side

    @property
    def padding_sides(self) -> tuple[str, ...]:
        side = self.padding_side
        return side, "left" if side == "right" else "right"

    @property
    def description(self) -> str:
        return f"{type(self.tokenizer).__name__}({self.tokenizer.name_or_path})"

    def encoder_config(self, config: Any) -> Any:
        return config

    def encoder(self, model: Any) -> Any:
        return model

    def model_limit(self, config: Any) -> int:
        limits = [int(self.tokenizer.model_max_length)]
        for attr in ("max_position_embeddings", "n_positions"):
            value = getattr(config, attr, None)
            if isinstance(value, int):
                limits.append(value)
        usable = [v for v in limits if 0 < v < _NO_LIMIT]
        return min(usable) if usable else 512

    def _decoder_ids(self, config: Any, prompt: str) -> list[int]:
        start = getattr(config, "decoder_start_token_id", None)
        if start is None:
            raise ConfigError(
                f"{type(config).__name__} names no decoder_start_token_id; the decoder side "
                "needs one: set it in the model's config.json"
            )
        return [int(start), *self.tokenizer(prompt, add_special_tokens=False)["input_ids"]]

    def render(self, text: Any) -> str | None:
        """The text as the model sees it when a chat template reshapes it, else None."""
        if self.chat is None:
            return None
        messages = []
        if self.chat.get("system_prompt"):
            messages.append({"role": "system", "content": self.chat["system_prompt"]})
        messages.append({"role": "user", "content": text})
        return str(self.tokenizer.apply_chat_template(
            messages, tokenize=False,
            add_generation_prompt=bool(self.chat.get("add_generation_prompt")),
        ))

    def _tokenize(self, inputs: Sequence[Any], **kwargs: Any) -> dict[str, list[list[int]]]:
        if self.chat is not None:
            # The template writes the special tokens itself (as apply_chat_template does).
            texts = [self.render(t) for t in inputs]
            out = self.tokenizer(texts, add_special_tokens=False, **kwargs)
        elif inputs and not isinstance(inputs[0], str):
            out = self.tokenizer([a for a, _ in inputs], [b for _, b in inputs],
                                 add_special_tokens=True, **kwargs)
        else:
            out = self.tokenizer(list(inputs), add_special_tokens=True, **kwargs)
        return {
            k: list(v)
            for k, v in out.items()
            if k != "attention_mask" and (self.accepted is None or k in self.accepted)
        }

    def encode(self, inputs: Sequence[Any]) -> Encoded:
        full = self._tokenize(inputs, truncation=False)
        lengths = [len(ids) for ids in full["input_ids"]]
        truncated = [n > self.max_length for n in lengths]
        if any(truncated):
            full = self._tokenize(inputs, truncation=True, max_length=self.max_length)
            lengths = [len(ids) for ids in full["input_ids"]]
        if self.decoder_ids is not None:
            # The decoder side stores the positions of the fixed decoder prompt.
            lengths = [len(self.decoder_ids)] * len(lengths)
        return Encoded(_rows(full), lengths, truncated)

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
        if self.decoder_ids is None:
            return Batch(padded, padded["attention_mask"].bool())
        ids = torch.tensor([self.decoder_ids] * len(examples))
        return Batch({**padded, "decoder_input_ids": ids}, torch.ones_like(ids, dtype=torch.bool))

    def batch_key(self, example: dict[str, Any]) -> Any:
        """Any texts share a batch: padding is masked (and checked by the self-check)."""
        return None


def _rows(columns: dict[str, list[list[int]]]) -> list[dict[str, Any]]:
    keys = list(columns)
    return [dict(zip(keys, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def model_side(job: JobConfig, config: Any) -> str | None:
    """Whose hidden states an encoder–decoder model stores (None for other models)."""
    side = job.side
    if getattr(config, "is_encoder_decoder", False):
        return str(side or "encoder")
    if side is not None:
        raise ConfigError(
            f"model {job.model!r} ({getattr(config, 'model_type', '?')}) is not an "
            f"encoder–decoder model, so it has no {side} side; remove `side` from the job"
        )
    return None


def side_layers(config: Any, side: str | None) -> int:
    """Blocks on the stored side: hidden-state indices run 0..this."""
    if side == "decoder":
        for attr in ("num_decoder_layers", "decoder_layers"):
            value = getattr(config, attr, None)
            if isinstance(value, int):
                return value
    return num_layers(config)


def make_adapter(job: JobConfig, config: Any, max_length: int | None,
                 truncation_side: str, storage_options: dict[str, Any] | None = None
                 ) -> InputAdapter:
    """The adapter for the job's input column: text here, images and audio in their modules.

    ``storage_options`` reach image and audio files at fsspec URLs.
    """
    side = model_side(job, config)
    modality = job.modality
    media: dict[str, Any] = {
        "revision": job.revision,
        "trust_remote_code": job.trust_remote_code,
        "max_length": max_length,
        "model_config": config,
        "storage_options": storage_options,
    }
    adapter: InputAdapter
    if modality != "text":
        if side == "decoder":
            raise ConfigError("an image or audio job caches the encoder; remove `side: decoder`")
        if modality == "image":
            from actcache.workers.vision import ImageAdapter

            adapter = ImageAdapter(job.model, **media)
        else:
            from actcache.workers.audio import AudioAdapter

            adapter = AudioAdapter(job.model, truncation_side=truncation_side, **media)
        adapter.side = side
        return adapter
    chat = None
    if job.chat_template:
        chat = {"system_prompt": job.system_prompt,
                "add_generation_prompt": job.add_generation_prompt}
    adapter = TextAdapter(
        job.model,
        revision=job.revision,
        trust_remote_code=job.trust_remote_code,
        max_length=max_length,
        truncation_side=truncation_side,
        model_config=config,
        chat=chat,
        decoder_prompt=job.decoder_prompt if side == "decoder" else None,
    )
    adapter.side = side
    return adapter
