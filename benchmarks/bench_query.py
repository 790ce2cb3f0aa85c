"""Query benchmark: reading a few ids against reading a whole layer, and streamed top-k
against numpy over the same layer held in memory, in one run on one synthetic store.

    python benchmarks/bench_query.py                      # ~1 min on 2 cores
    python benchmarks/bench_query.py --rows 1000000 --store s3://bucket/bench.zarr

Prints each timing and the ratios: how much faster k random ids are than the whole layer
(only the chunks holding them are read), and top-k throughput relative to numpy.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from actcache import open_store
from actcache.testing import synthetic_store


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median seconds over ``repeats`` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def numpy_topk(x: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    """What a user would write with the layer in memory: project, partition, sort."""
    scores = x @ w
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.lexsort((part, -scores[part]))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--rows-per-unit", type=int, default=4096)
    parser.add_argument("--ids", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--store", default=None, help="Store URL (default: a temp folder).")
    args = parser.parse_args()

    url = args.store or f"{tempfile.mkdtemp(prefix='bench-query-')}/bench.zarr"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.hidden), dtype=np.float32)
    started = time.perf_counter()
    synthetic_store(url, {0: x}, [f"row-{i}" for i in range(args.rows)],
                    [{"label": i % 2} for i in range(args.rows)],
                    rows_per_unit=args.rows_per_unit, dtype=args.dtype)
    print(f"store: {args.rows} rows x {args.hidden} {args.dtype} at {url} "
          f"(written in {time.perf_counter() - started:.1f}s)")
    s = open_store(url)
    x = s.read(0)  # the exact values numpy will see, decoded to float32, held in memory

    whole_s, _ = timed(lambda: s.read(0), max(1, args.repeats // 2))
    print(f"whole layer read: {whole_s * 1e3:9.1f} ms ({args.rows / whole_s:,.0f} rows/s)")
    for k in args.ids:
        def read_ids(k: int = k) -> np.ndarray:
            ids = [s.ids[i] for i in rng.choice(args.rows, k, replace=False)]
            return s.read(0, rows=s.rows_for_ids(ids))
        ids_s, _ = timed(read_ids, args.repeats * 4)
        print(f"{k:>5} random ids:  {ids_s * 1e3:9.2f} ms   "
              f"whole layer / ids = {whole_s / ids_s:,.1f}x")

    w = rng.standard_normal(args.hidden).astype(np.float32)
    top_s, top = timed(lambda: s.topk(0, w, args.k), max(1, args.repeats // 2))
    np_s, expected = timed(lambda: numpy_topk(x, w, args.k), args.repeats)
    if top.rows.tolist() != expected.tolist():
        raise SystemExit("top-k differs from numpy: the benchmark is not comparing like with like")
    print(f"top-{args.k} streamed from the store: {args.rows / top_s:>14,.0f} rows/s")
    print(f"top-{args.k} numpy over memory:       {args.rows / np_s:>14,.0f} rows/s")
    print(f"store top-k throughput / numpy in memory = {np_s / top_s:.3f} "
          f"(the store reads and decompresses; numpy starts from float32 in RAM)")
    print(f"store top-k / (whole-layer read + numpy) = {(whole_s + np_s) / top_s:.2f}x "
          f"(streaming against reading the layer into memory first)")
    nn_s, _ = timed(lambda: s.nearest(0, x[0], args.k), max(1, args.repeats // 2))
    print(f"nearest-{args.k} (cosine) streamed:     {args.rows / nn_s:>14,.0f} rows/s")


if __name__ == "__main__":
    main()
