"""The store's layout and records: key names, the manifest, unit receipts, run records.

Everything here is pure data; the writer (``actcache.workers``) and the reader
(``actcache.store``) share it so the layout is defined in exactly one place. See
docs/STORE.md for the same layout in prose.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from actcache.schemas._base import Frozen
from actcache.schemas.job import JobConfig

FORMAT_VERSION = 3
"""Bumped with any change of layout. 2: crc32c checksums on activation chunks;
``rows/input``, ``rows/valid``, dimension names on every array; manifest keys ``side``,
``self_check``, ``rendered_example``; image and audio stores. 3: packed tokens, one
uncompressed array per unit (``token_unit_key``), ``rows/token_offset`` counted within
the unit. Stores of formats 1 and 2 stay readable (see docs/STORE.md)."""
PACKED_TOKENS_FORMAT = 3
"""The first format whose token arrays are packed, one per unit."""

MANIFEST_ATTR = "actcache"
"""Root-group attribute that holds the manifest."""
RUNS_ATTR = "actcache_runs"
"""Root-group attribute that holds the run history (a list of RunRecord dicts)."""
DTYPE_ATTR = "actcache.dtype"
"""Array attribute naming the logical dtype when it differs from the zarr dtype (bfloat16)."""

ROWS_GROUP = "rows"
IDS_KEY = "rows/ids"
SEQ_KEY = "rows/seq"
HASH_KEY = "rows/hash"
META_KEY = "rows/meta"
TRUNCATED_KEY = "rows/truncated"
TOKEN_OFFSET_KEY = "rows/token_offset"
TOKEN_LENGTH_KEY = "rows/token_length"
GRID_KEY = "rows/grid"
"""Image stores: each row's patch grid (rows, columns), int32 (slots, 2)."""
INPUT_KEY = "rows/input"
"""Format 2: each row's model input (text), '' when the job set ``store_inputs: false``."""
VALID_KEY = "rows/valid"
"""Format 2: True where a slot holds a live row (committed, not superseded), as of the
last run that ended; for readers without actcache."""
ROW_DIM = "row"
"""Dimension name of every row-indexed array (``dimension_names`` in zarr, dims in xarray)."""
UNITS_GROUP = "units"
LEASE_KEY = "lease/zarr.json"


def activation_key(pooling: str, layer: int) -> str:
    """The array holding ``layer`` (non-negative hidden-state index) under ``pooling``."""
    return f"{pooling}/layer_{layer}"


def unit_name(unit: int) -> str:
    """``unit`` zero-padded: the name of its commit marker and of its packed token arrays,
    so that a folder listing sorts in unit order."""
    return f"{unit:08d}"


def unit_key(unit: int) -> str:
    """The commit marker of ``unit``: a zero-length array whose attributes are its receipt."""
    return f"{UNITS_GROUP}/{unit_name(unit)}"


def token_slots_per_unit(rows_per_unit: int, max_length: int) -> int:
    """Formats 1 and 2: token slots reserved per unit in ``tokens/layer_{L}``, so each unit
    owns whole shards of the one token array of a layer."""
    return rows_per_unit * max_length


def token_unit_key(layer: int, unit: int) -> str:
    """Format 3: the array holding exactly the tokens of ``unit`` for ``layer``, rows in
    slot order, each row's tokens contiguous (``rows/token_offset`` counts from 0 here)."""
    return f"{activation_key('tokens', layer)}/{unit_name(unit)}"


MAX_TOKEN_CHUNK = 4096
"""Format 3: positions per chunk of a unit's token array, at most (3 MiB at hidden 384 in
float16): whole chunks are the unit of reading, like the pooled arrays' 1,024 rows."""


