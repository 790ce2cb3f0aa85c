"""Token sets for the token probes: labels and splits, pieces, the epoch's batches, reads.

A *piece* is one reader plan over the used rows (``StoreReader.plans``): whole rows in
physical order, cut before it passes ``PIECE_BYTES`` of one layer. An epoch permutes the
pieces (seeded by ``(seed, epoch)``), groups consecutive pieces into *windows* of about
``WINDOW_BYTES`` of one layer (``window_tokens``), and shuffles the fit rows of each window (seeded by ``(seed,
epoch, window)``) into batches of ``batch_size`` rows. So a batch mixes rows from several
pieces far apart in the store (a store sorted by label does not give one-class batches),
and the whole schedule is a function of the seed, the epoch and the store's layout, never of
``max_memory``: a run that keeps every piece in memory and one that reads the windows again
every epoch train on the same batches, in the same order.

Tokens at positions below ``skip`` (class, register tokens) are dropped as a piece is read;
a batch is padded to its longest row only, with a mask.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actcache.probes._data import (
    FIT,
    UNUSED,
    ProbeData,
    Reads,
    _classes,
    class_roles,
    layers_and_labels,
    resolve_task,
)
from actcache.read._plan import Plan, aranges
from actcache.read._prefetch import run_ahead
from actcache.schemas.errors import (
    ConfigError,
    ProbeDataError,
    StoreIncompleteError,
)
from actcache.schemas.probe import ProbeConfig, Task

#: float32 bytes of one layer a piece holds at most (a longer row is a piece alone): a few
#: reads' worth, so an epoch's permutation of pieces mixes the store finely.
PIECE_BYTES = 4 * 2**20
#: float32 bytes of one layer whose rows are shuffled together into batches (a window),
#: unless ``WINDOW_BATCHES`` batches of rows of average length need more.
WINDOW_BYTES = 32 * 2**20
WINDOW_BATCHES = 4


@dataclass(frozen=True)
class TokenSets:
    """What a token-probe run reads: labels, roles, each row's kept tokens, the pieces."""

    data: ProbeData
    skip: int
    lengths: np.ndarray
    """Kept tokens (positions ``>= skip``) per store row; 0 where the row is unused."""
    plans: list[Plan]
    piece_tokens: np.ndarray
    """Kept tokens of each piece."""
    piece_raw: np.ndarray
    """Tokens a read of each piece fills (kept or not)."""
    no_tokens: int
    """Labelled rows left out because no token is left after ``skip``."""

    @property
    def max_length(self) -> int:
        return int(self.lengths.max(initial=0))


def _skip(store: Any, config: ProbeConfig) -> int:
    if config.skip_positions is not None:
        return int(config.skip_positions)
    manifest = store.manifest or {}
    return int(manifest.get("prefix_tokens", 0)) if manifest.get("modality") == "image" else 0


def _check_store(store: Any, config: ProbeConfig) -> None:
    names = ", ".join(p.value for p in config.probes)
    if not store.complete:
        raise StoreIncompleteError(
            f"store {store.url} is incomplete: some units are not cached yet; finish it with "
            "`actcache cache JOB.yaml`, then rerun `actcache probe`")
    if "tokens" not in store.poolings:
        raise ProbeDataError(
            f"probe {names} reads every token, but store {store.url} has no `tokens` "
            f"(poolings: {', '.join(store.poolings)}): cache it with `pooling: [tokens]` in "
            "the job yaml")
    if config.pooling not in (None, "tokens"):
        raise ConfigError(f"probe {names} reads every token: give --pooling tokens or leave "
                          "--pooling out")


def prepare_tokens(store: Any, config: ProbeConfig) -> TokenSets:
    """Check the store, resolve layers, labels, splits and skipped positions; plan pieces."""
    _check_store(store, config)
    layers, column = layers_and_labels(store, config)
    task, why = resolve_task(column, config.task)
    if task == Task.REGRESSION:
        raise ProbeDataError(
            f"token probes need class labels, but label column {config.label!r} is a "
            f"regression target ({why}): use --task classification to treat each value as a "
            "class")
    classes, y = _classes(column, config.label)
    skip = _skip(store, config)
    raw = store.token_lengths().astype(np.int64)
    kept = np.maximum(raw - skip, 0)
    if not (kept[y >= 0] > 0).any():
        raise ProbeDataError(
            f"no row has tokens left after skip_positions={skip} (the longest row has "
            f"{int(raw.max(initial=0))}): lower skip_positions (--skip-positions)")
    no_tokens = int(((y >= 0) & (kept == 0)).sum())
    y = np.where(kept > 0, y, -1)
    role, control = class_roles(store, config, classes, y)
    data = ProbeData(layers, "tokens", classes, y, control, role, int(store.hidden_size))
    used = np.flatnonzero(role != UNUSED)
    plans = store.reader.plans("tokens", used, max(PIECE_BYTES, data.hidden * 4), 1)
    lengths = np.where(role != UNUSED, kept, 0)
    piece_tokens = np.array([int(lengths[_piece_rows(p)].sum()) for p in plans], np.int64)
    piece_raw = np.array([len(p) for p in plans], np.int64)
    return TokenSets(data, skip, lengths, plans, piece_tokens, piece_raw, no_tokens)


