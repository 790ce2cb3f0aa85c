"""Labels, splits and the row blocks every probe trains on (read through ``actcache.read``).

Rows are read in contiguous, chunk-aligned blocks of every requested layer at once, so one
read serves all layers and all strengths. Inside a block the used rows are reordered by
role (fit, then val, then test), so each phase of training sees a contiguous slice.

Labels are classes or, for a regression task, numbers (``resolve_task`` decides under
``task: auto``). Rows whose label is missing (None, NaN) are unused either way. The control
task of a regression is the same probe on a seeded permutation of the targets, within
train and within test, fixed by a hash of the ids (so it does not depend on row order).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from actcache.read import PREFETCH, prefetch, rows_per_block
from actcache.schemas.errors import (
    ColumnNotFoundError,
    ConfigError,
    ProbeDataError,
    StoreIncompleteError,
)
from actcache.schemas.probe import ProbeConfig, ProbeKind, Task

UNUSED, FIT, VAL, TEST = 0, 1, 2, 3
#: Fewest rows a streamed block is cut to when whole chunks do not fit the budget.
MIN_BLOCK_ROWS = 256
SPLIT_VALUES = ("train", "test", "val")
#: Under ``task: auto``, an integer column with more distinct values than this is a regression.
AUTO_MAX_CLASSES = 20


def hash_unit(ids: Sequence[str], salt: str, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per id, stable across runs, machines and row order."""
    out = np.empty(len(ids), dtype=np.float64)
    for i, key in enumerate(ids):
        digest = hashlib.blake2b(f"{seed}:{salt}:{key}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little") / 2.0**64
    return out


@dataclass(frozen=True)
class ProbeData:
    """What a probe run reads: layers, pooling, labels and the role of every store row."""

    layers: tuple[int, ...]
    pooling: str
    classes: tuple[Any, ...]
    y: np.ndarray
    """Class index per store row (-1 where unused)."""
    control: np.ndarray
    """Control-task class index per store row (-1 where unused)."""
    role: np.ndarray
    """UNUSED, FIT, VAL or TEST per store row."""
    hidden: int
    value: np.ndarray | None = None
    """Regression only: the numeric target per store row (NaN where unused)."""
    control_value: np.ndarray | None = None
    """Regression only: the control target per store row (NaN where unused)."""

    @property
    def regression(self) -> bool:
        return self.value is not None

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def n_targets(self) -> int:
        """Columns of a ridge target: 1 for a regression or two classes, else one per class."""
        return 1 if self.regression or self.n_classes == 2 else self.n_classes

    def targets(self, rows: np.ndarray, control: bool = False) -> np.ndarray:
        """(rows, n_targets) float64 ridge targets: the number, or the class indicators."""
        if self.value is not None and self.control_value is not None:
            return (self.control_value if control else self.value)[rows][:, None]
        return indicator((self.control if control else self.y)[rows], self.n_classes)

    def count(self, *roles: int) -> int:
        return int(np.isin(self.role, roles).sum())


def indicator(y: np.ndarray, k: int) -> np.ndarray:
    """Classification ridge targets: the second class's indicator when binary, else one-hot."""
    hot = np.eye(k)[y]
    return hot[:, 1:] if k == 2 else hot


def _classes(values: pd.Series, label: str) -> tuple[tuple[Any, ...], np.ndarray]:
    present = values.dropna()
    uniq = list(pd.unique(present))
    try:
        uniq.sort()
    except TypeError:
        uniq.sort(key=str)
    classes = tuple(u.item() if isinstance(u, np.generic) else u for u in uniq)
    if len(classes) < 2:
        shown = repr(classes[0]) if classes else "none"
        raise ProbeDataError(
            f"label column {label!r} has {len(classes)} class ({shown}); a probe needs at least "
            "two distinct labels: pick another column with --label"
        )
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[v] if v in index else -1 for v in values.where(values.notna(), None)])
    return classes, y.astype(np.int64)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float | np.number) and not isinstance(v, bool)


