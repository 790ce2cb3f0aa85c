"""``actcache.similarity``: similarity of every layer of one store with every layer of
another (or of the same store), on the rows both hold, aligned by id.

CKA is exact and streamed: every pair of layers needs only float64 sums over rows
(``_moments``), so one pass over the aligned rows gives all pairs whose sums fit in
``max_memory``; when they do not, the layers are cut into groups and each pair of groups
takes one pass (``plan_passes``). mutual-knn holds one layer's rows at a time in memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from actcache.schemas.errors import ConfigError
from actcache.similarity import _knn, _moments

if TYPE_CHECKING:
    import pandas as pd

    from actcache.store import Store

METRICS = ("cka", "cka-debiased", "mutual-knn")
COLUMNS = ["store_a", "layer_a", "store_b", "layer_b", "metric", "value", "n_rows"]
DEFAULT_MAX_MEMORY = 2 * 10**9
"""Bytes for sums and blocks when none is given: all pairs of a 13-layer, 768-wide model
against another fit in one pass (about 0.9 GB of float64 products: 9,984² for A by B,
768² for each layer alone)."""
MAX_BLOCK_BYTES = 256 * 2**20
"""float32 bytes of one block of all the layers of a pass, at most. Larger than the read
path's 32 MiB: the rows of a block are the inner dimension of the products (BLAS runs
slower below a few thousand), and when the two stores hold the shared ids in different
orders every block of A reads the chunks of B that hold its rows, so B is read once per
block of A."""
BYTES_PER_VALUE = 20
"""Per value of a block: float32 twice (the block and the one read behind it), float64
once (the shifted block the products read), and a margin for the stored values in
flight."""


@dataclass(frozen=True)
class Feature:
    side: str  # "a" or "b"
    layer: int
    width: int


@dataclass
class _Sides:
    stores: dict[str, Store]
    poolings: dict[str, str]
    rows: dict[str, np.ndarray]  # aligned store positions; rows["a"][i] ~ rows["b"][i]

    def other_of(self, driver: str) -> np.ndarray:
        """Map from the driver's store positions to the other store's aligned positions."""
        other = "b" if driver == "a" else "a"
        out = np.full(self.stores[driver].n_rows, -1, dtype=np.int64)
        out[self.rows[driver]] = self.rows[other]
        return out


def compare(a: Store | str, b: Store | str | None = None, metric: str = "cka",
            layers_a: Sequence[int] | None = None, layers_b: Sequence[int] | None = None,
            pooling: str | None = None, max_memory: int | str | None = None, *,
            k: int = 10, sample: int | None = None, seed: int = 0,
            block_bytes: int | None = None) -> pd.DataFrame:
    """Similarity of each layer of ``a`` with each layer of ``b`` (``a`` itself when
    ``b`` is None) on the rows whose ids both hold.

    Columns: ``store_a, layer_a, store_b, layer_b, metric, value, n_rows``; layers are the
    models' hidden-state indices. ``metric``: ``cka`` (linear, centred features),
    ``cka-debiased`` (each HSIC by Song et al.'s unbiased estimator) or ``mutual-knn``
    (Huh et al. 2024, ``k`` neighbours, on ``sample`` rows drawn with ``seed``; all rows
    by default). ``max_memory`` bounds the sums and blocks held (bytes or "512MB").
    """
    import pandas as pd

    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    budget = _budget(max_memory)
    sides = _align(_open(a), None if b is None else _open(b), pooling)
    feats = _features(sides, layers_a, "a") + ([] if b is None else _features(sides, layers_b, "b"))
    left = [f for f in feats if f.side == "a"]
    right = [f for f in feats if f.side == "b"] or (
        left if layers_b is None else _features(sides, layers_b, "a"))
    if b is None:  # one store: a layer asked for on both sides is read once
        feats = list(dict.fromkeys(left + right))
    n = len(sides.rows["a"])
    if metric == "mutual-knn":
        values, n = _knn_values(sides, feats, left, right, k, sample, seed, budget)
    else:
        if metric == "cka-debiased" and n < 4:
            raise ConfigError(f"cka-debiased needs at least 4 shared rows; the stores share {n}")
        values = _cka_values(sides, feats, left, right, metric, budget, block_bytes)
    urls = {s: st.url for s, st in sides.stores.items()}
    records = [(urls["a"], fa.layer, urls.get("b", urls["a"]), fb.layer, metric,
                values[fa, fb], n) for fa in left for fb in right]
    return pd.DataFrame.from_records(records, columns=COLUMNS)


def _open(store: Store | str) -> Store:
    from actcache.store import open_store

    return open_store(store) if isinstance(store, str) else store


def _budget(max_memory: int | str | None) -> int:
    if max_memory is None:
        return DEFAULT_MAX_MEMORY
    from actcache.schemas.probe import parse_bytes

    try:
        return parse_bytes(max_memory)
    except ValueError as e:
        raise ConfigError(f"--max-memory: {e}") from None


def _align(a: Store, b: Store | None, pooling: str | None) -> _Sides:
    stores = {"a": a} if b is None else {"a": a, "b": b}
    poolings = {s: st.resolve_pooling(pooling) for s, st in stores.items()}
    if "tokens" in poolings.values():
        raise ConfigError("compare aligns rows by id, not tokens: give a pooled --pooling "
                          f"(stored: {', '.join(p for p in a.poolings if p != 'tokens')})")
    if b is None:
        return _Sides(stores, poolings, {"a": np.arange(a.n_rows, dtype=np.int64)})
    in_b = set(b.ids)
    shared = [i for i in a.ids if i in in_b]  # in A's order; any order gives the same sums
    if not shared:
        raise ConfigError(
            f"no id is in both stores ({a.url} has {a.n_rows} rows, e.g. {a.ids[:2]}; "
            f"{b.url} has {b.n_rows}, e.g. {b.ids[:2]}): compare needs stores of the same inputs")
    return _Sides(stores, poolings, {"a": a.rows_for_ids(shared), "b": b.rows_for_ids(shared)})


def _features(sides: _Sides, layers: Sequence[int] | None, side: str) -> list[Feature]:
    store = sides.stores[side]
    chosen = store.layers if layers is None else [store.resolve_layer(x) for x in layers]
    return [Feature(side, int(x), store.hidden_size) for x in dict.fromkeys(chosen)]


def plan_passes(feats: Sequence[Feature], pairs: Sequence[tuple[int, int]],
                budget: int) -> list[list[tuple[int, int]]] | None:
    """Pairs of feature indices grouped into passes whose sums fit ``budget`` (None when
    not even one pair does).

    The features are cut into contiguous groups of g (the largest g that fits); a pass
    takes every pair between two groups (or within one), so each feature is read once per
    pass it appears in and each pair is summed exactly once. A pass's sums are a few large
    products over its features side by side (``_moments.Layout``).
    """
    for g in range(len(feats), 0, -1):
        passes: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for u, v in pairs:
            key = (min(u // g, v // g), max(u // g, v // g))
            passes.setdefault(key, []).append((u, v))
        if max(_pass_bytes(feats, p) for p in passes.values()) <= budget:
            return list(passes.values())
    return None


def _pass_bytes(feats: Sequence[Feature], pairs: Sequence[tuple[int, int]]) -> int:
    used = sorted({f for p in pairs for f in p})
    local = {f: i for i, f in enumerate(used)}
    return _moments.pass_bytes([feats[f].width for f in used],
                               [(local[u], local[v]) for u, v in pairs])


def _cka_values(sides: _Sides, feats: list[Feature], left: list[Feature],
                right: list[Feature], metric: str, budget: int,
                block_bytes: int | None) -> dict[tuple[Feature, Feature], float]:
    at = {f: i for i, f in enumerate(feats)}
    wanted = {(min(at[x], at[y]), max(at[x], at[y])) for x in left for y in right}
    pairs = sorted(wanted | {(i, i) for i in range(len(feats))})
    sums: dict[tuple[int, int], _moments.PairSums] = {}
    # Three quarters of the budget for the sums, the rest for the blocks of a pass.
    passes = plan_passes(feats, pairs, budget * 3 // 4)
    if passes is None:
        need = max(_pass_bytes(feats, [p]) for p in pairs)
        raise ConfigError(
            f"--max-memory of {budget} bytes holds not even one pair of layers' sums "
            f"({need} bytes, float64, for the widest pair): give at least {-(-need * 4 // 3)}")
    for group in passes:
        used = sorted({f for p in group for f in p})
        blocks = _aligned_blocks(sides, [feats[f] for f in used], budget // 4, block_bytes)
        local = {f: i for i, f in enumerate(used)}
        got = _moments.accumulate(blocks, [feats[f].width for f in used],
                                  [(local[u], local[v]) for u, v in group])
        sums.update({(u, v): got[local[u], local[v]] for u, v in group})
    score = _moments.cka if metric == "cka" else _moments.cka_debiased
    out = {}
    for x in left:
        for y in right:
            u, v = sorted((at[x], at[y]))
            out[x, y] = score(sums[u, v], sums[u, u], sums[v, v])
    return out


def _aligned_blocks(sides: _Sides, used: list[Feature], budget: int,
                    block_bytes: int | None) -> Iterator[list[np.ndarray]]:
    """Per block of aligned rows, one array per feature in ``used``, rows matched by id.

    The driver store (a, unless the pass reads only b) is cut into chunk-aligned blocks in
    physical order, all its layers of the pass read into one block; the other store's
    values for exactly those rows (matched by id, in whatever order it holds them) are
    read into the same block. Both reads run on a thread while the caller multiplies the
    block before (``prefetch``), so reading both stores overlaps the arithmetic. Every
    aligned row is summed once, each with its own counterpart, and the sums do not depend
    on the order of rows: the result is the in-memory one.
    """
    from actcache.read import prefetch

    driver = "a" if any(f.side == "a" for f in used) else "b"
    other = "b" if driver == "a" else "a"
    store = sides.stores[driver]
    mine = [f for f in used if f.side == driver]
    theirs = [f for f in used if f.side != driver]
    per_row = sum(f.width for f in used)  # float32 values of one row of a block
    if block_bytes is None:
        rows = max(1, budget // (BYTES_PER_VALUE * per_row))
        block_bytes = min(MAX_BLOCK_BYTES, rows * per_row * 4)
    # The plans size a block by the driver's layers alone: scale the bytes to their share.
    share = max(1, block_bytes * len(mine) * store.hidden_size // per_row)
    plans = store.reader.plans(sides.poolings[driver], np.sort(sides.rows[driver]), share,
                               n_layers=len(mine))
    if not plans:
        return
    to_other = sides.other_of(driver) if theirs else None
    layers_mine = tuple(f.layer for f in mine)
    layers_theirs = tuple(f.layer for f in theirs)

    def read(plan: Any, buffer: np.ndarray) -> list[np.ndarray]:
        m = len(plan)
        cut = len(mine) * m * store.hidden_size
        values = buffer[:cut].reshape(len(mine), m, store.hidden_size)
        store.reader.fetcher.fill(plan, layers_mine, values, store.dtype)
        got = dict(zip(mine, values, strict=True))
        if to_other is not None:
            o = sides.stores[other]
            rest = buffer[cut:cut + len(theirs) * m * o.hidden_size].reshape(
                len(theirs), m, o.hidden_size)
            o.reader.read_into(layers_theirs, sides.poolings[other], to_other[plan.rows], rest)
            got.update(zip(theirs, rest, strict=True))
        return [got[f] for f in used]

    yield from prefetch(plans, read, max(len(p) for p in plans) * per_row,
                        name="actcache-compare-read")


def _knn_values(sides: _Sides, feats: list[Feature], left: list[Feature],
                right: list[Feature], k: int, sample: int | None, seed: int,
                budget: int) -> tuple[dict[tuple[Feature, Feature], float], int]:
    n = len(sides.rows["a"])
    chosen = np.arange(n)
    if sample is not None:
        if sample < 1:
            raise ConfigError(f"--sample must be at least 1, not {sample}")
        if sample < n:
            chosen = np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
    m = len(chosen)
    if k < 1:
        raise ConfigError(f"mutual-knn's k must be at least 1, not {k}")
    if k >= m:
        raise ConfigError(f"mutual-knn with k={k} needs more than k rows; the sample has {m}")
    need = _knn.knn_bytes(m, max(f.width for f in feats), k, len(feats))
    if need > budget:
        raise ConfigError(
            f"mutual-knn over {m} rows needs {-(-need // 2**20)}MiB in memory: raise "
            f"--max-memory to that or draw fewer rows with --sample")
    knn: dict[Feature, np.ndarray] = {}
    for f in feats:
        rows = sides.rows[f.side][chosen]
        values = sides.stores[f.side].read(f.layer, sides.poolings[f.side], rows=rows)
        knn[f] = _knn.nearest_neighbours(values, k)
    return {(x, y): _knn.mutual_knn(knn[x], knn[y]) for x in left for y in right}, m

