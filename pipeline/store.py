"""Reading a store: ``open_store(url)`` and the ``Store`` read API (CONTRACT.md)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

from actcache.read import Block, StoreReader
from actcache.schemas import store as layout
from actcache.schemas.errors import (
    IdNotFoundError,
    LayerNotFoundError,
    PoolingNotFoundError,
    StoreNotFoundError,
)
from actcache.workers.storage import check_access, is_local, open_group

RowsLike = Sequence[int] | np.ndarray | None


def read_units(group: Any) -> list[layout.UnitReceipt]:
    """Receipts of every complete unit, by unit index."""
    with warnings.catch_warnings():
        # A folder under units/ without its zarr.json (a marker being written, a writer
        # that crashed) is not a complete unit: zarr warns and skips it, which is right.
        warnings.filterwarnings(
            "ignore", message=r"Object at \S+ is not recognized as a component of a Zarr",
            category=UserWarning)
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
    ids = gather(ids_arr, slots).astype(object)
    seq = gather(seq_arr, slots).astype(np.int64)
    # Later units come later in `slots`: keep each id's last occurrence.
    _, last_rev = np.unique(ids[::-1], return_index=True)
    keep = len(ids) - 1 - last_rev
    order = keep[np.argsort(seq[keep], kind="stable")]
    return slots[order], ids[order]


def gather(arr: Any, slots: np.ndarray) -> np.ndarray:
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
        """The manifest as stored (``spec`` is the same, typed)."""
        self.receipts = read_units(self.group)
        self._slots, ids = live_slots(self.group, self.receipts)
        self.ids: tuple[str, ...] = tuple(str(i) for i in ids)
        self._arrays: dict[str, Any] = {}
        self.reader = StoreReader(self, is_local(url))

    def __repr__(self) -> str:
        return (
            f"Store({self.url!r}, rows={self.n_rows}, layers={list(self.layers)}, "
            f"poolings={list(self.poolings)}, complete={self.complete})"
        )

    # -- what is stored -------------------------------------------------------------
    @cached_property
    def spec(self) -> layout.Manifest:
        """The manifest typed, validated once; a field an older format lacks takes the
        schema's default (docs/STORE.md lists what each format added)."""
        return layout.Manifest.model_validate(self.manifest)

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
    def rows_per_unit(self) -> int:
        return int(self.manifest["rows_per_unit"])

    @property
    def chunk_rows(self) -> int:
        return int(self.manifest["chunk_rows"])

    @property
    def dtype(self) -> str:
        return str(self.manifest["dtype"])

    @property
    def complete(self) -> bool:
        return len(self.receipts) >= self.spec.n_units

    @property
    def runs(self) -> list[dict[str, Any]]:
        return list(self.group.attrs.get(layout.RUNS_ATTR, []))

    @cached_property
    def metadata(self) -> pd.DataFrame:
        raw = gather(self._array(layout.META_KEY), self._slots)
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

    def _physical(self, rows: RowsLike) -> np.ndarray:
        return self._slots[self.reader.positions(rows)]

    def read(self, layer: int, pooling: str | None = None, rows: RowsLike = None) -> np.ndarray:
        """float32 activations of ``layer``: (rows, hidden), or (Σ tokens, hidden) for tokens,
        in the order of ``rows`` (store positions), duplicates kept."""
        return self.reader.read(self.resolve_layer(layer), self.resolve_pooling(pooling), rows)

    def blocks(self, layer: int, pooling: str | None = None, rows: RowsLike = None,
               block_bytes: int | None = None) -> Iterator[Block]:
        """Blocks of ``layer`` covering ``rows`` (store positions; all by default) exactly
        once, chunk-aligned, in physical order, the next block read while the caller works
        on this one. Each has ``.rows`` (int64 store positions; for tokens the row of each
        token), ``.positions`` (int32 position in the row; None for pooled layers) and
        ``.values`` (float32 ``(n, hidden)``, valid until the next block is taken). Memory:
        two blocks of about ``block_bytes`` (32 MiB by default) plus a constant."""
        index, name = self.resolve_layer(layer), self.resolve_pooling(pooling)
        return self.reader.blocks(index, name, rows, block_bytes)

    def token_lengths(self, rows: RowsLike = None) -> np.ndarray:
        if "tokens" not in self.poolings:
            raise PoolingNotFoundError("the store has no `tokens` pooling, so no token lengths")
        lengths = self.reader.token_geometry()[1]
        return lengths.copy() if rows is None else lengths[self.reader.positions(rows)]

    def patch_grid(self, rows: RowsLike = None) -> np.ndarray:
        """Image stores: each row's patch grid, (rows, 2) as (grid rows, grid columns).

        With ``manifest["prefix_tokens"]``, a row's ``tokens`` are its prefix tokens then
        its patches row-major: ``tokens[prefix:].reshape(grid_rows, grid_cols, hidden)``.
        """
        if self.spec.modality != "image":
            raise PoolingNotFoundError("only image stores record a patch grid")
        return gather(self._array(layout.GRID_KEY), self._physical(rows)).astype(np.int64)

    def truncated(self, rows: RowsLike = None) -> np.ndarray:
        return gather(self._array(layout.TRUNCATED_KEY), self._physical(rows)).astype(bool)

    @property
    def has_inputs(self) -> bool:
        """Whether rows keep their model input: format 2 and not opted out by the job."""
        return layout.INPUT_KEY in self.group and self.spec.store_inputs

    def inputs(self, rows: RowsLike = None) -> np.ndarray | None:
        """Each row's model input (its text), or None when the store keeps none."""
        if not self.has_inputs:
            return None
        return gather(self._array(layout.INPUT_KEY), self._physical(rows)).astype(object)

    def content_hashes(self) -> np.ndarray:
        return gather(self._array(layout.HASH_KEY), self._slots).astype(object)

    def raw_metadata(self) -> np.ndarray:
        return gather(self._array(layout.META_KEY), self._slots).astype(object)

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
