"""Training from a store: ``TokenLoader`` batches against the token shard files' bytes
widened with numpy, measured in the same run.

1. Local float16 token store, one process: the baseline reads every token shard file
   whole and widens each chunk's values with numpy (no checksum, no order, no batches);
   the loader yields every token once in batches of ``--batch-size``, in physical order
   (``shuffle=False``) and shuffled (pieces permuted, drawn at random from the buffer).
2. ``--s3``: the same on a moto S3 server on 127.0.0.1; the baseline fetches the same
   shard objects with s3fs, 16 in flight, then widens them.
3. On a machine with CUDA: tokens/s delivered to the GPU (pinned buffers, bfloat16).

    python benchmarks/bench_loader.py            # ~3 min on 2 cores
    python benchmarks/bench_loader.py --quick    # a smaller store, under a minute
    python benchmarks/bench_loader.py --s3

Each side runs ``--repeats`` times, alternating with its baseline, best kept, after an
untimed pass that warms the page cache and checks both sides read the same values.
GB/s counts stored bytes (float16: 2 a value); the ratio is baseline time / loader time.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from bench_cache import best_alternating
from bench_read import Layout, machine, moto_server, random_f16, shard_files, timer, widen_all

from actcache import TokenLoader
from actcache.testing import synthetic_store


def loader_pass(loader: TokenLoader, check: list[np.ndarray] | None = None) -> float:
    """Every batch of the loader's next epoch, touching one value of each (and summing
    with ``check``). The loader is made once, as a training run makes it: its buffer and
    plans are built before the first epoch, not each epoch."""
    acc = 0.0
    loader.set_epoch(loader.epoch + 1)
    for batch in loader:
        acc += float(batch.x[0, 0])
        if check is not None:
            check.append(batch.x.double().sum(0).numpy())
    return acc


def agree(a: list[np.ndarray], b: list[np.ndarray], what: str) -> None:
    if not np.allclose(np.sum(a, axis=0), np.sum(b, axis=0), rtol=1e-9, atol=1e-5):
        raise SystemExit(f"{what}: the loader and the baseline read different values")


def report(name: str, rows: list[tuple[str, float, float | None, str]], tokens: int,
           stored: int) -> None:
    print(f"\n| {name} | time | tokens/s | GB/s | ratio (baseline / loader) | goal |")
    print("|---|---|---|---|---|---|")
    for method, seconds, ratio, goal in rows:
        shown = "" if ratio is None else f"**{ratio:.2f}**"
        if ratio is not None and goal:
            shown += " ok" if ratio >= float(goal.lstrip("≥ ")) else " MISSED"
        print(f"| {method} | {seconds:.2f} s | {tokens / seconds:,.0f} | "
              f"{stored / seconds / 1e9:.2f} | {shown} | {goal} |")


def compare(name: str, store: Any, raw: Callable[[list[np.ndarray] | None], float],
            args: argparse.Namespace, tokens: int, stored: int) -> None:
    want: list[np.ndarray] = []
    got: list[np.ndarray] = []
    plain = TokenLoader(store, 0, batch_size=args.batch_size, shuffle=False)
    mixed = TokenLoader(store, 0, batch_size=args.batch_size, shuffle=True)
    raw(want)
    loader_pass(mixed, got)
    loader_pass(plain)
    agree(want, got, name)
    raw_s, plain_s = best_alternating(timer(lambda: raw(None)),
                                      timer(lambda: loader_pass(plain)), args.repeats)
    raw_s2, mixed_s = best_alternating(timer(lambda: raw(None)),
                                       timer(lambda: loader_pass(mixed)), args.repeats)
    plain.close()
    mixed.close()
    raw_s = min(raw_s, raw_s2)
    report(name, [("baseline: shard bytes + numpy widening", raw_s, None, ""),
                  ("`TokenLoader`, shuffle=False", plain_s, raw_s / plain_s, "≥ 0.8"),
                  ("`TokenLoader`, shuffle=True", mixed_s, raw_s / mixed_s, "≥ 0.6")],
           tokens, stored)


def token_store(url: str, args: argparse.Namespace, rng: np.random.Generator,
                storage_options: dict | None = None) -> tuple[Any, int, int]:
    lengths = rng.integers(1, args.max_tokens + 1, args.rows)
    total = int(lengths.sum())
    started = time.perf_counter()
    store = synthetic_store(url, {}, rows_per_unit=args.rows_per_unit, dtype="float16",
                            poolings=("tokens",), tokens={0: random_f16(rng, total, args.hidden)},
                            token_lengths=lengths, storage_options=storage_options)
    stored = total * args.hidden * 2
    print(f"\n{url}: {args.rows:,} rows, lengths 1..{args.max_tokens} ({total:,} tokens) x "
          f"{args.hidden} float16: {stored / 1e9:.2f} GB of values "
          f"(written in {time.perf_counter() - started:.1f} s)")
    return store, total, stored


def local(args: argparse.Namespace, folder: str, rng: np.random.Generator) -> None:
    url = f"{folder}/tokens.zarr"
    store, total, stored = token_store(url, args, rng)
    files = []
    for unit_dir in sorted((Path(url) / "tokens" / "layer_0").iterdir()):
        if unit_dir.is_dir():
            lay = Layout.of(json.loads((unit_dir / "zarr.json").read_text()))
            files += [(shard, path, lay) for shard, path in shard_files(unit_dir)]

    def raw(check: list[np.ndarray] | None) -> float:
        return sum(widen_all([(s, p.read_bytes(), lay)], check) for s, p, lay in files)

    compare("1. local disk, one process", store, raw, args, total, stored)
    gpu(store, args, total, stored)


def gpu(store: Any, args: argparse.Namespace, total: int, stored: int) -> None:
    import torch

    if not torch.cuda.is_available():
        print("\n3. GPU: no CUDA device here, skipped")
        return

    def run() -> None:
        for batch in TokenLoader(store, 0, batch_size=args.batch_size, dtype=torch.bfloat16,
                                 device="cuda"):
            batch.x.sum()
        torch.cuda.synchronize()

    run()
    seconds = min(timer(run)() for _ in range(args.repeats))
    report("3. to the GPU (pinned, bfloat16, shuffled)", [("`TokenLoader`", seconds, None, "")],
           total, stored)


def s3(args: argparse.Namespace, rng: np.random.Generator) -> None:
    import boto3
    import s3fs

    proc, endpoint = moto_server()
    try:
        os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
        s3fs.S3FileSystem.clear_instance_cache()
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        store, total, stored = token_store("s3://bench/tokens.zarr", args, rng)
        fs = s3fs.S3FileSystem()
        base = "bench/tokens.zarr/tokens/layer_0"
        objects = []
        for unit in sorted(fs.ls(base)):
            if fs.isdir(unit):
                lay = Layout.of(json.loads(fs.cat(f"{unit}/zarr.json")))
                objects += [(int(p.split("/c/")[1].split("/")[0]), p, lay)
                            for p in fs.find(f"{unit}/c")]

        def raw(check: list[np.ndarray] | None) -> float:
            got = fs.cat([p for _, p, _ in objects], batch_size=16)
            return widen_all([(s, got[p], lay) for s, p, lay in objects], check)

        compare(f"2. S3 (moto on {endpoint})", store, raw, args, total, stored)
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="A smaller store.")
    parser.add_argument("--rows", type=int, default=12_000)
    parser.add_argument("--max-tokens", type=int, default=256, help="Lengths are 1..this.")
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--rows-per-unit", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--s3", action="store_true", help="Also on a loopback moto S3 server.")
    args = parser.parse_args()
    if args.quick:
        args.rows = 3_000
    print(machine())
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as folder:
        local(args, folder, rng)
    if args.s3:
        s3(args, rng)
    print(f"\nbest of {args.repeats}, alternating with the baseline; "
          f"whole run {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
