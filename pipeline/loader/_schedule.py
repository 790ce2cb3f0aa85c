"""An epoch's arithmetic: which tokens each rank gets, in which windows, in which order.

Everything here is a pure function of the pieces' token counts and the arguments, so
every rank (and a resumed loader) derives the same schedule without talking to the
others and without reading a value.

- A *piece* is one plan of the reader (a chunk-aligned run of rows, read as one block).
- The epoch's global token sequence is the pieces in a permutation drawn from
  ``(seed, epoch)``, each piece's kept tokens in physical order.
- Rank ``r`` takes a contiguous share of that sequence, so each piece is read by one
  rank (two where a share boundary cuts it) and the ranks together cover it once.
- A rank's share is cut into *windows* of whole segments that fit half the shuffle
  buffer; a window is read (its pieces concurrently) while the one before is drawn from,
  in the order of a permutation drawn from ``(seed, epoch, rank, window)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segment:
    """Kept tokens ``[lo, hi)`` of piece ``piece`` (indices among its kept tokens)."""

    piece: int
    lo: int
    hi: int


@dataclass(frozen=True)
class Window:
    """Whole segments read together into one half of the shuffle buffer."""

    segments: tuple[Segment, ...]
    start: int
    """Place of the window's first token in the rank's token stream."""
    count: int
    """Tokens the window contributes."""


@dataclass(frozen=True)
class Shares:
    """How an epoch's tokens split into ranks and batches."""

    batches: int
    """Batches of every rank (equal across ranks)."""
    sizes: np.ndarray
    """Tokens of each rank's share, int64 ``(world_size,)``."""
    last: np.ndarray
    """Size of each rank's last batch, int64 ``(world_size,)``."""


def shares(total: int, batch_size: int, world_size: int, drop_last: bool) -> Shares:
    """Equal batch counts on every rank.

    ``drop_last``: ``total // (world_size * batch_size)`` full batches a rank; the epoch's
    last ``total % (world_size * batch_size)`` tokens (in its permuted order, so other
    tokens each shuffled epoch) are not yielded. Otherwise ``ceil(total / (world_size *
    batch_size))`` batches a rank, all full but the last, and the tokens left after the
    full ones are split as evenly as possible between the ranks' last batches (sizes
    differ by at most one; a last batch is empty only when fewer tokens than ranks are
    left), so that every token is yielded exactly once.
    """
    per_step = world_size * batch_size
    if drop_last:
        batches = total // per_step
        last = np.full(world_size, batch_size if batches else 0, np.int64)
        return Shares(batches, np.full(world_size, batches * batch_size, np.int64), last)
    batches = -(-total // per_step)
    if batches == 0:
        return Shares(0, np.zeros(world_size, np.int64), np.zeros(world_size, np.int64))
    rest = total - per_step * (batches - 1)
    last = rest // world_size + (np.arange(world_size) < rest % world_size)
    return Shares(batches, (batches - 1) * batch_size + last.astype(np.int64),
                  last.astype(np.int64))


def permutation(n: int, shuffle: bool, *key: int) -> np.ndarray:
    """A permutation of ``range(n)`` drawn from ``key`` (the identity without shuffle)."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([0x70CE, *key]).permutation(n).astype(np.int64)


def rank_segments(counts: np.ndarray, order: np.ndarray, lo: int, hi: int) -> list[Segment]:
    """Segments covering tokens ``[lo, hi)`` of the sequence of pieces ``order`` whose
    kept token counts are ``counts[order]``."""
    ends = np.cumsum(counts[order])
    starts = ends - counts[order]
    segments = []
    first = int(np.searchsorted(ends, lo, side="right"))
    for i in range(first, len(order)):
        if starts[i] >= hi:
            break
        a, b = max(lo, int(starts[i])), min(hi, int(ends[i]))
        if b > a:
            segments.append(Segment(int(order[i]), a - int(starts[i]), b - int(starts[i])))
    return segments


def windows(segments: list[Segment], values: np.ndarray, capacity: int) -> list[Window]:
    """Consecutive segments grouped while their pieces' values (``values[piece]``, the
    tokens a read fills, kept or not) fit ``capacity``; a window has at least one."""
    out: list[Window] = []
    group: list[Segment] = []
    used = start = count = 0
    for seg in segments:
        need = int(values[seg.piece])
        if group and used + need > capacity:
            out.append(Window(tuple(group), start, count))
            start += count
            group, used, count = [], 0, 0
        group.append(seg)
        used += need
        count += seg.hi - seg.lo
    if group:
        out.append(Window(tuple(group), start, count))
    return out
