"""``TokenLoader``: a store's tokens (or pooled rows) as shuffled, rank-sharded, resumable
batches for a PyTorch training loop. The schedule is ``_schedule``'s, the reads ``_pieces``'."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from actcache.loader import _schedule as plan
from actcache.loader._pieces import Pieces
from actcache.read import PREFETCH, prefetch
from actcache.schemas.errors import ConfigError, StoreMismatchError
from actcache.store import Store, open_store

STATE_FORMAT = 1
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class Batch:
    """One batch: ``x`` on the loader's device, ``rows`` and ``positions`` on the CPU."""

    x: torch.Tensor
    """``(B, hidden)`` for one layer, ``(B, len(layers), hidden)`` for a list."""
    rows: torch.Tensor
    """int64 store position of each item's row."""
    positions: torch.Tensor
    """int32 position of each item in its row (0 for a pooled layer)."""

    def __len__(self) -> int:
        return len(self.rows)


def _distributed(rank: int | None, world_size: int | None) -> tuple[int, int]:
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if on else 1
    if rank is None:
        rank = dist.get_rank() if on else 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} of world_size {world_size}: need 0 <= rank < "
                          "world_size and world_size >= 1")
    return int(rank), int(world_size)


def _store_key(store: Store, pooling: str) -> str:
    """Identifies a store's rows (ids, inputs, token counts) and what produced its values
    (model weights, layers, dtype), wherever the store has been copied to."""
    h = hashlib.sha256()
    m = store.manifest
    model = m.get("model", {})
    h.update(repr((model.get("name"), model.get("weights_hash"), m.get("layers"),
                   m.get("poolings"), m.get("dtype"), store.hidden_size, store.n_rows)).encode())
    h.update("\n".join(store.ids).encode())
    h.update("\n".join(map(str, store.content_hashes())).encode())
    if pooling == "tokens":
        h.update(store.token_lengths().astype(np.int64).tobytes())
    return h.hexdigest()[:16]


