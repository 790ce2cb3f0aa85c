"""Creating a store, checking an existing one against a job, growing it for new units.

Only the driver (holding the store's lease) writes metadata: the manifest, array shapes
and the run history. Actors write chunk data and their own commit markers only.
"""

from __future__ import annotations

from typing import Any

from zarr.codecs import Crc32cCodec

from actcache.schemas import store as layout
from actcache.schemas.errors import StoreMismatchError
from actcache.schemas.job import SHAPING_FIELDS, JobConfig
from actcache.schemas.store import Manifest
from actcache.workers.dtypes import stored_dtype

# Measured by benchmarks/bench_codec.py (figures and the reasoning in docs/STORE.md): a
# store is written once and read many times (every probe pass, query, loader epoch), and
# every compressor measured costs about half of read throughput to save 0-8% of disk on
# float16 (a quarter on bfloat16), so activations are stored raw. Format 3 packs tokens
# (one array per unit holding exactly its tokens), so no zero padding needs a compressor
# to stay off the disk. Stores written before keep reading: zarr takes each array's codecs
# from its own metadata, and the manifest records the codec.
CODEC = "none"
# Format 2: every activation chunk ends in its crc32c, checked on each read.
CHECKSUM_CODECS: tuple[Any, ...] = (Crc32cCodec(),)
# Chunks of up to 1,024 rows: a pass over a store reads 1.7x faster than with 256-row
# chunks (zarr's cost is per chunk; benchmarks/bench_probes.py --out-of-core).
MAX_CHUNK_ROWS = 1024


def chunk_rows_for(rows_per_unit: int, limit: int = MAX_CHUNK_ROWS) -> int:
    """The largest divisor of ``rows_per_unit`` up to ``limit``: chunks tile shards exactly."""
    for size in range(min(limit, rows_per_unit), 0, -1):
        if rows_per_unit % size == 0:
            return size
    return 1


def check_compatible(existing: dict[str, Any], manifest: Manifest) -> None:
    """Refuse a job whose shaping fields differ from the store's, naming the field."""
    old_job, new_job = existing.get("job", {}), manifest.job
    for field in SHAPING_FIELDS:
        # A store written before a field existed was written with that field's default.
        default = JobConfig.model_fields[field].default
        if _norm(old_job.get(field, default)) != _norm(new_job.get(field)):
            raise StoreMismatchError(
                f"the store was written with {field}={old_job.get(field)!r} but the job has "
                f"{field}={new_job.get(field)!r}; use another `store`, or --overwrite to replace it"
            )
    old_model = existing.get("model", {})
    if old_model.get("weights_hash") != manifest.model.weights_hash:
        raise StoreMismatchError(
            f"the weights of model {manifest.model.name!r} differ from those that wrote the store; "
            "use another `store`, or --overwrite to replace it"
        )
    if existing.get("format_version") != manifest.format_version:
        raise StoreMismatchError(
            f"the store has format version {existing.get('format_version')}, this actcache "
            f"writes {manifest.format_version}; use another `store`, or --overwrite"
        )


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value