def _piece_rows(plan: Plan) -> np.ndarray:
    """The distinct store rows of a token plan, in its order."""
    r = plan.rows
    return r[np.concatenate([[True], r[1:] != r[:-1]])] if len(r) else r


@dataclass
class Piece:
    """A piece's kept tokens of a group of layers, and where each row's tokens lie."""

    rows: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    values: np.ndarray
    """``(layers, tokens, hidden)`` float32 (standardised once the source says so)."""
    positions: np.ndarray
    """Position of each kept token in its row."""


@dataclass(frozen=True)
class Batch:
    """Rows of one minibatch: ``(piece in the window, row in the piece)`` each."""

    piece: np.ndarray
    local: np.ndarray


@dataclass(frozen=True)
class Schedule:
    """Every epoch's windows (piece indices) and their batches."""

    epochs: list[list[tuple[list[int], list[Batch]]]]

    @property
    def steps(self) -> int:
        return sum(len(b) for epoch in self.epochs for _, b in epoch)

    def rows(self, sets: TokenSets, epoch: int) -> list[np.ndarray]:
        """The store rows of each batch of ``epoch``, in training order."""
        out = []
        for window, batches in self.epochs[epoch]:
            rows = [_piece_rows(sets.plans[p]) for p in window]
            out += [np.array([rows[a][b] for a, b in zip(x.piece, x.local, strict=True)])
                    for x in batches]
        return out


def window_tokens(sets: TokenSets, batch_size: int) -> int:
    """Tokens a window holds: ``WINDOW_BYTES`` of one layer, or ``WINDOW_BATCHES`` batches
    of rows of average length where that is more (long rows of a wide model), so that a
    window always mixes several batches' rows. A function of the layout, not the budget."""
    rows = max(1, int((sets.data.role != UNUSED).sum()))
    mean = int(sets.piece_raw.sum()) / rows
    return max(WINDOW_BYTES // (4 * sets.data.hidden), int(WINDOW_BATCHES * batch_size * mean))


def windows_of(order: np.ndarray, tokens: np.ndarray, limit: int) -> list[list[int]]:
    """Consecutive pieces of ``order`` grouped while their tokens fit ``limit``."""
    out: list[list[int]] = []
    used = 0
    for p in order:
        if out and used + int(tokens[p]) <= limit:
            out[-1].append(int(p))
            used += int(tokens[p])
        else:
            out.append([int(p)])
            used = int(tokens[p])
    return out


def schedule(sets: TokenSets, epochs: int, batch_size: int, seed: int) -> Schedule:
    """The training batches of every epoch (a pure function of the layout and the seed)."""
    role = sets.data.role
    limit = window_tokens(sets, batch_size)
    out = []
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(sets.plans))
        items = []
        for w, window in enumerate(windows_of(order, sets.piece_raw, limit)):
            piece, local = [], []
            for i, p in enumerate(window):
                rows = _piece_rows(sets.plans[p])
                fit = np.flatnonzero(role[rows] == FIT)
                piece.append(np.full(len(fit), i))
                local.append(fit)
            pieces, locals_ = np.concatenate(piece), np.concatenate(local)
            perm = np.random.default_rng([seed, epoch, w]).permutation(len(pieces))
            batches = [Batch(pieces[perm[a:a + batch_size]], locals_[perm[a:a + batch_size]])
                       for a in range(0, len(perm), batch_size)]
            items.append((window, batches))
        out.append(items)
    return Schedule(out)


def scoring_batches(pieces: Sequence[Piece], batch_size: int, role: np.ndarray
                    ) -> Iterator[Batch]:
    """Every used row of ``pieces`` once, in order, ``batch_size`` rows at a time."""
    piece = np.concatenate([np.full(len(p.rows), i) for i, p in enumerate(pieces)])
    local = np.concatenate([np.arange(len(p.rows)) for p in pieces])
    rows = np.concatenate([p.rows for p in pieces])
    keep = role[rows] != UNUSED
    piece, local = piece[keep], local[keep]
    for a in range(0, len(piece), batch_size):
        yield Batch(piece[a:a + batch_size], local[a:a + batch_size])


