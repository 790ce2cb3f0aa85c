"""Reading a store: ``Store.blocks`` against the chunk files' bytes widened with numpy,
measured in the same run.

1. Pooled pass: every layer of a local float16 store through ``Store.blocks`` against the
   baseline (each shard file read whole, each chunk's values taken from its bytes as the
   shard index places them, widened with numpy's cast, no checksum checked); zarr-python's
   ``[:]`` and the same through the zarrs codec pipeline are printed for reference.
2. Token pass: the same over a local token store (lengths 1..max, uniform).
3. The pooled pass on S3 (a moto server on 127.0.0.1): the baseline fetches the same shard
   objects with s3fs, 16 requests in flight as the store keeps, then widens them.
4. Top-k and nearest (cosine) streamed from a local store against numpy over the same
   layer held in memory as float32, in rows/s.

    python benchmarks/bench_read.py            # ~5 min on 2 cores
    python benchmarks/bench_read.py --quick    # smaller stores, ~1 min

Each side runs ``--repeats`` times, alternating with its baseline, best kept, after one
untimed pass that warms the page cache and checks both sides read the same values.
MB/s counts stored bytes (float16: 2 per value); a ratio above 1 means actcache is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from _timing import best_alternating, timer
from bench_query import numpy_topk

from actcache.testing import synthetic_store


# -- the baseline: a shard's bytes, its values found through its index ---------------------
@dataclass(frozen=True)
class Layout:
    """What the baseline needs of an array's zarr.json to find values in a shard's bytes."""

    rows: int
    """Rows holding values (a pooled array's last unit may be partly empty)."""
    shard_rows: int
    chunk_rows: int
    hidden: int
    dtype: np.dtype

    @classmethod
    def of(cls, meta: dict[str, Any], rows: int | None = None) -> Layout:
        inner = meta["codecs"][0]["configuration"]["chunk_shape"]
        shape = meta["shape"]
        return cls(shape[0] if rows is None else min(rows, shape[0]),
                   meta["chunk_grid"]["configuration"]["chunk_shape"][0], inner[0], shape[1],
                   np.dtype(meta["data_type"]))


def shard_chunks(data: bytes, shard: int, lay: Layout) -> Iterator[np.ndarray]:
    """The stored values of each inner chunk of shard number ``shard`` (views, no copy).

    The shard index at the end holds (offset, nbytes) per chunk, then its own crc32c; each
    chunk's last 4 bytes are its crc32c, left unchecked; rows past ``lay.rows`` are skipped.
    """
    n = lay.shard_rows // lay.chunk_rows
    index = np.frombuffer(data, np.uint64, 2 * n, len(data) - 16 * n - 4).reshape(n, 2)
    for i, (offset, _) in enumerate(index.tolist()):
        keep = min(lay.chunk_rows, lay.rows - shard * lay.shard_rows - i * lay.chunk_rows)
        if keep <= 0 or offset == 2**64 - 1:  # past the values, or an empty chunk
            continue
        yield np.frombuffer(data, lay.dtype, keep * lay.hidden, offset).reshape(keep, lay.hidden)


def shard_files(folder: Path) -> list[tuple[int, Path]]:
    """(shard number, file) of every shard of the array at ``folder``, in shard order."""
    files = [(int(p.relative_to(folder / "c").parts[0]), p)
             for p in (folder / "c").rglob("*") if p.is_file()]
    return sorted(files)


def widen_all(shards: list[tuple[int, bytes, Layout]], check: list[np.ndarray] | None) -> float:
    """Widen every chunk with numpy, touching one value of each; with ``check``, also
    append each chunk's column sums (float64), to compare with the store's."""
    acc = 0.0
    for shard, data, lay in shards:
        for chunk in shard_chunks(data, shard, lay):
            values = chunk.astype(np.float32)
            acc += float(values[0, 0])
            if check is not None:
                check.append(values.sum(axis=0, dtype=np.float64))
    return acc


def blocks_pass(store: Any, layers: list[int], pooling: str,
                check: list[np.ndarray] | None = None) -> float:
    """Every block of ``layers`` through ``Store.blocks``, touching one value of each."""
    acc = 0.0
    for layer in layers:
        for block in store.blocks(layer, pooling):
            acc += float(block.values[0, 0])
            if check is not None:
                check.append(block.values.sum(axis=0, dtype=np.float64))
    return acc


def agree(raw: Any, store: Any, layers: Any, pooling: str, what: str) -> None:
    """The untimed pass: warms the page cache, and both sides must read the same values."""
    want: list[np.ndarray] = []
    got: list[np.ndarray] = []
    raw(want)
    blocks_pass(store, layers, pooling, got)
    same_sums(want, got, what)


def same_sums(a: list[np.ndarray], b: list[np.ndarray], what: str) -> None:
    """Both sides read the same values: their column sums agree (summed in float64)."""
    sa, sb = np.sum(a, axis=0), np.sum(b, axis=0)
    if not np.allclose(sa, sb, rtol=1e-9, atol=1e-6):
        raise SystemExit(f"{what}: the store and the baseline read different values")


# -- the report -----------------------------------------------------------------------------
@dataclass
class Row:
    figure: str
    method: str
    seconds: float
    stored_bytes: int
    ratio: float | None = None
    goal: str = ""


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor() or model
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    import torch

    versions = ", ".join(f"{name} {version(name)}" for name in ("zarr", "zarrs", "numpy", "s3fs"))
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"machine: {model}, {os.cpu_count()} cores, nproc {usable}; load average {load}\n"
            f"versions: {versions}, torch {torch.__version__} ({torch.get_num_threads()} threads)")


