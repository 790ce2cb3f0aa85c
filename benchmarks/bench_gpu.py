"""The GPU path, measured: the caching worker against a bare forward loop on one GPU.

A Llama-shaped model is built from a config (no download) and saved in bfloat16; the
same length-sorted batches then run through

- the caching worker (every hidden state, mean pooling, bfloat16 storage, zarr shards
  written by its writer thread while the next batch runs), and
- a bare loop: forward with ``output_hidden_states``, mean-pool every layer, copy to host,

each after a warm-up, alternating, best of ``--repeats``. Also timed: the forward alone,
as a fraction of the GPU's dense bf16 peak (2 x non-embedding parameters x tokens / time).

    python benchmarks/bench_gpu.py [--size 1b|150m] [--seq-len 2048] [--rows 256]
                                   [--batch-size 8] [--peak-tflops N]

Without a CUDA device it prints that it was skipped and exits 0.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a word of the device's name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
               "A10": 125.0, "4090": 165.0, "3090": 71.0, "V100": 125.0}
SIZES = {  # TinyLlama's shape (~1.0B non-embedding) and a ~150M one
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
           "num_attention_heads": 32, "num_key_value_heads": 4},
    "150m": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
             "num_attention_heads": 12, "num_key_value_heads": 12},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,  # --cpu check
             "num_attention_heads": 4, "num_key_value_heads": 4},
}


def sync() -> None:
    from actcache.workers.devices import CACHE_ACCELERATORS, pick_device, synchronize

    synchronize(pick_device(kinds=CACHE_ACCELERATORS))


def build_model(folder: Path, size: str, seq_len: int) -> int:
    """Save a random Llama and a byte-level BPE tokenizer; returns non-embedding parameters."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    from actcache.workers.devices import CACHE_ACCELERATORS, pick_device

    bpe = ByteLevelBPETokenizer()
    words = [f"w{i}" for i in range(4000)]
    bpe.train_from_iterator([" ".join(random.sample(words, 50)) for _ in range(2000)],
                            vocab_size=8000, special_tokens=["</s>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="</s>",
                                  pad_token="</s>", model_max_length=seq_len)
    tok.save_pretrained(folder)
    config = LlamaConfig(vocab_size=8000, max_position_embeddings=seq_len, **SIZES[size])
    torch.manual_seed(0)
    # Random init of 1B weights is minutes on a CPU, seconds on the GPU.
    with pick_device(kinds=CACHE_ACCELERATORS):
        model = LlamaModel(config).to(torch.bfloat16).eval()
    model.save_pretrained(folder)
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)


def make_inputs(folder: Path, rows: int, seq_len: int) -> Path:
    """Texts long enough to be cut at ``seq_len`` tokens, so every row is a full sequence."""
    rng = random.Random(0)
    path = folder / "inputs.jsonl"
    with path.open("w") as f:
        for i in range(rows):
            text = " ".join(f"w{rng.randrange(4000)}" for _ in range(seq_len))
            f.write(json.dumps({"id": str(i), "text": text}) + "\n")
    return path


def prepare_worker(folder: Path, inputs: Path, batch: int, seq_len: int) -> tuple[Any, Any]:
    from actcache.cache.driver import parse_job
    from actcache.cache.wiring import in_process_worker

    job = parse_job({"model": str(folder / "model"), "inputs": str(inputs), "id_column": "id",
                     "store": str(folder / "store.zarr"), "dtype": "bfloat16",
                     "batch_size": batch, "rows_per_unit": 4 * batch, "max_length": seq_len})
    # The driver's own in-process wiring: the worker runs its self-check, as every worker does.
    wired = in_process_worker(job, run_id="bench")
    return wired.worker, wired.plan


def timings(worker: Any, plan: Any, batch: int, repeats: int) -> tuple[int, dict[str, float]]:
    """(tokens, best seconds of the bare loop, the pipeline and the forward alone)."""
    import torch

    encoded = [worker.adapter.encode(task.inputs).input_ids for task in plan.tasks]
    tokens = sum(len(ids) for unit in encoded for ids in unit)
    batches = [worker.adapter.batch(ids[i : i + batch]) for ids in encoded
               for i in range(0, len(ids), batch)]
    batches = [{k: v.to(worker.device) for k, v in b.items()} for b in batches]
    model = worker.model

    def forward(pool: bool) -> float:
        sync()
        started = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                out = model(**b, output_hidden_states=pool)
                if pool:
                    mask = b["attention_mask"].unsqueeze(-1).to(torch.bfloat16)
                    pooled = [(h * mask).sum(1) / mask.sum(1) for h in out.hidden_states]
                    torch.stack(pooled, 1).cpu()
        sync()
        return time.perf_counter() - started

    def pipeline() -> float:
        sync()
        started = time.perf_counter()
        for task in plan.tasks:
            worker.process(task)
        return time.perf_counter() - started

    forward(True), pipeline()  # warm-up: kernels chosen, allocator grown
    runs: dict[str, list[float]] = {"bare": [], "pipeline": [], "forward": []}
    for _ in range(repeats):
        runs["bare"].append(forward(True))
        runs["pipeline"].append(pipeline())
        runs["forward"].append(forward(False))
    return tokens, {k: min(v) for k, v in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="1b")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak")
    parser.add_argument("--cpu", action="store_true",
                        help="run on the CPU anyway (to check the script, with --size tiny)")
    args = parser.parse_args()
    import torch

    from actcache.workers.devices import gpu_count

    # Caching places models on CUDA GPUs only (actcache.workers.devices says why).
    if not gpu_count() and not args.cpu:
        print("skipped: needs a CUDA device")
        return
    name = torch.cuda.get_device_name(0) if gpu_count() else "CPU"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    folder = Path(tempfile.mkdtemp(prefix="actcache-bench-gpu-"))
    params = build_model(folder / "model", args.size, args.seq_len)
    inputs = make_inputs(folder, args.rows, args.seq_len)
    worker, plan = prepare_worker(folder, inputs, args.batch_size, args.seq_len)
    tokens, t = timings(worker, plan, args.batch_size, args.repeats)
    layers = worker.capture.n_layers + 1
    print(f"{name}; Llama {args.size} ({params / 1e6:.0f}M non-embedding parameters, bf16), "
          f"{args.rows} rows, {tokens} tokens (max {args.seq_len} a row), batch {args.batch_size}, "
          f"all {layers} hidden states, mean pooling")
    print(f"bare loop {tokens / t['bare']:,.0f} tokens/s, pipeline {tokens / t['pipeline']:,.0f} "
          f"tokens/s: pipeline/bare time ratio {t['pipeline'] / t['bare']:.3f}")
    achieved = 2 * params * tokens / t["forward"] / 1e12
    share = f", {achieved / peak:.0%} of the {peak:.0f} TFLOP/s bf16 peak" if peak else ""
    print(f"forward alone {tokens / t['forward']:,.0f} tokens/s = {achieved:.0f} TFLOP/s{share}")


if __name__ == "__main__":
    sys.exit(main())
