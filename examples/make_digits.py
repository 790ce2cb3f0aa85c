"""Build the vision example: scikit-learn's digits as a PNG table, and a tiny ViT to cache.

The 1,797 labelled 8x8 handwritten digits ship inside scikit-learn, so the input table
is built offline and the same bytes come out on every run. Each digit becomes a grey
PNG (16 grey levels stretched to 0..255) in the ``image`` column of a parquet table,
with ``label`` (the digit) and ``split`` (``train`` or ``test``, about 80/20, from a
hash of the id).

No image checkpoint ships offline, so the model is a ViT built from a config with a
fixed seed and saved with its image processor (which resizes each digit to 32x32): its
weights are random. Probes on an untrained model measure a random-feature baseline,
not what a trained encoder has learned; point ``model`` at a real checkpoint folder
for that.

Usage::

    python examples/make_digits.py          # writes runs/digits/{digits.parquet,tiny-vit}
    actcache cache examples/digits.yaml
    actcache probe runs/digits.zarr --label label --split-column split
"""

from __future__ import annotations

import argparse
import hashlib
import io
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent / "runs" / "digits"


def split_of(row_id: str) -> str:
    return "test" if hashlib.sha256(row_id.encode()).digest()[0] < 52 else "train"


def digits_table(out: Path) -> int:
    import pandas as pd
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rows = []
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        grey = np.round(pixels * 255 / 16).astype(np.uint8)
        png = io.BytesIO()
        Image.fromarray(grey, "L").save(png, format="PNG")
        row_id = f"digit{i:04d}"
        rows.append({"id": row_id, "image": png.getvalue(), "label": int(label),
                     "split": split_of(row_id)})
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(out)
    return len(rows)


def tiny_vit(folder: Path) -> None:
    import torch
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=128)
    ViTModel(config).eval().save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                         image_std=[0.5] * 3).save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT)
    args = parser.parse_args()
    rows = digits_table(args.out / "digits.parquet")
    tiny_vit(args.out / "tiny-vit")
    print(f"{rows} digits -> {args.out / 'digits.parquet'}; model -> {args.out / 'tiny-vit'}")


if __name__ == "__main__":
    main()
