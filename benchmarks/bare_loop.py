"""The baseline a user would write: load MiniLM, loop over batches in input order with
``output_hidden_states=True``, mean-pool every layer over non-padding tokens, keep the
result in memory. Used by bench_cache.py as the process-level baseline."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sort", action="store_true", help="length-sort the batches")
    args = parser.parse_args()
    texts = [json.loads(line)["text"] for line in open(args.inputs)]
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model).eval()
    if args.sort:
        order = np.argsort([-len(ids) for ids in tok(texts)["input_ids"]], kind="stable")
        texts = [texts[i] for i in order]
    started = time.perf_counter()
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), args.batch_size):
            batch = tok(texts[i : i + args.batch_size], padding=True, return_tensors="pt")
            states = model(**batch, output_hidden_states=True).hidden_states
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = [(h * mask).sum(1) / mask.sum(1) for h in states]
            out.append(torch.stack(pooled, 1).half().numpy())
    result = np.concatenate(out)
    print(json.dumps({"rows": len(result), "loop_s": time.perf_counter() - started}))


if __name__ == "__main__":
    main()
