"""Top-k along a direction and nearest neighbours, streamed block by block.

A layer is read in blocks of whole chunks, in physical order, and scored as it comes; a
running top-k keeps at most ``k`` candidates (plus any ties at the cut) between blocks.
Memory is bounded whatever the store's size, at about two blocks: one float32 block
(``BLOCK_BYTES``) and, while it is read, the stored values it is widened from with zarr's
buffers for them (together one more block for a float16 store, measured), plus the
scoring's row-by-row work, done ``SCORE_BYTES`` at a time. Ranks are by score
descending, ties by store row order, exactly as a brute-force sort would give.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from actcache.schemas import store as layout
from actcache.schemas.errors import ConfigError, ShapeMismatchError

if TYPE_CHECKING:
    from actcache.store import Store

METRICS = ("cosine", "dot", "euclidean")
BLOCK_BYTES = 32 * 2**20
"""float32 bytes per block: large enough that per-call overhead vanishes, small enough
to be negligible next to a machine's memory."""
SCORE_BYTES = 2**20
"""float32 bytes of a block scored at once where scoring needs a temporary per value."""


@dataclass(frozen=True)
class Ranking:
    """The k best rows: store positions, ids and scores, best first."""

    rows: np.ndarray
    ids: tuple[str, ...]
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)


def block_rows(store: Store, block_bytes: int) -> int:
    """Rows per block: a whole number of chunks, at least one."""
    chunk = store.chunk_rows
    per_chunk = chunk * store.hidden_size * 4
    return chunk * max(1, block_bytes // per_chunk)


def iter_blocks(
    store: Store,
    layer: int,
    pooling: str | None = None,
    rows: Sequence[int] | np.ndarray | None = None,
    block_bytes: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(store positions, float32 values) of a layer, one chunk-aligned block at a time.

    With ``rows``, only those store rows are yielded (each once); blocks holding none of
    them are not read. ``block_bytes`` defaults to ``BLOCK_BYTES``.
    """
    from actcache.store import decode

    index = store.resolve_layer(layer)
    name = store.resolve_pooling(pooling)
    if name == "tokens":
        raise ConfigError(
            "top-k and nearest rank pooled rows, not tokens; choose a pooling among "
            + ", ".join(p for p in store.poolings if p != "tokens")
        )
    arr = store.group[layout.activation_key(name, index)]
    slots = store.physical_slots()
    positions = np.arange(len(slots), dtype=np.int64)
    if rows is not None:
        wanted = np.asarray(rows, dtype=np.int64).reshape(-1)
        if wanted.size and (wanted.min() < -len(slots) or wanted.max() >= len(slots)):
            raise IndexError(f"rows must lie in 0..{len(slots) - 1}")
        positions = np.unique(np.where(wanted < 0, wanted + len(slots), wanted))
        slots = slots[positions]
    order = np.argsort(slots, kind="stable")
    slots, positions = slots[order], positions[order]
    step = block_rows(store, BLOCK_BYTES if block_bytes is None else block_bytes)
    i = 0
    while i < len(slots):
        stop = (int(slots[i]) // step + 1) * step
        j = int(np.searchsorted(slots, stop, side="left"))
        lo, hi = int(slots[i]), int(slots[j - 1]) + 1
        try:
            raw = np.asarray(arr[lo:hi])
        except (ValueError, RuntimeError):
            # A chunk failing its checksum: the store's reader names the unit (or re-raises).
            raw = store._checked(layout.activation_key(name, index), np.arange(lo, hi),
                                 int(store.manifest["rows_per_unit"]))
        values = decode(raw, store.dtype)
        del raw  # the stored values: only the widened block stays
        picked = slots[i:j] - lo
        everything = len(picked) == len(values)  # slots are sorted and distinct
        yield positions[i:j], values if everything else values[picked]
        del values
        i = j


class RunningTopK:
    """The ``k`` largest scores seen so far; ties broken by the smaller row."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.scores = np.zeros(0, np.float32)
        self.rows = np.zeros(0, np.int64)

    def push(self, scores: np.ndarray, rows: np.ndarray) -> None:
        scores = np.where(np.isnan(scores), -np.inf, scores).astype(np.float32, copy=False)
        if len(scores) > self.k:
            # Keep everything tied with the k-th best: the row order decides among them.
            kth = np.partition(scores, len(scores) - self.k)[len(scores) - self.k]
            keep = scores >= kth
            scores, rows = scores[keep], rows[keep]
        scores = np.concatenate([self.scores, scores])
        rows = np.concatenate([self.rows, rows])
        best = np.lexsort((rows, -scores))[: self.k]
        self.scores, self.rows = scores[best], rows[best]


def _vector(store: Store, layer: int, vector: Any, what: str) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float32)
    if v.ndim == 2 and v.shape[0] == 1:
        v = v[0]
    if v.ndim != 1 or v.shape[0] != store.hidden_size:
        raise ShapeMismatchError(
            f"the {what} has shape {tuple(v.shape)} but rows of layer {layer} have "
            f"{store.hidden_size} values; give a vector of length {store.hidden_size}"
        )
    return v


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _ranking(store: Store, top: RunningTopK) -> Ranking:
    return Ranking(top.rows, tuple(store.ids[int(i)] for i in top.rows), top.scores)


def topk(
    store: Store,
    layer: int,
    direction: Any,
    k: int,
    pooling: str | None = None,
    rows: Sequence[int] | np.ndarray | None = None,
) -> Ranking:
    """The ``k`` rows with the largest raw projection ``X·w`` (no bias)."""
    k = _check_k(k)
    store.resolve_layer(layer)
    w = _vector(store, layer, direction, "direction")
    top = RunningTopK(k)
    for positions, x in iter_blocks(store, layer, pooling, rows):
        top.push(x @ w, positions)
        del x  # before the next block is read: one block alive, not two
    return _ranking(store, top)


def similarity(x: np.ndarray, query: np.ndarray, metric: str) -> np.ndarray:
    """Scores of rows ``x`` against ``query``: higher is nearer."""
    if metric == "dot":
        return x @ query
    if metric == "euclidean":
        # A slice of rows at a time: the differences are a temporary as large as the rows.
        step = max(1, SCORE_BYTES // max(1, x.shape[1] * 4))
        out = np.empty(len(x), dtype=np.float32)
        for lo in range(0, len(x), step):
            diff = x[lo:lo + step] - query
            # 0 - d, not -d: a row equal to the query scores 0, not -0.
            out[lo:lo + step] = 0.0 - np.sqrt(np.einsum("ij,ij->i", diff, diff))
        return out
    norms = np.sqrt(np.einsum("ij,ij->i", x, x)) * np.float32(np.linalg.norm(query))
    dots = x @ query
    return np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)


def nearest(
    store: Store,
    layer: int,
    query: Any,
    k: int,
    metric: str = "cosine",
    pooling: str | None = None,
    rows: Sequence[int] | np.ndarray | None = None,
) -> Ranking:
    """The ``k`` rows nearest ``query``: cosine or dot similarity, or ``-distance``.

    Nothing is excluded: a query taken from the store finds its own row first.
    """
    if metric not in METRICS:
        raise ConfigError(f"metric {metric!r} is not one of {', '.join(METRICS)}")
    k = _check_k(k)
    store.resolve_layer(layer)
    q = _vector(store, layer, query, "query")
    top = RunningTopK(k)
    for positions, x in iter_blocks(store, layer, pooling, rows):
        top.push(similarity(x, q, metric), positions)
        del x  # before the next block is read: one block alive, not two
    return _ranking(store, top)
