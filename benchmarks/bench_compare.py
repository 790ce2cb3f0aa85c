"""Compare benchmark: exact streaming CKA of every layer of one store against every layer
of another, against one reader pass over the same rows of both stores, against its own
float64 products alone (the same sums over the same blocks, already in memory: the
arithmetic floor) and against numpy with both stores held in memory.

    python benchmarks/bench_compare.py                    # ~1 min on 2 cores
    python benchmarks/bench_compare.py --rows 100000 --hidden 768 --layers 13
    python benchmarks/bench_compare.py --same-order       # B holds the ids in A's order

By default the two stores hold the same ids in different orders (B shuffled), as two
models cached from differently ordered inputs would: compare reads A in its physical
order and the matching rows of B by position. Prints each time and the ratios.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _timing import best_alternating, timer  # noqa: E402

from actcache import compare, open_store  # noqa: E402
from actcache.similarity import _moments, api  # noqa: E402
from actcache.testing import synthetic_store  # noqa: E402


def one_pass(a, b, rows_b) -> None:
    """Every layer of A in blocks, and the matching rows of B read alongside, as compare
    reads them, with no arithmetic."""
    order = np.empty(a.n_rows, dtype=np.int64)
    order[np.arange(a.n_rows)] = rows_b
    for layer in a.layers:
        for block in a.blocks(layer):
            block.values.sum()
    for block in a.blocks(a.layers[0]):
        for layer in b.layers:
            b.read(layer, rows=order[block.rows])


def products(blocks, widths, pairs) -> None:
    """The sums compare accumulates, over blocks already in memory: no reading."""
    moments = _moments.Moments(widths, pairs)
    for block in blocks:
        moments.add(block)


def in_memory(a, b, rows_b) -> np.ndarray:
    xs = [a.read(layer).astype(np.float64) for layer in a.layers]
    ys = [b.read(layer, rows=rows_b).astype(np.float64) for layer in b.layers]
    xs = [x - x.mean(0) for x in xs]
    ys = [y - y.mean(0) for y in ys]
    out = np.empty((len(xs), len(ys)))
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            out[i, j] = (np.linalg.norm(y.T @ x) ** 2
                         / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--same-order", action="store_true",
                        help="B holds the ids in A's order (one input file, two models)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    root = tempfile.mkdtemp()
    n, d = args.rows, args.hidden
    base = rng.normal(size=(n, d)).astype(np.float32)
    xa = {i: base + rng.normal(size=(n, d)).astype(np.float32) * i for i in range(args.layers)}
    perm = np.arange(n) if args.same_order else rng.permutation(n)
    xb = {i: (xa[i][perm] * 0.5 + 1).astype(np.float16) for i in range(args.layers)}
    ids = [str(i) for i in range(n)]
    synthetic_store(f"{root}/a", xa, ids=ids, rows_per_unit=1024, dtype="float16")
    synthetic_store(f"{root}/b", xb, ids=[ids[p] for p in perm], rows_per_unit=1024,
                    dtype="float16")
    a, b = open_store(f"{root}/a"), open_store(f"{root}/b")
    rows_b = b.rows_for_ids(a.ids)

    frame = compare(a, b)
    reference = in_memory(a, b, rows_b)
    error = np.abs(frame["value"].to_numpy().reshape(reference.shape) - reference).max()
    t_compare, t_pass = best_alternating(timer(lambda: compare(a, b)),
                                         timer(lambda: one_pass(a, b, rows_b)), args.repeats)
    t_numpy = min(timer(lambda: in_memory(a, b, rows_b))() for _ in range(args.repeats))
    # The blocks compare reads (same sizes), copied out of the reader's ring into memory.
    sides = api._align(a, b, None)
    feats = api._features(sides, None, "a") + api._features(sides, None, "b")
    blocks = [[v.copy() for v in block] for block in api._aligned_blocks(
        sides, feats, api.DEFAULT_MAX_MEMORY // 4, None)]
    pairs = [(u, v) for u in range(args.layers) for v in range(args.layers, 2 * args.layers)]
    pairs += [(i, i) for i in range(2 * args.layers)]
    widths = [f.width for f in feats]
    t_products = min(timer(lambda: products(blocks, widths, pairs))()
                     for _ in range(args.repeats))
    order = "the same order" if args.same_order else "different orders"
    print(f"{n} rows, {args.layers}x{args.layers} layer pairs, hidden {d}, float16 stores "
          f"holding the ids in {order}, {len(blocks)} blocks")
    print(f"compare (streamed cka): {t_compare:.2f}s   one reader pass: {t_pass:.2f}s   "
          f"its float64 products alone: {t_products:.2f}s   "
          f"numpy in memory (read + cka): {t_numpy:.2f}s")
    print(f"compare / reader pass: {t_compare / t_pass:.2f}x   "
          f"compare / (reader pass + products): {t_compare / (t_pass + t_products):.2f}x   "
          f"compare / numpy in memory: {t_compare / t_numpy:.2f}x   "
          f"max |difference| from numpy: {error:.1e}")


if __name__ == "__main__":
    main()