def assemble(pieces: Sequence[Piece], batch: Batch
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``x`` (layers, rows, T, hidden) padded with zeros to the longest row ``T``, the mask
    (rows, T) of real tokens, their positions (rows, T) and the store rows (rows,)."""
    lens = np.array([pieces[p].lengths[r] for p, r in zip(batch.piece, batch.local,
                                                            strict=True)], np.int64)
    rows = np.array([pieces[p].rows[r] for p, r in zip(batch.piece, batch.local,
                                                        strict=True)], np.int64)
    n, t = len(lens), int(lens.max())
    g, hidden = pieces[0].values.shape[0], pieces[0].values.shape[2]
    x = np.zeros((g, n * t, hidden), np.float32)
    pos = np.zeros(n * t, np.int64)
    for p in np.unique(batch.piece):
        sel = np.flatnonzero(batch.piece == p)
        src = aranges(pieces[p].starts[batch.local[sel]], lens[sel])
        dst = aranges(sel * t, lens[sel])
        x[:, dst] = pieces[p].values[:, src]
        pos[dst] = pieces[p].positions[src]
    mask = np.arange(t)[None, :] < lens[:, None]
    return x.reshape(g, n, t, hidden), mask, pos.reshape(n, t), rows


@dataclass
class TokenSource:
    """Pieces of a group of layers: read once and kept (``cache``) or read per window."""

    store: Any
    sets: TokenSets
    layers: tuple[int, ...]
    cache: bool
    reads: Reads
    limit: int
    """Tokens of a window (``window_tokens``)."""
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    _kept: dict[int, Piece] = field(default_factory=dict)

    def standardise(self, mean: np.ndarray, std: np.ndarray) -> None:
        """From now on every piece is ``(x - mean) / std`` per layer (kept ones at once)."""
        self.mean, self.std = mean.astype(np.float32), std.astype(np.float32)
        for piece in self._kept.values():
            self._scale(piece)

    def _scale(self, piece: Piece) -> None:
        if self.mean is not None and self.std is not None:
            piece.values -= self.mean[:, None, :]
            piece.values /= self.std[:, None, :]

    def load(self, p: int) -> Piece:
        """Piece ``p``'s kept tokens of the source's layers."""
        if p in self._kept:
            return self._kept[p]
        plan, hidden = self.sets.plans[p], self.sets.data.hidden
        out = np.empty((len(self.layers), len(plan), hidden), np.float32)
        self.store.reader.fetcher.fill(plan, self.layers, out, self.store.dtype)
        rows = _piece_rows(plan)
        positions = plan.positions if plan.positions is not None else np.zeros(len(plan))
        if self.sets.skip:
            kept = np.flatnonzero(positions >= self.sets.skip)
            out, positions = out[:, kept], positions[kept]
        lengths = self.sets.lengths[rows]
        piece = Piece(rows, np.cumsum(lengths) - lengths, lengths, out,
                      np.asarray(positions, np.int64))
        # Counted in rows, as the linear probes count them: passes over the used rows.
        self.reads.values += int((self.sets.data.role[rows] != UNUSED).sum()) * len(self.layers)
        self._scale(piece)
        if self.cache:
            self._kept[p] = piece
        return piece

    def windows(self, windows: list[list[int]]) -> Iterator[list[Piece]]:
        """The pieces of each window; the next window read while the caller trains."""
        if self.cache:
            for window in windows:
                yield [self.load(p) for p in window]
            return
        yield from run_ahead(([self.load(p) for p in w] for w in windows),
                             name="actcache-token-probe")

    def in_order(self) -> list[list[int]]:
        """All pieces, physical order, in windows (for the moments and the scoring)."""
        return windows_of(np.arange(len(self.sets.plans)), self.sets.piece_raw, self.limit)


def moments(source: TokenSource) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, the mean and std of the fit rows' kept tokens (float64 sums, physical
    order); a feature whose spread is float noise keeps scale 1 (as the linear probes)."""
    data = source.sets.data
    g, hidden = len(source.layers), data.hidden
    s1, s2, n = np.zeros((g, hidden)), np.zeros((g, hidden)), 0
    for pieces in source.windows(source.in_order()):
        for piece in pieces:
            fit = data.role[piece.rows] == FIT
            idx = aranges(piece.starts[fit], piece.lengths[fit])
            x = piece.values[:, idx].astype(np.float64)
            s1 += x.sum(1)
            s2 += (x * x).sum(1)
            n += len(idx)
    mean = s1 / max(n, 1)
    std = np.sqrt(np.maximum(s2 / max(n, 1) - mean * mean, 0.0))
    std = np.where(std <= 1e-12 * np.maximum(1.0, np.abs(mean)), 1.0, std)
    return mean, std


def plan_memory(sets: TokenSets, budget: int, batch_size: int, per_token_work: int
                ) -> tuple[bool, int]:
    """Whether every piece of every layer stays in memory, else layers per group.

    Kept: all raw tokens of all layers once (float32), plus a batch. Streamed: per layer,
    the window being trained on, the one read behind it and a piece's compacted copy, plus
    a batch: a padded ``(rows, T, hidden)`` float32 block and ``per_token_work`` bytes per
    padded token for the heads' activations and gradients.
    """
    hidden, n_layers = sets.data.hidden, len(sets.data.layers)
    batch = batch_size * max(1, sets.max_length) * (hidden * 4 * 2 + per_token_work)
    total = int(sets.piece_raw.sum())
    if total * hidden * 4 * n_layers + batch * n_layers <= budget:
        return True, n_layers
    window = max(window_tokens(sets, batch_size), int(sets.piece_raw.max()))
    per_layer = (2 * window + int(sets.piece_raw.max())) * hidden * 4 + batch
    group = budget // per_layer
    if group < 1:
        raise ConfigError(
            f"--max-memory {budget} bytes holds less than one layer's token window and batch "
            f"({per_layer} bytes): give at least {-(-per_layer // 2**20)}MiB or a smaller "
            "batch_size")
    return False, int(min(group, n_layers))
