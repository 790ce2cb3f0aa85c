"""Input adapters: the one place that knows the modality of the inputs.

A text adapter turns strings into token ids; a vision adapter (next) will turn image
paths or bytes into pixel values, and "tokens" then means patches. Everything past the
adapter only sees ``lengths`` (sequence positions per example) and padded batches with
an attention mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from actcache.schemas.errors import ModelLoadError
from actcache.workers.model import first_line, resolve_model_path

# Tokenizers report "no limit" as a huge sentinel; beyond this we use the model config.
_NO_LIMIT = 1_000_000


@dataclass(frozen=True)
class Encoded:
    """A unit's inputs, encoded once: per-example token ids and whether each was cut."""

    input_ids: list[list[int]]
    truncated: list[bool]

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


class TextAdapter:
    """Tokenizes a text column; pads batches on the tokenizer's own padding side."""

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

    @property
    def padding_side(self) -> str:
        return str(self.tokenizer.padding_side)

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

    def encode(self, texts: Sequence[str]) -> Encoded:
        full = self.tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
        if all(len(ids) <= self.max_length for ids in full):
            return Encoded(list(full), [False] * len(full))
        cut = self.tokenizer(
            list(texts), add_special_tokens=True, truncation=True, max_length=self.max_length
        )["input_ids"]
        return Encoded(list(cut), [len(a) > self.max_length for a in full])

    def batch(self, input_ids: Sequence[Sequence[int]]) -> dict[str, Any]:
        """Padded tensors for a batch of encoded examples."""
        return dict(
            self.tokenizer.pad(
                {"input_ids": [list(ids) for ids in input_ids]},
                padding=True,
                return_tensors="pt",
                return_attention_mask=True,
            )
        )
