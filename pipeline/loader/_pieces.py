"""Pieces: the reader's plans over the selected rows, the unit of shuffling and of reading.

The loader and the Ray Data source both cut the selection with ``StoreReader.plans`` and
read with its fetcher, so chunk fetching, checksums, missing-shard errors and remote
concurrency are the read path's, not a second copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from actcache.schemas import store as layout
from actcache.schemas.errors import ConfigError

if TYPE_CHECKING:
    from actcache.read._plan import Plan
    from actcache.store import Store

#: Pieces of a window read at once: on S3 each piece is a request or two, so several in
#: flight keep the endpoint busy; locally zarrs decodes on every core already.
CONCURRENT_PIECES = 4

#: Chunks of tokens a piece spans at most: a piece's rows rarely start on a chunk
#: boundary, so each piece decodes about one chunk it shares with a neighbour; four
#: chunks keep that overhead near a quarter while a window still holds many pieces.
CHUNKS_PER_PIECE = 4

#: numpy dtype of each storage dtype's values as zarr holds them.
STORED = {"float16": "float16", "bfloat16": "uint16", "float32": "float32"}


class Pieces:
    """The selected rows of one store as pieces, and which of each piece's values are kept
    (tokens at positions ``>= skip_positions``)."""

    def __init__(self, store: Store, layers: Sequence[int], pooling: str,
                 rows: object, skip_positions: int, window_values: int) -> None:
        self.store, self.layers, self.pooling = store, tuple(layers), pooling
        reader = store.reader
        try:
            self.positions = np.unique(reader.positions(rows))  # type: ignore[arg-type]
        except IndexError as e:
            raise ConfigError(f"rows must be store positions in 0..{store.n_rows - 1} "
                              "(negatives count from the end)") from e
        except (TypeError, ValueError) as e:
            raise ConfigError("rows must be a sequence of integer store positions") from e
        row_bytes = len(self.layers) * store.hidden_size * 4
        target = max(1, window_values // 8)  # many pieces a window: mixing within it
        if pooling == "tokens":
            per_piece = min(target, CHUNKS_PER_PIECE * layout.MAX_TOKEN_CHUNK)
        else:
            chunk = store.chunk_rows
            per_piece = chunk * max(1, min(CHUNKS_PER_PIECE, target // chunk))
        self.plans: list[Plan] = reader.plans(pooling, self.positions, per_piece * row_bytes,
                                              len(self.layers))
        self.skip = skip_positions
        self.values = np.array([len(p) for p in self.plans], dtype=np.int64)
        if pooling == "tokens" and skip_positions:
            self.counts = np.array([int(np.count_nonzero(p.positions >= skip_positions))
                                    for p in self.plans if p.positions is not None],
                                   dtype=np.int64)
        else:
            self.counts = self.values.copy()
        self._pool: ThreadPoolExecutor | None = None

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def kept(self, piece: int) -> np.ndarray:
        """Indices, within the piece's values, of its kept values (ascending)."""
        plan = self.plans[piece]
        if plan.positions is None or not self.skip:
            return np.arange(len(plan), dtype=np.int64)
        return np.flatnonzero(plan.positions >= self.skip).astype(np.int64)

    def positions_of(self, piece: int) -> np.ndarray:
        plan = self.plans[piece]
        if plan.positions is None:
            return np.zeros(len(plan), np.int32)
        return plan.positions

    @property
    def stored_dtype(self) -> np.dtype:
        """The numpy dtype of the stored values (bfloat16 as its uint16 bits)."""
        return np.dtype(STORED[self.store.dtype])

    def read(self, pieces: Sequence[int], out: np.ndarray) -> None:
        """The stored values of ``pieces`` (all layers) into ``out`` (``(layers, n, hidden)``
        of ``stored_dtype``), one after another from index 0; several pieces in flight.

        Kept as stored, not widened: a buffer of stored values is half the memory of a
        float32 one, and the copies into and out of it move half the bytes; only the
        drawn batch is widened (``widen``), exactly.
        """
        fetcher = self.store.reader.fetcher
        starts = np.concatenate([[0], np.cumsum(self.values[list(pieces)])]).astype(int)

        def fetch(i: int) -> None:
            plan, part = self.plans[pieces[i]], out[:, starts[i]:starts[i + 1]]
            jobs, targets = [], []
            for j, layer in enumerate(self.layers):
                for key, read, parts in fetcher.merged(plan, layer):
                    jobs.append((key, read, parts))
                    targets.append((j, read.dest))
            for (j, dest), got in zip(targets, fetcher.fetch_merged(jobs), strict=True):
                if isinstance(dest, slice):
                    for offset, raw in got:
                        part[j, dest.start + offset:dest.start + offset + len(raw)] = raw
                else:
                    part[j, dest] = np.concatenate([raw for _, raw in got])
                del got  # before the next read: one read's stored values at a time

        if len(pieces) < 2:
            for i in range(len(pieces)):
                fetch(i)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(CONCURRENT_PIECES, thread_name_prefix="actcache-load")
        for done in [self._pool.submit(fetch, i) for i in range(len(pieces))]:
            done.result()  # an error of any piece is raised here, naming its unit

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