def _as_numbers(values: pd.Series) -> np.ndarray | None:
    """float64 per row (NaN where missing), or None when a present value is not a number."""
    if pd.api.types.is_numeric_dtype(values.dtype):
        return values.to_numpy(dtype=np.float64, na_value=np.nan)
    if not all(_is_number(v) for v in values.dropna()):
        return None
    return pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def resolve_task(values: pd.Series, task: Task) -> tuple[Task, str]:
    """The task a label column asks for, and why (for messages).

    ``auto``: regression when the column is numeric and holds a non-integer value (only a
    float column can) or more than ``AUTO_MAX_CLASSES`` distinct values; else classification.
    """
    if task != Task.AUTO:
        return task, f"--task {task.value}"
    nums = _as_numbers(values)
    if nums is None:
        return Task.CLASSIFICATION, "non-numeric values"
    present = nums[~np.isnan(nums)]
    if np.any(present != np.round(present)):
        return Task.REGRESSION, "non-integer numbers"
    distinct = len(np.unique(present))
    if distinct > AUTO_MAX_CLASSES:
        return Task.REGRESSION, f"{distinct} distinct numbers"
    return Task.CLASSIFICATION, f"{distinct} distinct values"


def _regression_values(values: pd.Series, label: str, why: str, config: ProbeConfig
                       ) -> np.ndarray:
    wrong = [p.value for p in config.probes if p != ProbeKind.RIDGE]
    if wrong:
        names = ", ".join(wrong)
        raise ProbeDataError(
            f"{'probes' if len(wrong) > 1 else 'probe'} {names} "
            f"{'need' if len(wrong) > 1 else 'needs'} class labels, but label column "
            f"{label!r} is a regression target ({why}): use --probe ridge, or --task "
            "classification to treat each value as a class"
        )
    nums = _as_numbers(values)
    if nums is None:
        bad = next(v for v in values.dropna() if not _is_number(v))
        raise ProbeDataError(
            f"label column {label!r} holds non-numeric values (e.g. {bad!r}); a regression "
            "needs numbers: use --task classification or pick another column with --label"
        )
    if np.isinf(nums).any():
        raise ProbeDataError(
            f"label column {label!r} holds infinite values; a regression needs finite "
            "numbers: fix those values or pick another column with --label"
        )
    if len(np.unique(nums[~np.isnan(nums)])) < 2:
        raise ProbeDataError(
            f"label column {label!r} holds fewer than two distinct numbers; a regression "
            "needs at least two: pick another column with --label"
        )
    return nums


def _permuted(ids: Sequence[str], value: np.ndarray, role: np.ndarray, seed: int
              ) -> np.ndarray:
    """Regression control targets: the targets shuffled within train and within test.

    The shuffle pairs rows ordered by one id hash with rows ordered by another, so it
    depends on the ids and the seed only, not on the store's row order.
    """
    first, second = hash_unit(ids, "control", seed), hash_unit(ids, "control-source", seed)
    out = np.full(len(value), np.nan)
    for group in ((FIT, VAL), (TEST,)):
        rows = np.flatnonzero(np.isin(role, group))
        dest = rows[np.argsort(first[rows], kind="stable")]
        source = rows[np.argsort(second[rows], kind="stable")]
        out[dest] = value[source]
    return out


def _split_roles(store: Any, config: ProbeConfig, used: np.ndarray) -> np.ndarray:
    ids = list(store.ids)
    role = np.full(len(ids), UNUSED, dtype=np.int8)
    has_val = False
    if config.split_column is not None:
        col = config.split_column
        if col not in store.metadata.columns:
            raise ColumnNotFoundError(
                f"split column {col!r} is not in the store's metadata; available columns: "
                f"{', '.join(map(str, store.metadata.columns))}"
            )
        split = store.metadata[col]
        text = split.astype(object).where(split.notna(), "<missing>").astype(str)
        bad = sorted(set(text[used]) - set(SPLIT_VALUES))
        if bad:
            raise ProbeDataError(
                f"split column {col!r} must hold train, test or val; found {', '.join(bad)}: "
                "fix those values or use --test-fraction"
            )
        t = text.to_numpy()
        role[used & (t == "train")] = FIT
        role[used & (t == "val")] = VAL
        role[used & (t == "test")] = TEST
        has_val = bool((role == VAL).any())
        where = f"rows with {col!r} == 'test'"
    else:
        test = hash_unit(ids, "test", config.seed) < config.test_fraction
        role[used & test] = TEST
        role[used & ~test] = FIT
        where = f"--test-fraction {config.test_fraction} of {int(used.sum())} rows selects none"
    if not (role == TEST).any():
        raise ProbeDataError(f"the test split is empty: {where}; give more rows or another split")
    if not (role == FIT).any():
        raise ProbeDataError("the train split is empty: mark rows 'train' or lower --test-fraction")
    if not has_val:
        val = hash_unit(ids, "val", config.seed) < config.val_fraction
        role[(role == FIT) & val] = VAL
        if not (role == VAL).any() or not (role == FIT).any():
            raise ProbeDataError(
                f"train has too few rows ({int(np.isin(role, (FIT, VAL)).sum())}) to hold out "
                f"{config.val_fraction:.0%} for validation: give more rows"
            )
    return role


