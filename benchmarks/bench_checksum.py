"""The cost of crc32c on every activation chunk (format 2): write and read speed of the
store's codec with and without the checksum, on real MiniLM hidden states, measured side
by side in the same run.

    python benchmarks/bench_checksum.py [--store runs/cities.zarr]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import zarr
from bench_codec import activations, measure

ROUNDS = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="runs/cities.zarr")
    args = parser.parse_args()
    values = activations(args.store).astype(np.float16)
    print(f"float16: {values.shape[0]} rows x {values.shape[1]}, {values.nbytes / 1e6:.1f} MB")
    # Interleaved rounds, best of each: on a shared machine a one-off pair is mostly noise.
    runs: dict[str, list[tuple[float, float, float]]] = {"plain": [], "crc": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(ROUNDS):
            runs["plain"].append(measure(values, (), Path(tmp), f"plain{i}"))
            runs["crc"].append(measure(values, (zarr.codecs.Crc32cCodec(),),
                                       Path(tmp), f"crc{i}"))
    plain, checked = (tuple(max(col) for col in zip(*runs[k], strict=True)) for k in runs)
    for name, (ratio, write, read) in (("codec", plain), ("codec + crc32c", checked)):
        print(f"  {name:16s} ratio {ratio:5.2f}  write {write:6.0f} MB/s  read {read:6.0f} MB/s")
    print(f"crc32c: write {checked[1] / plain[1]:.2f}x, read {checked[2] / plain[2]:.2f}x "
          "of the codec alone (1.00x = free)")


if __name__ == "__main__":
    main()