class TokenLoader:
    """Batches of a store's tokens: every (row, position) of the selected rows once an
    epoch across all ranks, shuffled globally, resumable bitwise from ``state_dict()``.

    The shuffle: a permutation of pieces (chunk-aligned runs of rows) per epoch from
    ``(seed, epoch)``; each rank takes an equal contiguous share of that sequence and reads
    it a window (half of ``buffer_tokens``) at a time, its pieces concurrently, the next
    window while this one is drawn from in a random order. Memory: ``buffer_tokens``
    values of every layer as stored (float16 or bfloat16: 2 bytes each), a few pieces'
    stored values, one batch.
    """

    def __init__(self, store: Store | str, layer: int | Sequence[int],
                 pooling: str | None = "tokens", batch_size: int = 4096,
                 shuffle: bool = True, seed: int = 0, rows: Any = None,
                 skip_positions: int = 0, rank: int | None = None,
                 world_size: int | None = None, drop_last: bool = False,
                 dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
                 buffer_tokens: int = 2**20,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.store = store if isinstance(store, Store) else open_store(store, storage_options)
        self.single = isinstance(layer, (int, np.integer))
        wanted = [int(layer)] if self.single else [int(x) for x in layer]  # type: ignore[union-attr,arg-type]
        self.layers = [self.store.resolve_layer(x) for x in wanted]
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ConfigError("layer must be a layer or a non-empty list of distinct layers")
        self.pooling = self.store.resolve_pooling(pooling)
        for name, value, least in (("batch_size", batch_size, 1), ("buffer_tokens", buffer_tokens, 2),
                                   ("skip_positions", skip_positions, 0)):
            if not isinstance(value, (int, np.integer)) or value < least:
                raise ConfigError(f"{name} must be an integer >= {least}, not {value!r}")
        if skip_positions and self.pooling != "tokens":
            raise ConfigError("skip_positions applies to pooling='tokens' only: a pooled "
                              "layer has one item per row")
        if dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of torch.float32, torch.bfloat16, "
                              f"torch.float16, not {dtype}")
        self.rank, self.world_size = _distributed(rank, world_size)
        self.batch_size, self.shuffle, self.seed = int(batch_size), bool(shuffle), int(seed)
        self.drop_last, self.dtype = bool(drop_last), dtype
        self.device = None if device is None else torch.device(device)
        self.buffer_tokens = int(buffer_tokens)
        self.pieces = Pieces(self.store, self.layers, self.pooling, rows, int(skip_positions),
                             self.buffer_tokens // 2)
        self.capacity = max(self.buffer_tokens // 2, int(self.pieces.values.max(initial=1)))
        total = self.pieces.total
        what = "tokens" if self.pooling == "tokens" else "rows"
        if total == 0:
            raise ConfigError(f"the selected rows hold no {what}"
                              + (" past skip_positions" if skip_positions else ""))
        self.shares = plan.shares(total, self.batch_size, self.world_size, self.drop_last)
        if self.shares.batches == 0:
            raise ConfigError(
                f"batch_size {batch_size} x world_size {self.world_size} is more than the "
                f"{total} selected {what}: with drop_last=True no batch would be yielded; "
                "lower batch_size or set drop_last=False")
        self.arguments = {
            "layers": self.layers, "pooling": self.pooling, "batch_size": self.batch_size,
            "shuffle": self.shuffle, "seed": self.seed, "skip_positions": int(skip_positions),
            "drop_last": self.drop_last, "buffer_tokens": self.buffer_tokens,
            "world_size": self.world_size,
            "rows": hashlib.sha256(self.pieces.positions.tobytes()).hexdigest()[:16],
        }
        self.store_key = _store_key(self.store, self.pooling)
        self.epoch, self._start, self._done = 0, 0, 0
        self._ring: list[np.ndarray] = []

    # -- the sampler surface ----------------------------------------------------------
    def __len__(self) -> int:
        return self.shares.batches

    def set_epoch(self, epoch: int) -> None:
        """Use the permutation of ``epoch`` from the next iteration on, from its start."""
        self.epoch, self._start, self._done = int(epoch), 0, 0

    def state_dict(self) -> dict[str, Any]:
        """Where this rank is: the same on every rank, so rank 0's is enough to save."""
        return {"format": STATE_FORMAT, "epoch": self.epoch, "batches": self._done,
                "store": self.store_key, "arguments": dict(self.arguments)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The next iteration yields exactly the rest of the saved epoch."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ConfigError("not a TokenLoader state: pass what state_dict() returned")
        if state.get("store") != self.store_key:
            raise StoreMismatchError("the loader state was saved from another store (other "
                                     "rows, tokens or model): resume on the store it was "
                                     "saved from")
        saved = state.get("arguments", {})
        if saved.get("world_size") != self.world_size:
            raise ConfigError(
                f"the loader state was saved with world_size {saved.get('world_size')}, this "
                f"loader has {self.world_size}: resume with the same world_size (ranks' "
                "shares depend on it), or start the epoch afresh with set_epoch")
        other = [k for k in self.arguments if saved.get(k) != self.arguments[k]]
        if other:
            shown = ", ".join(f"{k}={saved.get(k)!r} (now {self.arguments[k]!r})" for k in other)
            raise ConfigError(f"the loader state was saved with other arguments: {shown}; "
                              "resume with the arguments it was saved with")
        batches = int(state["batches"])
        if not 0 <= batches <= len(self):
            raise ConfigError(f"the loader state's batch {batches} is not in 0..{len(self)}")
        self.epoch, self._start, self._done = int(state["epoch"]), batches, batches

    # -- iteration --------------------------------------------------------------------
    def _windows(self) -> list[plan.Window]:
        order = plan.permutation(len(self.pieces.plans), self.shuffle, self.seed, self.epoch)
        lo = int(self.shares.sizes[:self.rank].sum())
        segments = plan.rank_segments(self.pieces.counts, order, lo,
                                      lo + int(self.shares.sizes[self.rank]))
        return plan.windows(segments, self.pieces.values, self.capacity)

    def _size(self, batch: int) -> int:
        return self.batch_size if batch < len(self) - 1 else int(self.shares.last[self.rank])

    def __iter__(self) -> Iterator[Batch]:
        start, self._start = self._start, 0
        self._done = start
        if start >= len(self):
            return
        wins = self._windows()
        token = start * self.batch_size
        first = max(0, int(np.searchsorted([w.start for w in wins], token, side="right")) - 1)
        layers, hidden = len(self.layers), self.store.hidden_size
        pending: _Pending | None = None
        batch = start
        if not self._ring:
            # Kept for the loader's life: fresh buffers each epoch would cost a page fault
            # per 4 KiB of a buffer that is often gigabytes. Item i of ``prefetch`` owns
            # ring[i % PREFETCH] until the caller asks for item i + PREFETCH, as its own
            # ring does, so its tiny ring goes unused.
            self._ring = [np.empty((layers, self.capacity, hidden), self.pieces.stored_dtype)
                          for _ in range(PREFETCH)]
        reads = prefetch(list(range(first, len(wins))),
                         lambda w, _: self._read(wins, w, self._ring[(w - first) % PREFETCH]),
                         1, name="actcache-loader")
        try:
            for w, (values, order, rows, positions) in zip(range(first, len(wins)), reads,
                                                        strict=True):
                at = token - wins[w].start
                while at < len(order):
                    if pending is None:
                        pending = _Pending(self._size(batch), layers, hidden, values.dtype,
                                           self._copies)
                    n = pending.take(values, order, rows, positions, at)
                    at += n
                    token += n
                    if pending.full:
                        batch += 1
                        self._done = batch
                        yield self._batch(pending)
                        pending = None
        finally:
            reads.close()  # type: ignore[attr-defined]
        while batch < len(self):  # an empty last batch: fewer tokens left than ranks
            batch += 1
            self._done = batch
            yield self._batch(_Pending(0, layers, hidden, self.pieces.stored_dtype, False))

    def _read(self, wins: list[plan.Window], w: int, buffer: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Window ``w`` read into ``buffer``; its kept values' indices in drawing order,
        with their rows and positions."""
        values = buffer
        pieces = [seg.piece for seg in wins[w].segments]
        self.pieces.read(pieces, values)
        index, rows, positions, at = [], [], [], 0
        for seg in wins[w].segments:
            kept = self.pieces.kept(seg.piece)[seg.lo:seg.hi]
            index.append(kept + at)
            rows.append(self.pieces.plans[seg.piece].rows[kept])
            positions.append(self.pieces.positions_of(seg.piece)[kept])
            at += len(self.pieces.plans[seg.piece])
        draw = plan.permutation(wins[w].count, self.shuffle, self.seed, self.epoch,
                                self.rank, self.world_size, w)
        return (values, np.concatenate(index)[draw], np.concatenate(rows)[draw],
                np.concatenate(positions)[draw])

    @property
    def _copies(self) -> bool:
        """Whether ``_batch`` copies the stored values (to the GPU, or widening them), so
        that a batch may borrow them from the buffer rather than copy them first."""
        on_gpu = self.device is not None and self.device.type == "cuda"
        return on_gpu or self.dtype != _TORCH_STORED[self.store.dtype]

    def _batch(self, pending: _Pending) -> Batch:
        raw = pending.whole if pending.whole is not None else (
            pending.x if len(self.layers) > 1 else pending.x[:, 0])
        stored = self.store.dtype
        if self.device is not None and self.device.type == "cuda":
            # The stored values cross to the GPU (half the bytes of float32) from pinned
            # host memory, so the copy is asynchronous, and are widened there; torch's
            # caching host allocator reuses these blocks once their copies have completed.
            host = torch.empty(raw.shape, dtype=_TORCH_STORED[stored], pin_memory=True)
            host.copy_(_as_torch(raw, stored))
            x = host.to(self.device, non_blocking=True)
            if x.dtype != self.dtype:
                x = x.float() if self.dtype == torch.float32 else x.float().to(self.dtype)
        else:
            if self.dtype == _TORCH_STORED[stored]:
                x = _as_torch(raw, stored)
            else:
                # Only the batch is widened (exactly: float16 and bfloat16 fit float32); a
                # narrower dtype is rounded from those exact values.
                x = torch.from_numpy(_widen(raw, stored))
                x = x if self.dtype == torch.float32 else x.to(self.dtype)
            x = x.to(self.device) if self.device is not None else x
        return Batch(x, torch.from_numpy(pending.rows), torch.from_numpy(pending.positions))

    def close(self) -> None:
        """Free the buffer and the reading threads (the loader can still iterate)."""
        self._ring = []
        self.pieces.close()


_TORCH_STORED = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _as_torch(values: np.ndarray, stored: str) -> torch.Tensor:
    """Stored values as a tensor of their own dtype, sharing memory (bfloat16's bits)."""
    t = torch.from_numpy(values)
    return t.view(torch.bfloat16) if stored == "bfloat16" else t


def _widen(values: np.ndarray, stored: str) -> np.ndarray:
    """A batch's stored values as a new float32 array, exactly, on this thread.

    Not the read path's ``widen`` (torch's threaded copy): a batch is new memory each
    step, and torch's two threads copying 4096 x 384 values into it measured 1.4-13 ms on
    a loaded 2-core machine, against a steady 2.3 ms for numpy's cast on one thread (and
    0.6 ms for bfloat16's bits shifted into place), leaving the other core to the decode.
    """
    if stored == "bfloat16":
        out = values.astype(np.uint32)
        np.left_shift(out, 16, out=out)  # bfloat16 is the top half of a float32's bits
        return out.view(np.float32)
    return values.astype(np.float32)


class _Pending:
    """A batch being filled, as stored, from one window after another."""

    def __init__(self, size: int, layers: int, hidden: int, dtype: np.dtype,
                 borrow: bool) -> None:
        self.x = np.empty((size, layers, hidden), dtype)  # untouched pages cost nothing
        self.borrow = borrow and layers == 1
        self.whole: np.ndarray | None = None
        """The whole batch as a slice of the window's buffer, when it is one in-order run:
        widened from there, it skips a copy (valid until the caller asks for the window
        after next, by which time the batch has been made)."""
        self.rows = np.empty(size, np.int64)
        self.positions = np.empty(size, np.int32)
        self.filled = 0

    @property
    def full(self) -> bool:
        return self.filled == len(self.rows)

    def take(self, values: np.ndarray, order: np.ndarray, rows: np.ndarray,
             positions: np.ndarray, at: int) -> int:
        """Copy items ``order[at:]`` (as many as fit) of the window's ``values``."""
        a = self.filled
        n = min(len(self.rows) - a, len(order) - at)
        pick = order[at:at + n]
        # In order (no shuffle, no skipped positions): a slice copy, twice a gather's speed.
        run = n > 0 and int(pick[-1]) - int(pick[0]) == n - 1 and bool(np.all(pick[1:] > pick[:-1]))
        if run and self.borrow and a == 0 and n == len(self.rows):
            self.whole = values[0, int(pick[0]):int(pick[0]) + n]
            n_layers = 0
        else:
            n_layers = values.shape[0]
        for layer in range(n_layers):
            if run:
                self.x[a:a + n, layer] = values[layer, int(pick[0]):int(pick[0]) + n]
            else:
                np.take(values[layer], pick, axis=0, out=self.x[a:a + n, layer])
        self.rows[a:a + n] = rows[at:at + n]
        self.positions[a:a + n] = positions[at:at + n]
        self.filled += n
        return n