def _control_labels(ids: Sequence[str], y: np.ndarray, train: np.ndarray, k: int, seed: int
                    ) -> np.ndarray:
    """A fixed random class per input, drawn with the train class frequencies."""
    freq = np.bincount(y[train], minlength=k).astype(np.float64)
    cdf = np.cumsum(freq / freq.sum())
    u = hash_unit(ids, "control", seed)
    ctl = np.minimum(np.searchsorted(cdf, u, side="right"), k - 1)
    return np.where(y >= 0, ctl, -1).astype(np.int64)


def prepare(store: Any, config: ProbeConfig) -> ProbeData:
    """Check the store, resolve layers/pooling, and build labels and splits."""
    if not store.complete:
        raise StoreIncompleteError(
            f"store {store.url} is incomplete: some units are not cached yet; finish it with "
            "`actcache cache JOB.yaml`, then rerun `actcache probe`"
        )
    pooled = [p for p in store.poolings if p != "tokens"]
    # A store of tokens only: the token probes are the ones that read it.
    pooling = "tokens" if config.pooling is None and not pooled else store.resolve_pooling(
        config.pooling)
    if pooling == "tokens":
        raise ConfigError(
            "probes logistic, ridge and mean-diff need one row per example, not 'tokens': "
            f"choose a pooled representation with --pooling ({', '.join(pooled) or 'none'}) "
            "or a token probe with --probe attentive, moment or token-logistic"
        )
    layers, column = layers_and_labels(store, config)
    task, why = resolve_task(column, config.task)
    if task == Task.REGRESSION:
        value = _regression_values(column, config.label, why, config)
        y = np.where(np.isnan(value), -1, 0).astype(np.int64)
        role = _split_roles(store, config, y >= 0)
        value = np.where(role != UNUSED, value, np.nan)
        if len(np.unique(value[role == FIT])) < 2:
            raise ProbeDataError(
                f"the fit part of train has one value of {config.label!r} only; a regression "
                "needs at least two distinct values: check the split and label columns"
            )
        control_value = _permuted(store.ids, value, role, config.seed)
        return ProbeData(layers, pooling, (), y, y.copy(), role, int(store.hidden_size),
                         value, control_value)
    classes, y = _classes(column, config.label)
    role, control = class_roles(store, config, classes, y)
    return ProbeData(layers, pooling, classes, y, control, role, int(store.hidden_size))


def layers_and_labels(store: Any, config: ProbeConfig) -> tuple[tuple[int, ...], pd.Series]:
    """The requested layers as stored indices (each once) and the label column."""
    wanted = store.layers if config.layers == "all" else config.layers
    layers = tuple(dict.fromkeys(store.resolve_layer(int(layer)) for layer in wanted))
    meta = store.metadata
    if config.label not in meta.columns:
        raise ColumnNotFoundError(
            f"label column {config.label!r} is not in the store's metadata; available columns: "
            f"{', '.join(map(str, meta.columns)) or 'none'}"
        )
    return layers, meta[config.label]