def create_store(group: Any, manifest: Manifest) -> None:
    """Create every array of a new store, empty (shape 0 along rows)."""
    rpu, chunk, hidden = manifest.rows_per_unit, manifest.chunk_rows, manifest.model.hidden_size
    rows = group.require_group(layout.ROWS_GROUP)
    group.require_group(layout.UNITS_GROUP)
    string_opts = {"dtype": str, "fill_value": ""}
    for key, opts in (
        (layout.IDS_KEY, string_opts),
        (layout.HASH_KEY, string_opts),
        (layout.META_KEY, string_opts),
        (layout.INPUT_KEY, string_opts),
        (layout.SEQ_KEY, {"dtype": "int64", "fill_value": -1}),
        (layout.TRUNCATED_KEY, {"dtype": "bool", "fill_value": False}),
        (layout.VALID_KEY, {"dtype": "bool", "fill_value": False}),
    ):
        rows.create_array(
            key.split("/", 1)[1], shape=(0,), chunks=(chunk,), shards=(rpu,),
            dimension_names=(layout.ROW_DIM,), **opts
        )
    np_dtype = stored_dtype(manifest.dtype)
    attrs = {layout.DTYPE_ATTR: manifest.dtype}
    for pooling in manifest.poolings:
        pgroup = group.require_group(pooling)
        for layer in manifest.layers:
            if pooling == "tokens":
                # Each unit writes its own packed array under this group (token_unit_key).
                pgroup.create_group(f"layer_{layer}", attributes=attrs, overwrite=True)
                continue
            pgroup.create_array(
                f"layer_{layer}",
                shape=(0, hidden),
                chunks=(chunk, hidden),
                shards=(rpu, hidden),
                dtype=np_dtype,
                fill_value=0,
                # crc32c last: a chunk changed at rest fails its read instead
                # of decoding to plausible values (cost: benchmarks/bench_checksum.py).
                compressors=CHECKSUM_CODECS,
                attributes=attrs,
                dimension_names=(layout.ROW_DIM, "hidden"),
            )
    if manifest.modality == "image":
        rows.create_array("grid", shape=(0, 2), chunks=(chunk, 2), shards=(rpu, 2), dtype="int32",
                          fill_value=0, dimension_names=("slot", "axis"))
    if "tokens" in manifest.poolings:
        for name, dtype, fill in (("token_offset", "int64", -1), ("token_length", "int32", 0)):
            rows.create_array(name, shape=(0,), chunks=(chunk,), shards=(rpu,), dtype=dtype,
                              fill_value=fill, dimension_names=(layout.ROW_DIM,))
    group.attrs.update({layout.MANIFEST_ATTR: manifest.model_dump(mode="json"), layout.RUNS_ATTR: []})


def row_array_keys(manifest: dict[str, Any] | Manifest) -> list[str]:
    m = manifest if isinstance(manifest, Manifest) else Manifest.model_validate(manifest)
    keys = [layout.IDS_KEY, layout.HASH_KEY, layout.META_KEY, layout.SEQ_KEY, layout.TRUNCATED_KEY]
    if m.format_version >= 2:
        keys += [layout.INPUT_KEY, layout.VALID_KEY]
    if "tokens" in m.poolings:
        keys += [layout.TOKEN_OFFSET_KEY, layout.TOKEN_LENGTH_KEY]
    if m.modality == "image":
        keys.append(layout.GRID_KEY)
    keys += [
        layout.activation_key(p, layer)
        for p in m.poolings
        if p != "tokens"
        for layer in m.layers
    ]
    return keys


def mark_valid(group: Any) -> None:
    """Write ``rows/valid``: True exactly at the slots of the live rows (complete units,
    superseded rows left out), for readers that do not interpret the commit markers.

    The driver calls it when a run ends, holding the lease; a format-1 store has no such
    array and is left as it is.
    """
    import numpy as np

    from actcache.store import live_slots, read_units

    if layout.VALID_KEY not in group:
        return
    arr = group[layout.VALID_KEY]
    valid = np.zeros(arr.shape, dtype=bool)
    slots, _ = live_slots(group, read_units(group))
    valid[slots] = True
    arr[:] = valid


def grow(group: Any, manifest: dict[str, Any], n_units: int) -> dict[str, Any]:
    """Resize every array to hold ``n_units`` units; returns the updated manifest."""
    m = Manifest.model_validate(manifest)
    if n_units <= m.n_units:
        return manifest
    rpu = m.rows_per_unit
    for key in row_array_keys(m):
        arr = group[key]
        arr.resize((n_units * rpu, *arr.shape[1:]))
    if "tokens" in m.poolings and not layout.packed_tokens(manifest):
        slots = layout.token_slots_per_unit(rpu, m.max_length)
        for layer in m.layers:
            arr = group[layout.activation_key("tokens", layer)]
            arr.resize((n_units * slots, arr.shape[1]))
    updated = {**manifest, "n_units": n_units}
    group.attrs.update({layout.MANIFEST_ATTR: updated})
    return updated

