"""A store's reader: blocks for passes, rows for random access, units for verification."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from actcache.read._convert import widen
from actcache.read._fetch import Fetcher
from actcache.read._plan import (
    BLOCK_BYTES,
    Plan,
    Read,
    aranges,
    pooled_plans,
    rows_per_block,
    token_plans,
)
from actcache.read._prefetch import prefetch, run_ahead
from actcache.schemas import store as layout

if TYPE_CHECKING:
    from actcache.store import Store

RowsLike = Sequence[int] | np.ndarray | None
#: float32 bytes of a pooled slice widened and scored at once (``scored``): small enough
#: to stay in the CPU's cache, with the scoring's temporaries.
SCORE_BYTES = 3 * 2**18
#: Rows scored at once are a multiple of this, zeros padding a short slice: BLAS kernels
#: round the last few rows of a matrix differently from the rest, and identical rows
#: must score alike wherever a slice cuts them, for ties to rank by row order.
_ALIGN = 16
_ALL = 2**62


@dataclass(frozen=True)
class Block:
    """Values of a layer for some rows (pooled) or tokens, in physical order."""

    rows: np.ndarray
    """int64 store position of each value row (for tokens: the row of each token)."""
    positions: np.ndarray | None
    """int32 position of each token within its row; None for pooled layers."""
    values: np.ndarray
    """float32 ``(n, hidden)``; valid until the next block is taken."""

    def __len__(self) -> int:
        return len(self.rows)


def distinct(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values: ``np.unique`` by a sort (its hash path measured 0.1 s for
    200,000 row numbers, a sixth of a whole top-k pass)."""
    out = np.sort(values)
    return out[np.concatenate([[True], out[1:] != out[:-1]])] if len(out) else out