def print_table(rows: list[Row]) -> None:
    print("\n| figure | read | time | MB/s | ratio (baseline time / time) | goal |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = "" if r.ratio is None else f"**{r.ratio:.2f}**"
        if r.ratio is not None and r.goal:
            ratio += " ok" if r.ratio >= float(r.goal.lstrip("≥ ")) else " MISSED"
        print(f"| {r.figure} | {r.method} | {r.seconds:.3f} s | "
              f"{r.stored_bytes / r.seconds / 1e6:,.0f} | {ratio} | {r.goal} |")


# -- 1. pooled, local -------------------------------------------------------------------------
def random_f16(rng: np.random.Generator, rows: int, hidden: int) -> np.ndarray:
    """Standard-normal float16 values, made a slice at a time (no full float32 copy)."""
    out = np.empty((rows, hidden), np.float16)
    step = 2**18
    for lo in range(0, rows, step):
        out[lo:lo + step] = rng.standard_normal((min(step, rows - lo), hidden), np.float32)
    return out


def pooled_local(args: argparse.Namespace, folder: str, rng: np.random.Generator) -> list[Row]:
    import zarr

    url = f"{folder}/pooled.zarr"
    x = {layer: random_f16(rng, args.rows, args.hidden) for layer in range(args.layers)}
    started = time.perf_counter()
    store = synthetic_store(url, x, rows_per_unit=args.rows_per_unit, dtype="float16")
    del x
    layers = list(store.layers)
    lays = {layer: Layout.of(json.loads((Path(url) / "mean" / f"layer_{layer}" / "zarr.json")
                                        .read_text()), store.n_rows) for layer in layers}
    files = [(shard, path, lays[layer]) for layer in layers
             for shard, path in shard_files(Path(url) / "mean" / f"layer_{layer}")]
    stored = store.n_rows * len(layers) * args.hidden * 2
    print(f"\n1. pooled: {store.n_rows:,} rows x {len(layers)} layers x {args.hidden} float16, "
          f"rows_per_unit {args.rows_per_unit}, chunk_rows {store.chunk_rows}: "
          f"{stored / 1e6:.0f} MB of values in {len(files)} shard files "
          f"(written in {time.perf_counter() - started:.1f} s)")

    def raw(check: list[np.ndarray] | None = None) -> float:
        return widen_all([(s, p.read_bytes(), lay) for s, p, lay in files], check)

    def zarr_pass(zarrs: bool, widen: bool = True) -> float:
        config = {"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"} if zarrs else {}
        acc = 0.0
        with zarr.config.set(config):
            for layer in layers:
                arr = zarr.open_array(f"{url}/mean/layer_{layer}", mode="r")
                values = np.asarray(arr[:store.n_rows])
                acc += float((values.astype(np.float32) if widen else values)[0, 0])
        return acc

    agree(raw, store, layers, "mean", "pooled")
    zarr_pass(False)
    zarr_pass(True)
    raw_s, blocks_s = best_alternating(timer(raw), timer(lambda: blocks_pass(store, layers, "mean")),
                                       args.repeats)
    zarr_s, zarrs_s = best_alternating(timer(lambda: zarr_pass(False)),
                                       timer(lambda: zarr_pass(True)), args.repeats)
    # The decode alone, without numpy's widening: the codec pipelines' own difference.
    zarr_only, zarrs_only = best_alternating(timer(lambda: zarr_pass(False, False)),
                                             timer(lambda: zarr_pass(True, False)), args.repeats)
    fig = "1. pooled, local"
    return [Row(fig, "baseline: shard files' bytes + numpy widening", raw_s, stored),
            Row(fig, "`Store.blocks`", blocks_s, stored, raw_s / blocks_s, "≥ 1.0"),
            Row(fig, "reference: zarr-python `[:]` + numpy widening", zarr_s, stored, raw_s / zarr_s),
            Row(fig, "reference: zarr + zarrs pipeline `[:]` + numpy widening", zarrs_s, stored,
                raw_s / zarrs_s),
            Row(fig, "reference: zarr-python `[:]` only (float16, no widening)", zarr_only,
                stored, raw_s / zarr_only),
            Row(fig, "reference: zarr + zarrs pipeline `[:]` only (float16, no widening)",
                zarrs_only, stored, raw_s / zarrs_only)]


# -- 2. tokens, local -------------------------------------------------------------------------
def tokens_local(args: argparse.Namespace, folder: str, rng: np.random.Generator) -> list[Row]:
    url = f"{folder}/tokens.zarr"
    lengths = rng.integers(1, args.max_tokens + 1, args.token_rows)
    total = int(lengths.sum())
    tokens = {layer: random_f16(rng, total, args.hidden) for layer in range(args.token_layers)}
    pooled = {layer: np.zeros((args.token_rows, args.hidden), np.float16)
              for layer in range(args.token_layers)}
    started = time.perf_counter()
    store = synthetic_store(url, pooled, rows_per_unit=args.rows_per_unit, dtype="float16",
                            poolings=("mean", "tokens"), tokens=tokens, token_lengths=lengths)
    del tokens, pooled
    layers = list(store.layers)
    files = []
    for layer in layers:
        for unit_dir in sorted((Path(url) / "tokens" / f"layer_{layer}").iterdir()):
            if unit_dir.is_dir():
                lay = Layout.of(json.loads((unit_dir / "zarr.json").read_text()))
                files += [(shard, path, lay) for shard, path in shard_files(unit_dir)]
    stored = total * len(layers) * args.hidden * 2
    print(f"\n2. tokens: {args.token_rows:,} rows, lengths 1..{args.max_tokens} "
          f"({total:,} tokens) x {len(layers)} layer(s) x {args.hidden} float16: "
          f"{stored / 1e6:.0f} MB of values in {len(files)} shard files "
          f"(written in {time.perf_counter() - started:.1f} s)")

    def raw(check: list[np.ndarray] | None = None) -> float:
        acc = 0.0
        for s, p, lay in files:  # one file's bytes at a time: a token shard is ~50 MB
            acc += widen_all([(s, p.read_bytes(), lay)], check)
        return acc

    agree(raw, store, layers, "tokens", "tokens")
    raw_s, blocks_s = best_alternating(timer(raw),
                                       timer(lambda: blocks_pass(store, layers, "tokens")),
                                       args.repeats)
    fig = "2. tokens, local"
    return [Row(fig, "baseline: shard files' bytes + numpy widening", raw_s, stored),
            Row(fig, "`Store.blocks(layer, \"tokens\")`", blocks_s, stored, raw_s / blocks_s,
                "≥ 1.0")]


# -- 3. pooled, S3 on loopback ----------------------------------------------------------------
def moto_server() -> tuple[subprocess.Popen[bytes], str]:
    """A moto S3 server in its own process on 127.0.0.1, so that serving requests does not
    compete with the reads for this process's GIL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                             "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the moto S3 server did not start")


def pooled_s3(args: argparse.Namespace, rng: np.random.Generator) -> list[Row]:
    import boto3
    import s3fs

    proc, endpoint = moto_server()
    try:
        os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1"})
        s3fs.S3FileSystem.clear_instance_cache()
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        url = "s3://bench/read.zarr"
        x = {layer: random_f16(rng, args.s3_rows, args.hidden) for layer in range(args.s3_layers)}
        started = time.perf_counter()
        store = synthetic_store(url, x, rows_per_unit=args.rows_per_unit, dtype="float16")
        del x
        layers = list(store.layers)
        fs = s3fs.S3FileSystem()
        base = "bench/read.zarr/mean"
        lays = {layer: Layout.of(json.loads(fs.cat(f"{base}/layer_{layer}/zarr.json")),
                                 store.n_rows) for layer in layers}
        objects = [(int(p.split("/c/")[1].split("/")[0]), p, lays[layer]) for layer in layers
                   for p in fs.find(f"{base}/layer_{layer}/c")]
        stored = store.n_rows * len(layers) * args.hidden * 2
        print(f"\n3. S3 (moto on {endpoint}): {store.n_rows:,} rows x {len(layers)} layers x "
              f"{args.hidden} float16: {stored / 1e6:.0f} MB of values in {len(objects)} "
              f"objects (written in {time.perf_counter() - started:.1f} s)")

        def raw(check: list[np.ndarray] | None = None) -> float:
            got = fs.cat([p for _, p, _ in objects], batch_size=16)
            return widen_all([(s, got[p], lay) for s, p, lay in objects], check)

        agree(raw, store, layers, "mean", "S3")
        raw_s, blocks_s = best_alternating(timer(raw),
                                           timer(lambda: blocks_pass(store, layers, "mean")),
                                           args.repeats)
    finally:
        proc.terminate()
        proc.wait(30)
    fig = "3. pooled, S3 (loopback)"
    return [Row(fig, "baseline: s3fs `cat` of the shard objects, 16 in flight, + numpy widening",
                raw_s, stored),
            Row(fig, "`Store.blocks`", blocks_s, stored, raw_s / blocks_s, "≥ 0.7")]


# -- 4. top-k and nearest -----------------------------------------------------------------
def numpy_nearest(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Cosine nearest neighbours as a user would write them, every norm computed each time."""
    scores = (x @ q) / (np.linalg.norm(x, axis=1) * np.linalg.norm(q))
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.lexsort((part, -scores[part]))]


