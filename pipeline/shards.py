"""Whole uncompressed shards of a local store, read without zarr's codec pipeline.

A pass over a store (every probe pass, top-k, a loader epoch) reads whole shards. Through
zarr each one-chunk shard costs about 2 ms of its sharding and codec machinery, ten times
reading the file; for the layout actcache writes for pooled layers (one chunk per shard,
no compressor, the chunk's crc32c last, the shard index at the end with its own crc32c)
the values are the file's bytes. ``ShardReader`` reads exactly that layout, checks both
checksums as zarr does, and declines (returns None) anything else, which the caller then
reads through zarr. Tests compare it with zarr value for value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

#: Bytes of a one-chunk shard index: (offset, nbytes) as two uint64, then its crc32c.
_INDEX_BYTES = 16 + 4
#: The offset zarr's shard index gives a chunk it did not write.
_EMPTY = 2**64 - 1


class ChecksumError(ValueError):
    """A chunk or a shard index whose bytes do not match their crc32c."""


def _crc(data: memoryview) -> int:
    return int(google_crc32c.value(np.frombuffer(data, dtype=np.uint8)))


class ShardReader:
    """Reads ``[start, stop)`` of a local array written in actcache's pooled layout."""

    def __init__(self, array: Any, root: str | None) -> None:
        self.folder: Path | None = None
        meta = array.metadata
        if root is None or len(meta.shape) != 2:
            return
        codecs = [c.to_dict() for c in meta.codecs]
        if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
            return
        conf = codecs[0]["configuration"]
        inner = [c["name"] for c in conf["codecs"]]
        index = [c["name"] for c in conf["index_codecs"]]
        shard = tuple(meta.chunk_grid.chunk_shape)
        if (tuple(conf["chunk_shape"]) != shard or inner != ["bytes", "crc32c"]
                or index != ["bytes", "crc32c"] or conf.get("index_location", "end") != "end"
                or meta.chunk_key_encoding.to_dict()["configuration"].get("separator") != "/"):
            return
        if any(c.get("configuration", {}).get("endian", "little") != "little"
               for c in conf["codecs"] if c["name"] == "bytes"):
            return
        self.folder = Path(root) / array.path
        self.rows, self.width = shard[0], int(meta.shape[1])
        self.dtype = np.dtype(meta.data_type.to_native_dtype())
        self.n_rows = int(meta.shape[0])

    def read(self, start: int, stop: int) -> np.ndarray | None:
        """Rows [start, stop) as stored, or None when the layout is not the one above or a
        shard is missing (zarr then reads it, fill values included)."""
        if self.folder is None or stop > self.n_rows:
            return None
        first, last = start // self.rows, (stop - 1) // self.rows
        parts = []
        for shard in range(first, last + 1):
            values = self._shard(shard)
            if values is None:
                return None
            lo = max(start - shard * self.rows, 0)
            hi = min(stop - shard * self.rows, len(values))
            parts.append(values[lo:hi])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _shard(self, shard: int) -> np.ndarray | None:
        assert self.folder is not None
        try:
            data = (self.folder / "c" / str(shard) / "0").read_bytes()
        except FileNotFoundError:
            return None
        view = memoryview(data)
        index = view[len(data) - _INDEX_BYTES:]
        if _crc(index[:16]) != int.from_bytes(index[16:], "little"):
            raise ChecksumError(f"shard {shard}: index checksum mismatch")
        offset, nbytes = (int(v) for v in np.frombuffer(index[:16], dtype="<u8"))
        if offset == _EMPTY:  # a chunk zarr left unwritten (all fill values)
            return None
        chunk = view[offset:offset + nbytes]
        if _crc(chunk[:-4]) != int.from_bytes(chunk[-4:], "little"):
            raise ChecksumError(f"shard {shard}: chunk checksum mismatch")
        rows = min(self.rows, self.n_rows - shard * self.rows)
        values = np.frombuffer(chunk[:-4], dtype=self.dtype).reshape(self.rows, self.width)
        return values[:rows]
