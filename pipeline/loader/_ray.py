"""A Ray Data source over the same pieces and reader as ``TokenLoader``.

``read_tokens`` gives a ``ray.data.Dataset`` with a row per token (``row``, ``position``,
``x``) for Ray Train or any multi-node job: Ray shards, schedules and shuffles it its own
way; each read task opens the store where it runs and reads a set of pieces through the
store's ``StoreReader``, with the same checks and remote concurrency as every other read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from actcache.loader._pieces import Pieces
from actcache.read import decode
from actcache.store import Store, open_store

if TYPE_CHECKING:
    import ray.data

class _Spec:
    """What a read task needs to rebuild the driver's pieces exactly (picklable)."""

    def __init__(self, store: Store, layers: list[int], single: bool, pooling: str,
                 positions: np.ndarray, skip_positions: int, window: int) -> None:
        self.url, self.storage_options = store.url, store.storage_options
        self.layers, self.single, self.pooling = layers, single, pooling
        self.positions, self.skip, self.window = positions, skip_positions, window

    def pieces(self, store: Store | None = None) -> Pieces:
        store = store or open_store(self.url, self.storage_options)
        return Pieces(store, self.layers, self.pooling, self.positions, self.skip, self.window)


def _read_pieces(spec: _Spec, chosen: Sequence[int]) -> Iterator[Any]:
    """The blocks of one read task: a table per piece, in the order given."""
    from ray.data.block import BlockAccessor

    pieces = spec.pieces()
    hidden = pieces.store.hidden_size
    try:
        for piece in chosen:
            out = np.empty((len(spec.layers), int(pieces.values[piece]), hidden),
                           pieces.stored_dtype)
            pieces.read([piece], out)
            kept = pieces.kept(piece)
            wide = decode(out[:, kept], pieces.store.dtype)
            x = wide[0] if spec.single else np.ascontiguousarray(wide.transpose(1, 0, 2))
            yield BlockAccessor.batch_to_block({
                "row": pieces.plans[piece].rows[kept],
                "position": pieces.positions_of(piece)[kept],
                "x": x,
            })
    finally:
        pieces.close()
        pieces.store.reader.close()


def _datasource_class() -> type:
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class TokenDatasource(Datasource):
        """Pieces of a store split evenly (by count) between ``parallelism`` read tasks."""

        def __init__(self, spec: _Spec, counts: np.ndarray, hidden: int) -> None:
            self.spec, self.counts, self.hidden = spec, counts, hidden

        def estimate_inmemory_data_size(self) -> int:
            return int(self.counts.sum()) * len(self.spec.layers) * self.hidden * 4

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[Any]:
            n = len(self.counts)
            tasks = []
            for group in np.array_split(np.arange(n), max(1, min(parallelism, n))):
                if not len(group):
                    continue
                rows = int(self.counts[group].sum())
                meta = BlockMetadata(num_rows=rows, size_bytes=rows * len(self.spec.layers)
                                     * self.hidden * 4, exec_stats=None, input_files=None)
                chosen = group.tolist()
                tasks.append(ReadTask(lambda chosen=chosen: _read_pieces(self.spec, chosen),
                                      meta, per_task_row_limit=per_task_row_limit))
            return tasks

    return TokenDatasource


def read_tokens(store: Store | str, layer: int | Sequence[int], pooling: str | None = "tokens",
                rows: Any = None, skip_positions: int = 0,
                storage_options: dict[str, Any] | None = None,
                **read_args: Any) -> ray.data.Dataset:
    """A Ray Dataset of every (row, position) of the selected rows once: columns ``row``
    (int64), ``position`` (int32) and ``x`` (float32, ``(hidden,)`` or ``(len(layers),
    hidden)``). ``read_args`` go to ``ray.data.read_datasource`` (``override_num_blocks``,
    ``concurrency``, ...). The store must be reachable from every node (S3, a shared disk).
    """
    import ray.data

    from actcache.loader._loader import TokenLoader

    opened = store if isinstance(store, Store) else open_store(store, storage_options)
    # The loader validates the arguments exactly as it does for training.
    check = TokenLoader(opened, layer, pooling, batch_size=1, shuffle=False, rows=rows,
                        skip_positions=skip_positions, rank=0, world_size=1)
    # Read tasks rebuild the loader's pieces: same rows, same piece size.
    spec = _Spec(opened, check.layers, check.single, check.pooling, check.pieces.positions,
                 skip_positions, check.buffer_tokens // 2)
    source = _datasource_class()(spec, check.pieces.counts, opened.hidden_size)
    return ray.data.read_datasource(source, **read_args)