def search(args: argparse.Namespace, folder: str, rng: np.random.Generator) -> list[Row]:
    url = f"{folder}/search.zarr"
    started = time.perf_counter()
    store = synthetic_store(url, {0: random_f16(rng, args.search_rows, args.hidden)},
                            rows_per_unit=args.rows_per_unit, dtype="float16")
    x = store.read(0)  # the values numpy sees: decoded to float32, held in memory
    stored = x.size * 2
    print(f"\n4. search: {len(x):,} rows x {args.hidden} float16, k {args.k} "
          f"(written in {time.perf_counter() - started:.1f} s)")
    w = rng.standard_normal(args.hidden).astype(np.float32)
    q = x[1]
    if store.topk(0, w, args.k).rows.tolist() != numpy_topk(x, w, args.k).tolist():
        raise SystemExit("top-k differs from numpy: the benchmark is not comparing like with like")
    near, expected = store.nearest(0, q, args.k), numpy_nearest(x, q, args.k)
    if near.rows.tolist() != expected.tolist():
        raise SystemExit("nearest differs from numpy: the benchmark is not comparing like with like")
    np_top, top = best_alternating(timer(lambda: numpy_topk(x, w, args.k)),
                                   timer(lambda: store.topk(0, w, args.k)), args.repeats)
    np_near, nearest = best_alternating(timer(lambda: numpy_nearest(x, q, args.k)),
                                        timer(lambda: store.nearest(0, q, args.k)), args.repeats)
    # The floor of any reader of this store: its shard files' bytes read into one reused
    # buffer (no allocation, no decoding, no widening).
    files = [p for _, p in shard_files(Path(url) / "mean" / "layer_0")]
    buffer = memoryview(bytearray(max(p.stat().st_size for p in files)))

    def read_only() -> None:
        for p in files:
            with p.open("rb", buffering=0) as f:
                f.readinto(buffer)

    floor, _ = best_alternating(timer(read_only), timer(lambda: numpy_topk(x, w, args.k)),
                                args.repeats)
    # The floor of a reader that checks what it reads: the same files read and their
    # chunks' crc32c checked on the search's threads, nothing widened or scored.
    reader = store.reader
    jobs = reader.fetcher.shard_jobs(reader.plans("mean", reader.positions(None)), 0)

    def read_checked() -> None:
        reader.fetcher.each_shard(jobs, lambda rows, parts: None, lambda done: None)

    checked, _ = best_alternating(timer(read_checked),
                                  timer(lambda: numpy_topk(x, w, args.k)), args.repeats)
    n = len(x)
    print(f"top-{args.k}: store {n / top:,.0f} rows/s, numpy in memory {n / np_top:,.0f} rows/s; "
          f"nearest: store {n / nearest:,.0f} rows/s, numpy in memory {n / np_near:,.0f} rows/s")
    return [Row("4. top-k", "baseline: numpy over the float32 layer in memory", np_top, stored),
            Row("4. top-k", "`store.topk`", top, stored, np_top / top, "≥ 0.3"),
            Row("4. top-k", "reference: the shard files' bytes read into one buffer (any reader's floor)",
                floor, stored, np_top / floor),
            Row("4. top-k", "reference: the same files read and checked (crc32c) on the search's threads",
                checked, stored, np_top / checked),
            Row("4. nearest (cosine)", "baseline: numpy over the float32 layer in memory",
                np_near, stored),
            Row("4. nearest (cosine)", "`store.nearest`", nearest, stored, np_near / nearest,
                "≥ 0.3")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Smaller stores (about 1 min).")
    parser.add_argument("--rows", type=int, default=60_000, help="Pooled rows (1).")
    parser.add_argument("--layers", type=int, default=4, help="Pooled layers (1).")
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--rows-per-unit", type=int, default=1024)
    parser.add_argument("--token-rows", type=int, default=20_000, help="Token store rows (2).")
    parser.add_argument("--token-layers", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=128, help="Lengths are 1..this.")
    parser.add_argument("--s3-rows", type=int, default=20_000, help="S3 store rows (3).")
    parser.add_argument("--s3-layers", type=int, default=2)
    parser.add_argument("--search-rows", type=int, default=200_000, help="Search store rows (4).")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=["pooled", "tokens", "s3", "search"],
                        default=["pooled", "tokens", "s3", "search"])
    args = parser.parse_args()
    if args.quick:
        args.rows, args.layers, args.token_rows = 12_000, 2, 3_000
        args.s3_rows, args.search_rows = 6_000, 40_000

    print(machine())
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-read-") as folder:
        if "pooled" in args.only:
            rows += pooled_local(args, folder, rng)
        if "tokens" in args.only:
            rows += tokens_local(args, folder, rng)
        if "search" in args.only:
            rows += search(args, folder, rng)
    if "s3" in args.only:
        rows += pooled_s3(args, rng)
    print_table(rows)
    print(f"\nbest of {args.repeats}, alternating with the baseline; "
          f"whole run {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
