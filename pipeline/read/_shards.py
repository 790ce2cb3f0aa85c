"""Uncompressed shards of a local store, read straight from their files.

zarrs decodes every layout, but a read through it still costs about four times reading
the shard file and checking its checksums (benchmarks/bench_read.py: its pooled pass
0.093 s of decode against 0.017 s for the files' bytes), and a search, whose scoring is
cheap, pays all of it. The layout actcache writes for activations (format 2 pooled
layers, format 3 pooled and token arrays) is simple: each inner chunk is the values'
bytes then their crc32c, and the shard index (offset and length of each chunk as two
little-endian uint64, then the index's own crc32c) ends the file. ``ShardFiles`` reads
exactly that layout, checks both checksums as zarr does, and declines (``of`` returns
None) anything else, which zarrs then reads. Tests compare both paths value for value.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import crc32c
import numpy as np

#: The offset zarr's shard index gives a chunk it did not write.
_EMPTY = 2**64 - 1


class ChecksumMismatch(ValueError):
    """A chunk or a shard index whose bytes do not match their crc32c."""


def _checked(data: np.ndarray, what: str, release: int = 1) -> np.ndarray:
    """``data`` less its last 4 bytes, which must be the crc32c of the rest."""
    body = data[:-4]
    # crc32c (the package numcodecs checks with) can let go of the GIL, so that two
    # threads check two chunks at once (asked for: its default measured no faster on two
    # threads than on one, as google_crc32c, zarr's, which always holds it). A shard
    # index is a few bytes: handing the GIL over would cost more than the check.
    if (crc32c.crc32c(body.data, gil_release_mode=release)
            != int.from_bytes(data[-4:].tobytes(), "little")):
        raise ChecksumMismatch(f"{what}: checksum mismatch")
    return body


class ShardFiles:
    """Reads ``[lo, hi)`` of a local 2-D array written in actcache's raw sharded layout."""

    def __init__(self, folder: Path, meta: Any) -> None:
        self.folder = folder
        self.shard = int(meta.chunk_grid.chunk_shape[0])
        conf = meta.codecs[0].to_dict()["configuration"]
        self.chunk = int(conf["chunk_shape"][0])
        self.per_shard = -(-self.shard // self.chunk)
        self.width = int(meta.shape[1])
        self.rows = int(meta.shape[0])
        self.dtype = np.dtype(meta.data_type.to_native_dtype()).newbyteorder("<")
        self.encode = meta.encode_chunk_key
        self._paths: dict[int, str] = {}
        #: A stored chunk: its values (zarr writes edge chunks whole), then their crc32c.
        self.chunk_bytes = self.chunk * self.width * self.dtype.itemsize + 4
        #: The largest a shard file of this layout can be: its chunks, their checksums and
        #: the index with its own.
        self.file_bytes = self.per_shard * self.chunk_bytes + 16 * self.per_shard + 4

    @classmethod
    def of(cls, array: Any, root: str) -> ShardFiles | None:
        """A reader for ``array`` when it has exactly the layout above, else None."""
        meta = array.metadata
        if len(meta.shape) != 2 or len(meta.codecs) != 1:
            return None
        codec = meta.codecs[0].to_dict()
        if codec.get("name") != "sharding_indexed":
            return None
        conf = codec["configuration"]
        inner = [c["name"] for c in conf["codecs"]]
        index = [c["name"] for c in conf["index_codecs"]]
        little = all(c.get("configuration", {}).get("endian", "little") == "little"
                     for c in conf["codecs"] + conf["index_codecs"] if c["name"] == "bytes")
        if (inner != ["bytes", "crc32c"] or index != ["bytes", "crc32c"] or not little
                or conf.get("index_location", "end") != "end"
                or tuple(conf["chunk_shape"])[1:] != tuple(meta.shape[1:])):
            return None
        return cls(Path(root) / array.path, meta)

    def parts(self, lo: int, hi: int, buffer: bytearray | None = None
              ) -> list[tuple[int, np.ndarray]]:
        """(offset from ``lo``, values as stored) of ``[lo, hi)``, a chunk at a time.

        With ``buffer`` (``file_bytes + 1`` at least), ``[lo, hi)`` must lie in one shard,
        whose file is read into it: the values are views of ``buffer``, and a pass that
        reuses a few buffers neither allocates nor faults in fresh pages per shard (which
        measured half a search's reading time). A missing shard file raises
        FileNotFoundError, a checksum ChecksumMismatch.
        """
        out = []
        first, last = lo // self.shard, (hi - 1) // self.shard
        if buffer is not None and first != last:
            raise ValueError(f"rows {lo}..{hi} span shards {first}..{last}; read one at a time")
        for shard in range(first, last + 1):
            path = self.path(shard)
            data = self._bytes(path, buffer)
            end = len(data) - 16 * self.per_shard - 4  # where the index starts
            if end < 0:  # an empty or cut file: no index (the crc32c of nothing is 0)
                raise ChecksumMismatch(f"{path}: {len(data)} bytes, shorter than its index")
            index = _checked(data[end:], f"{path} index", 0)
            spans = index.view("<u8").reshape(self.per_shard, 2)
            for c in range(self.per_shard):
                start = shard * self.shard + c * self.chunk
                stop = min(start + self.chunk, self.rows)
                a, b = max(lo, start), min(hi, stop)
                if a >= b:
                    continue
                offset, nbytes = int(spans[c, 0]), int(spans[c, 1])
                if offset == _EMPTY:  # zarr skipped an all-fill chunk (older stores)
                    values = np.zeros((self.chunk, self.width), dtype=self.dtype)
                else:
                    if nbytes != self.chunk_bytes or offset + nbytes > end:
                        raise ChecksumMismatch(f"{path} chunk {c}: index out of the file")
                    body = _checked(data[offset:offset + nbytes], f"{path} chunk {c}")
                    values = body.view(self.dtype).reshape(self.chunk, self.width)
                out.append((a - lo, values[a - start:b - start]))
        return out

    def path(self, shard: int) -> str:
        """The file of shard number ``shard`` (named once: a search asks for hundreds)."""
        found = self._paths.get(shard)
        if found is None:
            found = self._paths[shard] = str(self.folder / self.encode((shard, 0)))
        return found

    def _bytes(self, path: str, buffer: bytearray | None) -> np.ndarray:
        """The file's bytes: in ``buffer`` when given (writeable, so that torch widens them
        without a warning to silence; a byte longer than ``file_bytes``, to tell a file
        longer than its layout), else freshly read. Plain system calls: each call that
        lets go of the GIL hands it to another shard thread and waits to get it back,
        and Python's file objects make two more of them a shard."""
        if buffer is None:
            return np.frombuffer(Path(path).read_bytes(), dtype=np.uint8)
        if not hasattr(os, "preadv"):  # not on every platform
            with open(path, "rb", buffering=0) as f:
                got = f.readinto(buffer) or 0
        else:
            fd = os.open(path, os.O_RDONLY)
            try:
                got = os.preadv(fd, [buffer], 0)
            finally:
                os.close(fd)
        if got > self.file_bytes:
            raise ChecksumMismatch(f"{path}: more bytes than its layout holds")
        return np.frombuffer(buffer, dtype=np.uint8)[:got]
