"""Probes: every layer × the whole C grid at once against scikit-learn one fit at a time.

Both sides use the same features (standardised on train), the same hash split, the same
grid and selection rule (best validation accuracy, refit on train), measured in the same
run. Prints the speed ratio and the largest per-layer test-accuracy gap; then bfloat16
against float32 where the CPU computes bf16 natively.

    python benchmarks/bench_probes.py                       # synthetic, MiniLM-sized
    python benchmarks/bench_probes.py --store PATH --label COL [--split-column split]

With ``--store``, the whole ``actcache probe`` process (start-up, imports, reading the
store, writing metrics, probes and plot) is timed as well, against the same scikit-learn
loop, so both ratios are printed: the whole process and the in-process fit.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from actcache.probes.api import cpu_has_bf16, pick_device, train_probes
from actcache.probes.testing import ArrayStore, sklearn_reference
from actcache.schemas.probe import ProbeConfig


def synthetic(n: int, hidden: int, layers: int, seed: int = 0) -> ArrayStore:
    """Binary labels a little more linearly visible at each deeper layer, plus offsets."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = {}
    for layer in range(layers):
        direction = rng.standard_normal(hidden)
        mix = rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)
        base = rng.standard_normal((n, hidden)) @ mix + rng.normal(0, 2, hidden)
        x[layer] = (base + 0.006 * (layer + 1) * np.outer(y - 0.5, direction)).astype(np.float32)
    return ArrayStore(x, pd.DataFrame({"label": y}), chunk_rows=256)


def timed(fn, *args):  # noqa: ANN001, ANN202
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def whole_process(store: str, label: str, split_column: str | None) -> float:
    """Wall time of ``actcache probe`` run as its own process, fp32, default grid."""
    exe = Path(sys.executable).parent / "actcache"
    cmd = [str(exe) if exe.exists() else (shutil.which("actcache") or "actcache"), "probe",
           store, "--label", label, "--precision", "fp32"]
    if split_column:
        cmd += ["--split-column", split_column]
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        subprocess.run([*cmd, "--out", out], check=True, capture_output=True)
        return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", help="a store URL (default: a synthetic in-memory store)")
    ap.add_argument("--label", default="label")
    ap.add_argument("--split-column", help="a train/test/val column (default: hash split)")
    ap.add_argument("--rows", type=int, default=8000)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=7)
    args = ap.parse_args()
    if args.store:
        from actcache.store import open_store

        store = open_store(args.store)
    else:
        store = synthetic(args.rows, args.hidden, args.layers)
    cfg = ProbeConfig(label=args.label, precision="fp32", split_column=args.split_column)
    print(f"store: {store.url}  rows {store.n_rows}  layers {len(store.layers)}  hidden "
          f"{store.hidden_size}  grid {len(cfg.strengths)} C  device {pick_device()}  "
          f"torch threads {torch.get_num_threads()}")
    t_ours, ours = timed(train_probes, store, cfg)
    t_sk, ref = timed(sklearn_reference, store, cfg)
    both = ours.metrics.merge(ref, on=["layer", "probe"], suffixes=("", "_sklearn"))
    gap = float((both["test_accuracy"] - both["test_accuracy_sklearn"]).abs().max())
    print(both[["layer", "strength", "strength_sklearn", "test_accuracy",
                "test_accuracy_sklearn"]].to_string(index=False))
    print(f"actcache (all layers x grid, batched, fp32): {t_ours:.2f}s  "
          f"(L-BFGS iterations: {ours.iterations})")
    print(f"scikit-learn (one layer, one C at a time):  {t_sk:.2f}s")
    print(f"speed-up: {t_sk / t_ours:.1f}x  max test-accuracy gap: {100 * gap:.2f} points")
    if args.store:
        t_proc = whole_process(args.store, args.label, args.split_column)
        print(f"`actcache probe` process (start to exit, outputs written): {t_proc:.2f}s  "
              f"whole-process speed-up over scikit-learn: {t_sk / t_proc:.1f}x  "
              f"(in-process: {t_sk / t_ours:.1f}x)")
    if pick_device().type == "cpu" and not cpu_has_bf16():
        print("bf16 vs fp32: skipped (this CPU has no AVX512-BF16/AMX; bf16 would be emulated)")
        return
    t_bf, bf = timed(train_probes, store, cfg.model_copy(update={"precision": "bf16"}))
    gap_bf = float((bf.metrics["test_accuracy"] - ours.metrics["test_accuracy"]).abs().max())
    print(f"bf16: {t_bf:.2f}s  fp32: {t_ours:.2f}s  bf16 speed-up: {t_ours / t_bf:.2f}x  "
          f"max test-accuracy gap to fp32: {100 * gap_bf:.2f} points")


if __name__ == "__main__":
    main()