class StoreReader:
    """Every read of a store's activations goes through one of these (one per store)."""

    def __init__(self, store: Store, local: bool) -> None:
        self.store = store
        self.fetcher = Fetcher(store.group, store.url, local)
        self._tokens: tuple[np.ndarray, np.ndarray] | None = None

    # -- geometry -------------------------------------------------------------------
    def positions(self, rows: RowsLike) -> np.ndarray:
        """Store positions of ``rows`` (negatives count from the end), checked."""
        n = self.store.n_rows
        if rows is None:
            return np.arange(n, dtype=np.int64)
        positions = np.asarray(rows, dtype=np.int64).reshape(-1)
        if positions.size and (positions.min() < -n or positions.max() >= n):
            raise IndexError(f"rows must lie in 0..{n - 1}")
        return np.where(positions < 0, positions + n, positions)

    def token_geometry(self) -> tuple[np.ndarray, np.ndarray]:
        """(offset, length) of every row's tokens, by store position (read once)."""
        if self._tokens is None:
            from actcache.store import gather

            slots = self.store.physical_slots()
            group = self.store.group
            self._tokens = (gather(group[layout.TOKEN_OFFSET_KEY], slots).astype(np.int64),
                            gather(group[layout.TOKEN_LENGTH_KEY], slots).astype(np.int64))
        return self._tokens

    def plans(self, pooling: str, positions: np.ndarray, block_bytes: int | None = None,
              n_layers: int = 1) -> list[Plan]:
        """Blocks covering the distinct store rows ``positions`` once, in physical order."""
        store = self.store
        slots = store.physical_slots()[positions]
        order = np.argsort(slots, kind="stable")
        slots, positions = slots[order], positions[order]
        row_bytes = n_layers * store.hidden_size * 4
        budget = BLOCK_BYTES if block_bytes is None else block_bytes
        if pooling != "tokens":
            step = rows_per_block(store.chunk_rows, row_bytes, budget)
            return pooled_plans(pooling, slots, positions, store.rows_per_unit, step)
        offsets, lengths = self.token_geometry()
        return token_plans(store.manifest, slots, positions, offsets[positions],
                           lengths[positions], max(1, budget // row_bytes))

    # -- passes ---------------------------------------------------------------------
    def blocks(self, index: int, pooling: str, rows: RowsLike = None,
               block_bytes: int | None = None) -> Iterator[Block]:
        """Blocks of layer ``index``: every requested row once, physical order, prefetched."""
        positions = self.positions(rows) if rows is None else distinct(self.positions(rows))
        plans = self.plans(pooling, positions, block_bytes)
        if not plans:
            return
        hidden = self.store.hidden_size

        def read(plan: Plan, buffer: np.ndarray) -> Block:
            out = buffer[:len(plan) * hidden].reshape(1, len(plan), hidden)
            self.fetcher.fill(plan, (index,), out, self.store.dtype)
            return Block(plan.rows, plan.positions, out[0])

        yield from prefetch(plans, read, max(len(p) for p in plans) * hidden)

    def scored(self, index: int, pooling: str, rows: RowsLike,
               score: Callable[[np.ndarray], np.ndarray],
               keep: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(store rows, ``score`` of their float32 values) of a pooled layer, physical
        order, widened ``SCORE_BYTES`` at a time right before scoring, so the float32
        values live in the CPU's cache rather than in a block written to memory and read
        back (that measured the larger part of a search's time). ``keep(rows, scores)``
        trims each piece to what the caller still needs (a top-k's candidates) on the
        thread that scored it. Both must be safe to call from several threads at once:
        whole local shards are read, checked and scored on ``each_shard``'s threads.
        """
        positions = self.positions(rows) if rows is None else distinct(self.positions(rows))
        plans = self.plans(pooling, positions)
        dtype = self.store.dtype
        step = max(_ALIGN, SCORE_BYTES // (4 * self.store.hidden_size) // _ALIGN * _ALIGN)
        local = threading.local()

        def scores(parts: list[tuple[int, np.ndarray]], n: int) -> np.ndarray:
            # One float32 slice per thread, reused: a fresh one per slice measured a third
            # of a search's time (new pages faulted in and zeroed each time).
            values = getattr(local, "values", None)
            if values is None:
                values = local.values = np.empty((step, parts[0][1].shape[1]), np.float32)
            out = np.empty(n, dtype=np.float32)
            for at, raw in parts:
                for lo in range(0, len(raw), step):
                    part = raw[lo:lo + step]
                    m = len(part)
                    padded = -(-m // _ALIGN) * _ALIGN
                    widen(part, dtype, values[:m])
                    if padded > m:
                        values[m:padded] = 0
                    out[at + lo:at + lo + m] = score(values[:padded])[:m]
            return out

        def shard(got: np.ndarray, parts: list[tuple[int, np.ndarray]]
                  ) -> tuple[np.ndarray, np.ndarray]:
            return got, scores(parts, len(got))

        def combine(done: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
            if len(done) == 1:
                return keep(*done[0])
            return keep(np.concatenate([r for r, _ in done]), np.concatenate([v for _, v in done]))

        jobs = self.fetcher.shard_jobs(plans, index)
        if jobs is not None:
            yield from self.fetcher.each_shard(jobs, shard, combine)
            return

        def pieces() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for plan in plans:
                jobs = self.fetcher.merged(plan, index)
                for (_, read, _), parts in zip(jobs, self.fetcher.fetch_merged(jobs),
                                               strict=True):
                    assert isinstance(read.dest, slice)  # pooled plans in physical order
                    for offset, raw in parts:
                        at = read.dest.start + offset
                        yield plan.rows[at:at + len(raw)], raw

        for got, raw in run_ahead(pieces()):
            yield keep(*shard(got, [(0, raw)]))

    def read_into(self, layers: Sequence[int], pooling: str, positions: np.ndarray,
                  out: np.ndarray) -> None:
        """Pooled rows ``positions`` (distinct, any order) of ``layers`` into ``out``
        (``(len(layers), len(positions), hidden)`` float32), in the order given."""
        slots = self.store.physical_slots()[positions]
        order = np.argsort(slots, kind="stable")
        for plan in pooled_plans(pooling, slots[order], positions[order],
                                 self.store.rows_per_unit, _ALL, dest=order):
            self.fetcher.fill(plan, layers, out, self.store.dtype)

    # -- random access --------------------------------------------------------------
    def read(self, index: int, pooling: str, rows: RowsLike = None) -> np.ndarray:
        """float32 values of ``rows`` in the order given, duplicates kept; for tokens the
        rows' tokens concatenated in that order."""
        hidden = self.store.hidden_size
        wanted = self.positions(rows)
        if pooling != "tokens":
            uniq, inverse = np.unique(wanted, return_inverse=True)
            out = np.empty((1, len(uniq), hidden), dtype=np.float32)
            if len(uniq):
                self.read_into((index,), pooling, uniq, out)
            if len(uniq) == len(wanted) and np.array_equal(uniq, wanted):
                return out[0]
            return out[0][inverse.reshape(-1)]
        uniq = distinct(wanted)
        plans = self.plans(pooling, uniq, _ALL)
        total = sum(len(p) for p in plans)
        out = np.empty((1, total, hidden), dtype=np.float32)
        at = 0
        for plan in plans:
            self.fetcher.fill(plan, (index,), out[:, at:at + len(plan)], self.store.dtype)
            at += len(plan)
        # The values are in physical order: gather each wanted row's tokens from there.
        offsets, lengths = self.token_geometry()
        slots = self.store.physical_slots()[uniq]
        physical = uniq[np.argsort(slots, kind="stable")]
        starts = np.zeros(self.store.n_rows, dtype=np.int64)
        starts[physical] = np.cumsum(lengths[physical]) - lengths[physical]
        if np.array_equal(physical, wanted):
            return out[0]
        return out[0][aranges(starts[wanted], lengths[wanted])]

    # -- verification ---------------------------------------------------------------
    def check(self, key: str, unit: int, lo: int, hi: int) -> None:
        """Read ``[lo, hi)`` of array ``key``, inside ``unit``, whole: a chunk failing its
        checksum or a missing shard raises StoreCorruptError naming the unit."""
        self.fetcher.fetch(key, Read(unit, lo, hi, None, slice(0, hi - lo)))

    def close(self) -> None:
        self.fetcher.close()
