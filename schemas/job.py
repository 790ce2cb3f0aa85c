"""The caching job: what a ``job.yaml`` holds.

Defaults live here and nowhere else (the CLI's options default to None, meaning "the
schema's"). Small frozen models, a docstring under every field.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=False)


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

    store: str = Field(min_length=1)
    """Where the Zarr store goes: a local path, s3://bucket/prefix, memory://name ..."""

    layers: Literal["all"] | tuple[int, ...] = "all"
    """Hidden-state indices: 0 = embedding output, i = output of block i, negatives from the end."""
    pooling: tuple[Pooling, ...] = (Pooling.MEAN,)
    """One or more poolings, each stored separately."""
    dtype: StorageDtype = StorageDtype.FLOAT16
    """Storage dtype. float16 refuses values beyond ±65504; bfloat16 round-trips exactly."""
    model_dtype: ModelDtype = ModelDtype.FLOAT32
    """Dtype of the forward pass."""

    batch_size: int = Field(default=32, ge=1)
    """Examples per forward pass (batches are length-sorted inside a unit)."""
    max_length: int | None = Field(default=None, ge=1)
    """Tokens kept per example; None = the model's own limit. Longer inputs are truncated."""
    truncation_side: Literal["right", "left"] = "right"
    """Which end of a too-long input is cut off; every cut is counted in the manifest."""
    workers: int | None = Field(default=None, ge=1)
    """Number of actors. None = one per GPU in the cluster, or one on a CPU-only cluster."""
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
        return self


#: Fields that shape the stored values: a job differing in any of them is refused
#: against an existing store unless the user asks to overwrite.
SHAPING_FIELDS: tuple[str, ...] = (
    "model",
    "revision",
    "layers",
    "pooling",
    "dtype",
    "model_dtype",
    "max_length",
    "truncation_side",
    "text_column",
    "id_column",
    "rows_per_unit",
)