def token_chunks(n_tokens: int, limit: int = MAX_TOKEN_CHUNK) -> tuple[int, int]:
    """(chunk, shard) positions of a unit's packed token array: equal chunks of at most
    ``limit`` tiling one shard that covers ``n_tokens`` with less than a chunk count to spare
    (edge chunks are stored whole, so a chunk much larger than the rest would waste disk)."""
    count = max(1, -(-n_tokens // limit))
    chunk = max(1, -(-n_tokens // count))
    return chunk, chunk * count


def packed_tokens(manifest: dict[str, Any]) -> bool:
    """Whether the store keeps one packed token array per unit (format 3 on)."""
    return int(manifest.get("format_version", 1)) >= PACKED_TOKENS_FORMAT


class ModelInfo(Frozen):
    """What was loaded, resolved at planning time."""

    name: str
    """The model as the job named it."""
    revision: str | None = None
    """Resolved hub commit, when the model came from the hub cache."""
    weights_hash: str
    """sha256 fingerprint of the weight files (names, sizes, first and last MiB)."""
    model_type: str
    """``config.model_type`` (bert, gpt2, llama, ...)."""
    num_hidden_layers: int
    """Blocks in the model: hidden-state indices run 0..num_hidden_layers."""
    hidden_size: int
    """Width of every stored row."""
    tokenizer: str
    """Tokenizer (or processor) class and source."""
    padding_side: str
    """The tokenizer's padding side."""


class Manifest(Frozen):
    """The store's manifest: everything that shaped the stored values."""

    format_version: int = FORMAT_VERSION
    """Layout version; see docs/STORE.md."""
    actcache_version: str
    """Version of actcache that created the store."""
    model: ModelInfo
    """The model and tokenizer."""
    layers: tuple[int, ...]
    """Stored hidden-state indices, non-negative, ascending."""
    poolings: tuple[str, ...]
    """Stored poolings."""
    dtype: str
    """Storage dtype: float16, bfloat16 (uint16 bits) or float32."""
    model_dtype: str
    """Dtype of the forward pass."""
    max_length: int
    """Tokens kept per example."""
    truncation_side: str
    """Which end of a long input was cut."""
    text_column: str
    """The input column fed to the model."""
    id_column: str | None
    """The id column, or None for row numbers."""
    rows_per_unit: int
    """Rows per unit (= rows per shard of every row-indexed array)."""
    chunk_rows: int
    """Rows per inner chunk (the unit of reading)."""
    codec: str
    """Compression codec of activation arrays."""
    checksum: str | None = "crc32c"
    """Checksum of every activation chunk (format 2); absent in format 1 stores."""
    n_units: int = 0
    """Units planned so far (complete or not)."""
    truncated: int = 0
    """Inputs cut to max_length, over every complete row."""
    job: dict[str, Any]
    """The job config that created the store (no secrets)."""
    modality: str = "text"
    """text, image or audio: what the input column held."""
    prefix_tokens: int = 0
    """Leading positions of each example that are not patches (class, register tokens):
    ``mean`` leaves them out, ``tokens`` keeps them."""
    final_norm: bool = False
    """Whether the model's final norm was applied to every stored layer."""
    processor_backend: str | None = None
    """The image processors' backend (``pil``), pinned: backends resize differently."""
    side: str | None = None
    """Encoder–decoder models: whose hidden states are stored (encoder or decoder)."""
    self_check: dict[str, Any] | None = None
    """The last run's start-up self-check: inputs compared, padding side and position
    rule chosen, largest relative error of a padded batch against each input alone."""
    rendered_example: str | None = None
    """With ``chat_template``: the first row exactly as the model saw it."""

    @model_validator(mode="before")
    @classmethod
    def _older_formats(cls, data: Any) -> Any:
        # Fields added by a later format take their defaults, except the checksum: a
        # format-1 store has none, which its absence means.
        if isinstance(data, dict) and int(data.get("format_version", FORMAT_VERSION)) < 2:
            data = {"checksum": None, **data}
        return data

    @property
    def store_inputs(self) -> bool:
        """Whether rows keep their model input: the job's ``store_inputs``, or its default
        where the job does not say (written before the field existed)."""
        return bool(self.job.get("store_inputs", JobConfig.model_fields["store_inputs"].default))

    @property
    def job_config(self) -> JobConfig:
        """``job`` typed. A field this actcache added after the store was written takes its
        default (the job ran with that behaviour); one it no longer knows is left out."""
        return JobConfig.model_validate(
            {k: v for k, v in self.job.items() if k in JobConfig.model_fields})


class UnitReceipt(Frozen):
    """What an actor returns for a unit, and the unit's commit marker. Never activations."""

    unit: int
    """Unit index."""
    slot_start: int
    """First physical slot of the unit."""
    rows: int
    """Rows written."""
    bytes: int
    """Activation bytes written (uncompressed)."""
    truncated: int
    """Inputs cut to max_length in this unit."""
    tokens: int
    """Token positions seen (after truncation)."""
    wall_s: float
    """Seconds the actor spent on the unit."""
    run_id: str
    """The run that wrote it."""
    host: str = ""
    """Host of the actor."""


RunStatus = Literal["running", "succeeded", "failed", "interrupted"]


class RunRecord(Frozen):
    """One run of a job against a store."""

    run_id: str
    """Unique id of the run."""
    started: str
    """ISO-8601 start time (UTC)."""
    ended: str | None = None
    """ISO-8601 end time (UTC), None while running or after a crash."""
    status: RunStatus = "running"
    """running (or crashed, when never ended), succeeded, failed, or interrupted (Ctrl-C;
    the counts are those of the units committed before it)."""
    rows_added: int = 0
    """New ids cached."""
    rows_updated: int = 0
    """Ids whose text changed and were re-cached."""
    rows_metadata_updated: int = 0
    """Ids whose metadata alone changed (nothing recomputed)."""
    rows_skipped: int = 0
    """Ids already complete and unchanged."""
    rows_missing: int = 0
    """Ids in the store but absent from this run's input (kept)."""
    units: int = 0
    """Units computed by this run."""
    errors: tuple[str, ...] = Field(default_factory=tuple)
    """Error lines, when the run failed."""
    units_redone: tuple[int, ...] = Field(default_factory=tuple)
    """Units whose worker was lost (actor or node died) and that were redone on another."""
    actcache_version: str = ""
    """Version of actcache that ran."""
    host: str = ""
    """Host of the driver."""


class UnitTask(Frozen):
    """One unit of work as the driver hands it to an actor: the rows' inputs, not activations."""

    unit: int
    """Unit index (owns slots [slot_start, slot_start + rows_per_unit))."""
    slot_start: int
    """First physical slot."""
    ids: tuple[str, ...]
    """Row ids, in slot order."""
    seq: tuple[int, ...]
    """Store order of each row (order of first appearance in the inputs)."""
    hashes: tuple[str, ...]
    """Content hash of each row's model input."""
    meta: tuple[str, ...]
    """Each row's metadata columns as a JSON object."""
    inputs: tuple[str | tuple[str, str], ...]
    """Each row's model input: a text, or (text, pair) with a pair column."""
    run_id: str
    """The run computing it."""


class WorkerSpec(Frozen):
    """What a caching worker starts from: the store's manifest (its job inside) and the
    inputs of its start-up self-check, a few of this run's, which only workers get."""

    manifest: Manifest
    """The manifest the store has, or will have, for this run."""
    check_inputs: tuple[str | tuple[str, str], ...] = ()
    """Inputs the self-check compares batched against alone (``workers/selfcheck.py``)."""