def class_roles(store: Any, config: ProbeConfig, classes: tuple[Any, ...], y: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """The role of every row labelled ``y >= 0`` and the control labels, with train and
    its fit part each holding two classes at least."""
    role = _split_roles(store, config, y >= 0)
    train = np.isin(role, (FIT, VAL))
    for name, mask in (("train", train), ("fit part of train", role == FIT)):
        present = np.unique(y[mask])
        if len(present) < 2:
            raise ProbeDataError(
                f"the {name} split has one class only ({classes[present[0]]!r}); it needs at "
                "least two: check the split and label columns"
            )
    return role, _control_labels(store.ids, y, train, len(classes), config.seed)


@dataclass
class Block:
    """A contiguous stretch of store rows: the used ones, ordered fit, val, test."""

    start: int
    rows: np.ndarray
    """Store positions of the block's used rows, in block order."""
    x: Any
    """(layers, rows, hidden) activations: numpy raw, or the transform's output."""
    n_fit: int
    n_val: int
    n_test: int

    @property
    def n_train(self) -> int:
        return self.n_fit + self.n_val


@dataclass
class Reads:
    """Used rows × layers read from the store, shared by every source of a probe run."""

    values: int = 0

    def passes(self, data: ProbeData, n_layers: int) -> float:
        """Reads as full passes over the used rows of ``n_layers`` layers."""
        return self.values / max(1, data.count(FIT, VAL, TEST) * n_layers)


@dataclass
class BlockSource:
    """Chunk-aligned blocks of ``data.layers``, from memory or streamed with prefetch."""

    store: Any
    data: ProbeData
    block_rows: int
    cache: bool
    seed: int = 0
    reads: Reads = field(default_factory=Reads)
    _spans: list[tuple[int, int]] = field(default_factory=list)
    _cached: list[Block] | None = None
    _transform: Callable[[np.ndarray], Any] | None = None

    def __post_init__(self) -> None:
        used = np.flatnonzero(self.data.role != UNUSED)
        step = self.block_rows
        first = (int(used[0]) // step) * step
        for start in range(first, int(used[-1]) + 1, step):
            stop = min(start + step, self.store.n_rows)
            if (self.data.role[start:stop] != UNUSED).any():
                self._spans.append((start, stop))

    @property
    def n_blocks(self) -> int:
        return len(self._spans)

    def set_transform(self, fn: Callable[[np.ndarray], Any]) -> None:
        """Apply ``fn`` to every block from now on (once, to cached blocks)."""
        self._transform = fn
        if self._cached is not None:
            for block in self._cached:
                block.x = fn(block.x)

    def _read(self, start: int, stop: int, buffer: np.ndarray | None = None) -> Block:
        """Rows [start, stop) of every layer, into ``buffer`` (a flat float32 array) if given."""
        role = self.data.role[start:stop]
        order = np.concatenate([np.flatnonzero(role == r) for r in (FIT, VAL, TEST)])
        counts = [int((role == r).sum()) for r in (FIT, VAL, TEST)]
        shape = (len(self.data.layers), len(order), self.data.hidden)
        if buffer is None:
            x = np.empty(shape, dtype=np.float32)
        else:
            x = buffer[: int(np.prod(shape))].reshape(shape)
        self.store.reader.read_into(self.data.layers, self.data.pooling, start + order, x)
        self.reads.values += len(order) * len(self.data.layers)
        block = Block(start, start + order, x, *counts)
        if self._transform is not None:
            block.x = self._transform(block.x)
        return block

    def blocks(self, epoch: int = 0) -> Iterator[Block]:
        """Every block once, in a block order shuffled per epoch (seeded)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
        if self.cache and self._cached is None:
            cached = [self._read(*self._spans[i]) for i in range(self.n_blocks)]
            self._cached = cached
        if self._cached is not None:
            for i in order:
                yield self._cached[i]
            return
        size = len(self.data.layers) * self.block_rows * self.data.hidden
        yield from prefetch([self._spans[i] for i in order],
                            lambda span, buffer: self._read(span[0], span[1], buffer), size,
                            name="actcache-probe-prefetch")


def plan_blocks(store: Any, data: ProbeData, budget: int, cols: int) -> tuple[int, bool]:
    """Rows per block (a multiple of the store's chunk) and whether every block fits cached.

    Streamed, ``PREFETCH`` blocks live at once (the one consumed and the one being read,
    standardised in place), plus the stored values of one of its layers being widened
    (``stream_rows``). Whole chunks read fastest (zarr decodes a whole chunk to return
    part of one), so blocks are whole chunks when those fit. Each row also carries
    ``cols`` float32 logits and their gradients per layer.
    """
    n_layers, hidden = len(data.layers), data.hidden
    row_x = n_layers * hidden * 4
    row_work = n_layers * cols * 4 * 4
    n_used = data.count(FIT, VAL, TEST)
    chunk = max(1, int(store.chunk_rows))
    if (n_used * row_x) * 2 + chunk * (row_x + row_work) * 2 <= budget:
        cache_rows = (budget - n_used * row_x * 2) // (2 * (row_x + row_work))
        return max(chunk, (cache_rows // chunk) * chunk), True
    return stream_rows(chunk, budget, n_layers, hidden, row_work), False


def stream_rows(chunk: int, budget: int, n_layers: int, hidden: int, row_work: int) -> int:
    """Rows per streamed block: whole chunks when one fits ``budget``, else a part.

    Per row: ``PREFETCH`` float32 rows of every layer, one layer's stored values and their
    reordered copy (at most 4 bytes a value each), and ``row_work``.
    """
    row_bytes = PREFETCH * n_layers * hidden * 4 + 2 * hidden * 4 + row_work
    return rows_per_block(chunk, row_bytes, budget, MIN_BLOCK_ROWS)
