"""Reading a store: ``open_store(url)`` and the ``Store`` read API (CONTRACT.md)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

from actcache.schemas import store as layout
from actcache.schemas.errors import (
    IdNotFoundError,
    LayerNotFoundError,
    PoolingNotFoundError,
    StoreCorruptError,
    StoreNotFoundError,
)
from actcache.shards import ChecksumError, ShardReader
from actcache.workers.storage import check_access, is_local, local_path, open_group

RowsLike = Sequence[int] | np.ndarray | None


def decode(values: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values as float32 (bfloat16 bits widen exactly)."""
    if values.dtype == np.float32:
        return values
    out = np.empty(values.shape, dtype=np.float32)
    widen(values, dtype, out)
    return out


def widen(values: np.ndarray, dtype: str, out: np.ndarray) -> None:
    """Stored values into the float32 array ``out`` of their shape, with no temporary.

    Through torch: its conversion uses the CPU's half-float instructions and threads,
    measured 6x faster than numpy's element-by-element float16 cast on this store's blocks.
    """
    import torch

    with warnings.catch_warnings():
        # zarr hands back read-only arrays; torch warns about writes that never happen here.
        warnings.simplefilter("ignore", UserWarning)
        src = torch.from_numpy(np.ascontiguousarray(values))
    if dtype == "bfloat16":
        src = src.view(torch.bfloat16)  # the stored bits are bfloat16's: widening is exact
    torch.from_numpy(out).copy_(src)


