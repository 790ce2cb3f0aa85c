"""Real stores made from arrays, for tests and benchmarks.

``synthetic_store`` writes a valid actcache store from numpy arrays through the same code
paths as a caching run: ``create_store`` lays out the arrays, ``grow`` sizes them, and a
``UnitWriter`` per unit writes its shards and commit marker. Only the model is missing:
the manifest names a ``synthetic`` one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from actcache import __version__
from actcache.cache.create import CODEC, chunk_rows_for, create_store, grow, mark_valid
from actcache.schemas import store as layout
from actcache.schemas.errors import ConfigError
from actcache.schemas.store import Manifest, ModelInfo, UnitTask
from actcache.store import Store, open_store
from actcache.workers.storage import open_group

ArraysByLayer = Mapping[int, np.ndarray] | Mapping[tuple[str, int], np.ndarray]


def synthetic_store(
    url: str,
    X_by_layer: ArraysByLayer,  # noqa: N803 - X is the conventional name of a design matrix
    ids: Sequence[str] | None = None,
    metadata: Sequence[dict[str, Any]] | None = None,
    rows_per_unit: int = 256,
    dtype: str = "float32",
    *,
    poolings: Sequence[str] = ("mean",),
    chunk_rows: int | None = None,
    tokens: Mapping[int, np.ndarray] | None = None,
    token_lengths: Sequence[int] | None = None,
    num_hidden_layers: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Store:
    """Write a store holding the given activations and return it opened.

    ``X_by_layer`` maps a layer to its ``(rows, hidden)`` values, used for every non-token
    pooling, or ``(pooling, layer)`` to the values of that pooling. With ``tokens`` in
    ``poolings``, ``tokens`` maps each layer to ``(Σ token_lengths, hidden)`` values, rows
    concatenated in order. ``ids`` default to row numbers; ``metadata`` holds one dict of
    columns per row. Values are cast to ``dtype`` (float16, bfloat16 or float32) exactly
    as a caching run casts them, float16 overflow included. Any previous store at ``url``
    is replaced.
    """
    values = _by_pooling_layer(X_by_layer, poolings, tokens)
    layers = sorted({layer for _, layer in values})
    n, hidden = _shape(values, layers, poolings, token_lengths)
    ids = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
    metadata = [{} for _ in range(n)] if metadata is None else list(metadata)
    if len(ids) != n or len(metadata) != n or len(set(ids)) != n:
        raise ConfigError(f"need {n} distinct ids and {n} metadata dicts, one per row")
    lengths = np.zeros(n, np.int64) if token_lengths is None else np.asarray(token_lengths)
    manifest = Manifest(
        actcache_version=__version__,
        model=ModelInfo(
            name="synthetic", weights_hash="synthetic", model_type="synthetic",
            num_hidden_layers=max(layers) if num_hidden_layers is None else num_hidden_layers,
            hidden_size=hidden, tokenizer="none", padding_side="right",
        ),
        layers=tuple(layers),
        poolings=tuple(poolings),
        dtype=dtype,
        model_dtype="float32",
        max_length=max(1, int(lengths.max(initial=0))),
        truncation_side="right",
        text_column="text",
        id_column="id",
        rows_per_unit=rows_per_unit,
        chunk_rows=chunk_rows or chunk_rows_for(rows_per_unit),
        codec=CODEC,
        job={"store_inputs": False},  # no model, so no model input to keep
    )
    create_store(open_group(url, "w", storage_options), manifest)
    group = open_group(url, "r+", storage_options)
    n_units = -(-n // rows_per_unit)
    current = grow(group, dict(group.attrs[layout.MANIFEST_ATTR]), n_units)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for unit in range(n_units):
        lo, hi = unit * rows_per_unit, min(n, (unit + 1) * rows_per_unit)
        _write_unit(group, current, unit, lo, hi, ids, metadata, values, lengths, offsets)
    mark_valid(group)
    return open_store(url, storage_options)


def _by_pooling_layer(
    X_by_layer: ArraysByLayer,  # noqa: N803
    poolings: Sequence[str],
    tokens: Mapping[int, np.ndarray] | None,
) -> dict[tuple[str, int], np.ndarray]:
    if not poolings or len(set(poolings)) != len(poolings):
        raise ConfigError(f"poolings must be distinct and not empty, got {list(poolings)}")
    pooled = [p for p in poolings if p != "tokens"]
    values: dict[tuple[str, int], np.ndarray] = {}
    for key, x in X_by_layer.items():
        if isinstance(key, tuple):
            values[(str(key[0]), int(key[1]))] = np.asarray(x)
        else:
            values.update({(p, int(key)): np.asarray(x) for p in pooled})
    if "tokens" in poolings:
        if tokens is None:
            raise ConfigError("a `tokens` pooling needs `tokens` values and `token_lengths`")
        values.update({("tokens", int(k)): np.asarray(x) for k, x in tokens.items()})
    return values


def _shape(
    values: dict[tuple[str, int], np.ndarray],
    layers: list[int],
    poolings: Sequence[str],
    token_lengths: Sequence[int] | None,
) -> tuple[int, int]:
    missing = [(p, k) for p in poolings for k in layers if (p, k) not in values]
    if missing or any(k < 0 for k in layers):
        raise ConfigError(f"layers must be non-negative with values for every pooling: {missing}")
    shapes = {p: {x.shape for (q, _), x in values.items() if q == p} for p in poolings}
    if any(len(s) != 1 or len(next(iter(s))) != 2 for s in shapes.values()):
        raise ConfigError(f"each pooling needs (rows, hidden) arrays of one shape: {shapes}")
    pooled = [next(iter(shapes[p])) for p in poolings if p != "tokens"]
    token = [next(iter(shapes[p])) for p in poolings if p == "tokens"]
    if token_lengths is not None and token and int(np.sum(token_lengths)) != token[0][0]:
        raise ConfigError("token values must have sum(token_lengths) rows")
    n = pooled[0][0] if pooled else len(token_lengths if token_lengths is not None else ())
    widths = {s[1] for s in pooled + token}
    if len(widths) != 1 or any(s[0] != n for s in pooled):
        raise ConfigError(f"every array needs {n} rows and one hidden width: {shapes}")
    return n, widths.pop()


def _write_unit(
    group: Any,
    manifest: dict[str, Any],
    unit: int,
    lo: int,
    hi: int,
    ids: list[str],
    metadata: list[dict[str, Any]],
    values: dict[tuple[str, int], np.ndarray],
    lengths: np.ndarray,
    offsets: np.ndarray,
) -> None:
    import torch

    from actcache.workers.writer import UnitWriter

    texts = [json.dumps(m, sort_keys=True) for m in metadata[lo:hi]]
    task = UnitTask(
        unit=unit,
        slot_start=unit * int(manifest["rows_per_unit"]),
        ids=tuple(ids[lo:hi]),
        seq=tuple(range(lo, hi)),
        hashes=tuple(hashlib.sha256(f"{i}\0{t}".encode()).hexdigest() for i, t in
                     zip(ids[lo:hi], texts, strict=True)),
        meta=tuple(json.dumps(m) for m in metadata[lo:hi]),
        inputs=tuple(ids[lo:hi]),
        run_id="synthetic",
    )
    writer = UnitWriter(group, Manifest.model_validate(manifest))
    writer.start(task, lengths[lo:hi].tolist())
    pooled = {}
    for (pooling, layer), x in values.items():
        part = x[offsets[lo] : offsets[hi]] if pooling == "tokens" else x[lo:hi]
        pooled[(pooling, layer)] = torch.from_numpy(np.ascontiguousarray(part, np.float32))
    writer.write(np.arange(hi - lo), pooled)
    writer.complete([False] * (hi - lo), wall_s=0.0)


def downgrade(url: str, format_version: int) -> Store:
    """Rewrite a local store written by ``synthetic_store`` in the layout of an older format,
    as an older actcache wrote it, so that tests read every format a user may still hold.

    Format 2: tokens in one array per layer, each unit reserving ``rows_per_unit ×
    max_length`` token slots, Blosc-zstd with crc32c, ``rows/token_offset`` a slot.
    Format 1: format 2 without checksums in the chunk codecs, ``rows/input`` or
    ``rows/valid``.
    """
    import shutil
    from pathlib import Path

    from zarr.codecs import BloscCodec, Crc32cCodec

    group = open_group(url, "r+")
    m = dict(group.attrs[layout.MANIFEST_ATTR])
    rpu, hidden = int(m["rows_per_unit"]), int(m["model"]["hidden_size"])
    slots = layout.token_slots_per_unit(rpu, int(m["max_length"]))
    checks = (Crc32cCodec(),) if format_version >= 2 else ()
    receipts = [layout.UnitReceipt.model_validate(dict(a.attrs))
                for _, a in group[layout.UNITS_GROUP].arrays()]
    if format_version < 2:
        for layer in m["layers"]:
            for p in m["poolings"]:
                if p == "tokens":
                    continue
                key = layout.activation_key(p, layer)
                old = group[key]
                values = old[:]
                group.create_array(key, shape=old.shape, chunks=old.chunks, shards=old.shards,
                                   dtype=old.dtype, fill_value=0, compressors=(),
                                   attributes=dict(old.attrs), overwrite=True,
                                   dimension_names=("slot", "hidden"))[:] = values
        for key in (layout.INPUT_KEY, layout.VALID_KEY):
            shutil.rmtree(Path(url) / key)
    if "tokens" in m["poolings"]:
        offsets = group[layout.TOKEN_OFFSET_KEY][:]
        for layer in m["layers"]:
            parts = {r.unit: group[layout.token_unit_key(layer, r.unit)][:]
                     for r in receipts if r.tokens}
            dtype = next(iter(parts.values())).dtype if parts else "float32"
            shutil.rmtree(Path(url) / layout.activation_key("tokens", layer))
            arr = group.create_array(
                layout.activation_key("tokens", layer), shape=(int(m["n_units"]) * slots, hidden),
                chunks=(chunk_rows_for(slots, 4096), hidden), shards=(slots, hidden), dtype=dtype,
                fill_value=0, compressors=(BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
                                           *checks),
                attributes={layout.DTYPE_ATTR: m["dtype"]}, dimension_names=("token_slot", "hidden"))
            for unit, values in parts.items():
                arr[unit * slots:unit * slots + len(values)] = values
        units = np.arange(len(offsets)) // rpu
        group[layout.TOKEN_OFFSET_KEY][:] = np.where(offsets >= 0, offsets + units * slots, -1)
    m.update(format_version=format_version, codec="blosc-zstd-3-shuffle; pooled none")
    if format_version < 2:
        m.pop("checksum", None)
    group.attrs[layout.MANIFEST_ATTR] = m
    return open_store(url)
