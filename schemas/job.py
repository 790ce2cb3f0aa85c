"""The caching job: what a ``job.yaml`` holds.

Defaults live here and nowhere else (the CLI's options default to None, meaning "the
schema's"). Small frozen models, a docstring under every field.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import Field, field_validator, model_validator

from actcache.schemas._base import Frozen
from actcache.schemas._fields import layers_value, names_value


class Pooling(StrEnum):
    """How the token states of one example become stored rows."""

    MEAN = "mean"
    """Mean over non-padding tokens."""
    LAST = "last"
    """The last non-padding token, whatever the padding side."""
    FIRST = "first"
    """The first non-padding token."""
    MAX = "max"
    """Element-wise max over non-padding tokens."""
    TOKENS = "tokens"
    """Every non-padding token (variable length; offsets locate each example)."""


class StorageDtype(StrEnum):
    """The dtype activations are stored in."""

    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"


class ModelDtype(StrEnum):
    """The dtype of the forward pass."""

    AUTO = "auto"
    """The checkpoint's own dtype (the manifest records which one it was)."""
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


class JobConfig(Frozen):
    """One caching job: a model, its inputs, where to store which layers and poolings."""

    model: str = Field(min_length=1)
    """A local model folder, or a hub id already in the local cache (nothing downloads)."""
    revision: str | None = None
    """The hub revision (branch, tag or commit) when ``model`` is a hub id."""
    trust_remote_code: bool = False
    """Allow model code shipped with the weights to run. Off unless you trust the source."""

    inputs: str = Field(min_length=1)
    """A jsonl, csv or parquet file at any fsspec URL (relative to the YAML's folder)."""
    text_column: str = "text"
    """The input column fed to the model."""
    id_column: str | None = None
    """The column holding example ids; None numbers the rows "0", "1", ..."""
    image_column: str | None = None
    """An image job: the column holding a path, an fsspec URL or encoded bytes per row
    (PNG/JPEG/TIFF...). With a folder as ``inputs`` (class subfolders), the column name
    is only a label: ids are relative paths, ``label`` is the subfolder's name."""
    audio_column: str | None = None
    """An audio job: like ``image_column`` (WAV/FLAC...), decoded to mono and resampled to
    the feature extractor's rate."""
    final_norm: bool = False
    """Apply the model's final norm (the one ``last_hidden_state`` carries) to every stored
    layer, as DINOv2's and timm's intermediate-layer APIs do."""
    last_layer: Literal["hidden_states", "block"] = "hidden_states"
    """What the last layer (index L, or -1) stores. ``hidden_states``: the model's own last
    hidden state, ``hidden_states[-1]``, which in decoders (GPT-2, Llama...) and T5 is the
    output of the final norm. ``block``: the last block's own output, the residual stream
    before any final norm, as every other layer is."""
    text_pair_column: str | None = None
    """A second text column passed to the tokenizer as the pair (NLI, paraphrase probing)."""
    chat_template: bool = False
    """Render each text as a user turn through the tokenizer's own chat template."""
    system_prompt: str | None = None
    """With ``chat_template``: a system turn put before each user turn."""
    add_generation_prompt: bool = False
    """With ``chat_template``: end the rendering with the assistant's turn opener."""
    side: Literal["encoder", "decoder"] | None = None
    """Encoder–decoder models only: whose hidden states to cache; None = the encoder's."""
    decoder_prompt: str = ""
    """With ``side: decoder``: the fixed decoder input after the decoder start token."""

    store: str = Field(min_length=1)
    """Where the Zarr store goes: a local path, s3://bucket/prefix, memory://name ..."""

    layers: Literal["all"] | tuple[int, ...] = "all"
    """Hidden-state indices: 0 = embedding output, i = output of block i, negatives from the end."""
    pooling: tuple[Pooling, ...] = (Pooling.MEAN,)
    """One or more poolings, each stored separately."""
    dtype: StorageDtype = StorageDtype.FLOAT16
    """Storage dtype. float16 refuses values beyond ±65504; bfloat16 round-trips exactly."""
    model_dtype: ModelDtype = ModelDtype.AUTO
    """Dtype of the forward pass; auto = the checkpoint's own, resolved before the store is made."""
    quantize: Literal["8bit", "4bit"] | None = None
    """Load the weights in 8 or 4 bits (bitsandbytes; needs CUDA). Values then differ from the
    unquantised model's; recorded in the manifest."""

    batch_size: int = Field(default=32, ge=1)
    """Examples per forward pass (batches are length-sorted inside a unit)."""
    max_length: int | None = Field(default=None, ge=1)
    """Tokens kept per example; None = the model's own limit. Longer inputs are truncated."""
    truncation_side: Literal["right", "left"] = "right"
    """Which end of a too-long input is cut off; every cut is counted in the manifest."""
    workers: int | None = Field(default=None, ge=1)
    """Number of actors. None = one per GPU in the cluster, or one on a CPU-only cluster."""
    gpus_per_worker: float | None = Field(default=None, gt=0)
    """GPUs each actor reserves; above 1 (a whole number) the model is split across them.
    None = 1 on a GPU cluster. A fraction packs several actors onto one GPU."""
    offload: bool = False
    """Let weights that do not fit the actor's GPUs live on the CPU or disk (slow, and said
    so in the progress line). Off: a model that does not fit is an error."""
    cpus_per_worker: int | None = Field(default=None, ge=1)
    """CPU slots each actor takes; None = the cluster's CPUs shared among the actors."""
    rows_per_unit: int = Field(default=1024, ge=1)
    """Rows per work unit: the unit of work, of commit and of resume (one shard per array)."""
    store_inputs: bool = True
    """Keep each row's model input (its text) in the store, so query results can show it.
    False for data that must not be copied: ``rows/input`` then stays empty."""

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v: object) -> object:
        return layers_value(v)

    @field_validator("pooling", mode="before")
    @classmethod
    def _pooling(cls, v: object) -> object:
        return names_value(v, (p.value for p in Pooling), "pooling")

    @model_validator(mode="after")
    def _cross(self) -> JobConfig:
        if not self.pooling:
            raise ValueError("`pooling` must name at least one pooling")
        if len(set(self.pooling)) != len(self.pooling):
            raise ValueError("`pooling` names a pooling twice")
        if self.layers != "all" and len(set(self.layers)) != len(self.layers):
            raise ValueError("`layers` names a layer twice")
        if self.layers != "all" and not self.layers:
            raise ValueError("`layers` is empty: give 'all' or at least one index")
        if self.image_column is not None and self.audio_column is not None:
            raise ValueError("give `image_column` or `audio_column`, not both")
        if not self.chat_template and (self.system_prompt or self.add_generation_prompt):
            raise ValueError("`system_prompt` and `add_generation_prompt` need `chat_template: true`")
        if self.chat_template and self.text_pair_column:
            raise ValueError("`chat_template` and `text_pair_column` cannot be combined")
        if self.decoder_prompt and self.side != "decoder":
            raise ValueError("`decoder_prompt` needs `side: decoder`")
        if self.final_norm and self.last_layer == "block":
            raise ValueError("`final_norm: true` puts the final norm on every layer and "
                             "`last_layer: block` keeps it off the last one: choose one")

        if self.gpus_per_worker and self.gpus_per_worker > 1 and self.gpus_per_worker % 1:
            raise ValueError("`gpus_per_worker` above 1 must be a whole number of GPUs")
        return self

    @property
    def modality(self) -> str:
        """text, image or audio: which input column the job names."""
        if self.image_column is not None:
            return "image"
        return "audio" if self.audio_column is not None else "text"

    @property
    def input_column(self) -> str:
        """The column fed to the model."""
        return self.image_column or self.audio_column or self.text_column


#: Fields that shape the stored values: a job differing in any of them is refused
#: against an existing store unless the user asks to overwrite.
SHAPING_FIELDS: tuple[str, ...] = (
    "model",
    "revision",
    "layers",
    "pooling",
    "dtype",
    "model_dtype",
    "quantize",
    "max_length",
    "truncation_side",
    "text_column",
    "id_column",
    "rows_per_unit",
    "image_column",
    "audio_column",
    "final_norm",
    "last_layer",
    "text_pair_column",
    "chat_template",
    "system_prompt",
    "add_generation_prompt",
    "side",
    "decoder_prompt",
)