def read_units(group: Any) -> list[layout.UnitReceipt]:
    """Receipts of every complete unit, by unit index."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        units = group[layout.UNITS_GROUP]
        receipts = [
            layout.UnitReceipt.model_validate(dict(arr.attrs))
            for _, arr in units.arrays()
        ]
    return sorted(receipts, key=lambda r: r.unit)


def live_slots(group: Any, receipts: Sequence[layout.UnitReceipt]) -> tuple[np.ndarray, np.ndarray]:
    """(physical slots in store order, their ids) of the complete rows.

    An id written by several units (an edited row re-cached later) lives in the slot of
    the latest unit; store order is the order in which ids first appeared (``rows/seq``).
    """
    if not receipts:
        return np.zeros(0, np.int64), np.zeros(0, dtype=object)
    slots = np.concatenate([np.arange(r.slot_start, r.slot_start + r.rows) for r in receipts])
    ids_arr, seq_arr = group[layout.IDS_KEY], group[layout.SEQ_KEY]
    ids = _gather(ids_arr, slots).astype(object)
    seq = _gather(seq_arr, slots).astype(np.int64)
    # Later units come later in `slots`: keep each id's last occurrence.
    _, last_rev = np.unique(ids[::-1], return_index=True)
    keep = len(ids) - 1 - last_rev
    order = keep[np.argsort(seq[keep], kind="stable")]
    return slots[order], ids[order]


def _gather(arr: Any, slots: np.ndarray) -> np.ndarray:
    """Read ``arr`` at physical ``slots`` (any order, duplicates kept), touching only their chunks."""
    if len(slots) == 0:
        return np.asarray(arr[0:0])
    uniq, inverse = np.unique(slots, return_inverse=True)
    if uniq[-1] - uniq[0] + 1 == len(uniq):
        values = np.asarray(arr[int(uniq[0]) : int(uniq[-1]) + 1])
        if len(slots) == len(uniq) and slots[0] == uniq[0] and np.all(slots[1:] > slots[:-1]):
            return values  # already in order: no copy
    else:
        values = np.asarray(arr.oindex[uniq])
    return values[inverse.reshape(-1)]


def corrupt_message(url: str, corrupt: dict[int, list[str]]) -> str:
    """One line naming each corrupt unit (and its arrays) and the fix."""
    units = "; ".join(f"unit {u} ({', '.join(keys)})" for u, keys in sorted(corrupt.items()))
    return (
        f"store {url} has chunks that fail their checksum in {units}; rerun its job with "
        "`actcache cache JOB.yaml --repair` to recompute those units"
    )


def readable(arr: Any, slots: np.ndarray) -> bool:
    """Whether the chunks holding ``slots`` decode (checksums match)."""
    try:
        _gather(arr, slots)
    except (ValueError, RuntimeError):
        return False
    return True


class Store:
    """An actcache store, complete or not. Reads see only complete units."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.storage_options = storage_options
        check_access(url, storage_options)
        try:
            self.group = open_group(url, "r", storage_options)
            manifest = self.group.attrs.get(layout.MANIFEST_ATTR)
        except FileNotFoundError as e:
            raise StoreNotFoundError(f"no actcache store at {url!r}") from e
        if not manifest:
            raise StoreNotFoundError(f"{url!r} is a zarr group but not an actcache store")
        self.manifest: dict[str, Any] = dict(manifest)
        self.receipts = read_units(self.group)
        self._slots, ids = live_slots(self.group, self.receipts)
        self.ids: tuple[str, ...] = tuple(str(i) for i in ids)
        self._arrays: dict[str, Any] = {}
        self._readers: dict[str, ShardReader] = {}

    def __repr__(self) -> str:
        return (
            f"Store({self.url!r}, rows={self.n_rows}, layers={list(self.layers)}, "
            f"poolings={list(self.poolings)}, complete={self.complete})"
        )

    # -- what is stored -------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        return len(self.ids)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.manifest["layers"])

    @property
    def poolings(self) -> tuple[str, ...]:
        return tuple(self.manifest["poolings"])

    @property
    def hidden_size(self) -> int:
        return int(self.manifest["model"]["hidden_size"])

    @property
    def num_hidden_layers(self) -> int:
        return int(self.manifest["model"]["num_hidden_layers"])

    @property
    def chunk_rows(self) -> int:
        return int(self.manifest["chunk_rows"])

    @property
    def dtype(self) -> str:
        return str(self.manifest["dtype"])

    @property
    def complete(self) -> bool:
        return len(self.receipts) >= int(self.manifest.get("n_units", 0))

    @property
    def runs(self) -> list[dict[str, Any]]:
        return list(self.group.attrs.get(layout.RUNS_ATTR, []))

    @cached_property
    def metadata(self) -> pd.DataFrame:
        raw = _gather(self._array(layout.META_KEY), self._slots)
        return pd.DataFrame.from_records([json.loads(m) for m in raw], index=range(len(raw)))

    @cached_property
    def _positions(self) -> dict[str, int]:
        return {row_id: i for i, row_id in enumerate(self.ids)}

    # -- resolution -----------------------------------------------------------------
    def resolve_layer(self, layer: int) -> int:
        count = self.num_hidden_layers + 1
        index = int(layer) + count if int(layer) < 0 else int(layer)
        if index not in self.layers:
            raise LayerNotFoundError(
                f"layer {layer} is not in the store; stored layers: "
                f"{', '.join(map(str, self.layers))}"
            )
        return index

    def resolve_pooling(self, pooling: str | None) -> str:
        if pooling is None:
            pooled = [p for p in self.poolings if p != "tokens"]
            if len(pooled) == 1:
                return pooled[0]
            raise PoolingNotFoundError(
                f"the store has poolings {', '.join(self.poolings)}: name one with `pooling`"
            )
        if pooling not in self.poolings:
            raise PoolingNotFoundError(
                f"pooling {pooling!r} is not in the store; stored poolings: "
                f"{', '.join(self.poolings)}"
            )
        return pooling

    def rows_for_ids(self, ids: Sequence[str]) -> np.ndarray:
        """Positions in ``ids`` of the given ids, order and duplicates kept."""
        missing = [i for i in ids if str(i) not in self._positions]
        if missing:
            shown = ", ".join(repr(m) for m in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise IdNotFoundError(f"id {shown}{more} not in the store")
        return np.array([self._positions[str(i)] for i in ids], dtype=np.int64)

    # -- reading --------------------------------------------------------------------
    def _array(self, key: str) -> Any:
        if key not in self._arrays:
            self._arrays[key] = self.group[key]
        return self._arrays[key]

    def _checked(self, key: str, slots: np.ndarray, per_unit: int) -> np.ndarray:
        """``_gather``, where a chunk failing its checksum is an error naming its unit."""
        arr = self._array(key)
        try:
            return _gather(arr, slots)
        except (ValueError, RuntimeError) as e:
            # zarr does not say which chunk failed: find the units by reading each alone.
            units = np.unique(slots // per_unit)
            bad = [int(u) for u in units if not readable(arr, slots[slots // per_unit == u])]
            if not bad:
                raise
            raise StoreCorruptError(corrupt_message(self.url, {u: [key] for u in bad})) from e

    def _physical(self, rows: RowsLike) -> np.ndarray:
        if rows is None:
            return self._slots
        positions = np.asarray(rows, dtype=np.int64).reshape(-1)
        if positions.size and (positions.min() < -self.n_rows or positions.max() >= self.n_rows):
            raise IndexError(f"rows must lie in 0..{self.n_rows - 1}")
        return self._slots[positions]

    def read(self, layer: int, pooling: str | None = None, rows: RowsLike = None) -> np.ndarray:
        """float32 activations of ``layer``: (rows, hidden), or (Σ tokens, hidden) for tokens."""
        index = self.resolve_layer(layer)
        name = self.resolve_pooling(pooling)
        slots = self._physical(rows)
        key = layout.activation_key(name, index)
        rpu = int(self.manifest["rows_per_unit"])
        if name != "tokens":
            return decode(self._checked(key, slots, rpu), self.dtype)
        offsets = _gather(self._array(layout.TOKEN_OFFSET_KEY), slots)
        lengths = _gather(self._array(layout.TOKEN_LENGTH_KEY), slots)
        if len(slots) == 0:
            return np.zeros((0, self.hidden_size), np.float32)
        token_slots = np.concatenate(
            [np.arange(o, o + n, dtype=np.int64) for o, n in zip(offsets, lengths, strict=True)]
        )
        per_unit = layout.token_slots_per_unit(rpu, int(self.manifest["max_length"]))
        return decode(self._checked(key, token_slots, per_unit), self.dtype)

    def read_block(self, layer: int, pooling: str | None, start: int, stop: int) -> np.ndarray:
        """Contiguous store rows [start, stop)."""
        return self.read(layer, pooling, np.arange(start, min(stop, self.n_rows)))

    def read_stored(self, layer: int, pooling: str | None, start: int, stop: int) -> np.ndarray:
        """Contiguous store rows [start, stop) of a pooled layer as stored (``widen`` them):
        the block reader widens straight into its own float32 block, with no copy between.
        Whole local shards of the pooled layout are read directly (``actcache.shards``)."""
        key = layout.activation_key(self.resolve_pooling(pooling), self.resolve_layer(layer))
        slots = self._slots[start:min(stop, self.n_rows)]
        rpu = int(self.manifest["rows_per_unit"])
        if len(slots) and slots[-1] - slots[0] + 1 == len(slots) and np.all(np.diff(slots) == 1):
            try:
                values = self._shards(key).read(int(slots[0]), int(slots[-1]) + 1)
            except ChecksumError as e:
                units = np.unique(slots // rpu)
                bad = [int(u) for u in units
                       if not readable(self._array(key), slots[slots // rpu == u])]
                raise StoreCorruptError(corrupt_message(
                    self.url, {u: [key] for u in bad or [int(units[0])]})) from e
            if values is not None:
                return values
        return self._checked(key, slots, rpu)

    def _shards(self, key: str) -> ShardReader:
        if key not in self._readers:
            root = local_path(self.url) if is_local(self.url) else None
            self._readers[key] = ShardReader(self._array(key), root)
        return self._readers[key]

    def token_lengths(self, rows: RowsLike = None) -> np.ndarray:
        if "tokens" not in self.poolings:
            raise PoolingNotFoundError("the store has no `tokens` pooling, so no token lengths")
        return _gather(self._array(layout.TOKEN_LENGTH_KEY), self._physical(rows)).astype(np.int64)

    def patch_grid(self, rows: RowsLike = None) -> np.ndarray:
        """Image stores: each row's patch grid, (rows, 2) as (grid rows, grid columns).

        With ``manifest["prefix_tokens"]``, a row's ``tokens`` are its prefix tokens then
        its patches row-major: ``tokens[prefix:].reshape(grid_rows, grid_cols, hidden)``.
        """
        if self.manifest.get("modality") != "image":
            raise PoolingNotFoundError("only image stores record a patch grid")
        return _gather(self._array(layout.GRID_KEY), self._physical(rows)).astype(np.int64)

    def truncated(self, rows: RowsLike = None) -> np.ndarray:
        return _gather(self._array(layout.TRUNCATED_KEY), self._physical(rows)).astype(bool)

    @property
    def has_inputs(self) -> bool:
        """Whether rows keep their model input: format 2 and not opted out by the job."""
        job = self.manifest.get("job") or {}
        return layout.INPUT_KEY in self.group and bool(job.get("store_inputs", True))

    def inputs(self, rows: RowsLike = None) -> np.ndarray | None:
        """Each row's model input (its text), or None when the store keeps none."""
        if not self.has_inputs:
            return None
        return _gather(self._array(layout.INPUT_KEY), self._physical(rows)).astype(object)

    def content_hashes(self) -> np.ndarray:
        return _gather(self._array(layout.HASH_KEY), self._slots).astype(object)

    def raw_metadata(self) -> np.ndarray:
        return _gather(self._array(layout.META_KEY), self._slots).astype(object)

    def physical_slots(self) -> np.ndarray:
        return self._slots.copy()

    # -- queries (actcache.query) ---------------------------------------------------
    def select(self, where: dict[str, Any] | None = None, ids: Sequence[str] | None = None) -> Any:
        """Rows whose metadata match ``where`` (and, with ``ids``, among those ids)."""
        from actcache.query import select

        return select(self, where, ids)

    def topk(self, layer: int, direction: Any, k: int, pooling: str | None = None) -> Any:
        """The ``k`` rows with the largest ``X·direction``, streamed block by block."""
        from actcache.query import topk

        return topk(self, layer, direction, k, pooling)

    def nearest(self, layer: int, query: Any, k: int, metric: str = "cosine",
                pooling: str | None = None) -> Any:
        """The ``k`` rows nearest ``query`` (cosine, dot, or euclidean as -distance)."""
        from actcache.query import nearest

        return nearest(self, layer, query, k, metric, pooling)


def open_store(url: str, storage_options: dict[str, Any] | None = None) -> Store:
    """Open an actcache store at any fsspec URL (complete or not)."""
    return Store(url, storage_options)
