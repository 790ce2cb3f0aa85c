"""Writing one unit: buffers filled batch by batch, then whole shards, then the commit.

Lifecycle (as a Ray Data ``Datasink``): ``start`` allocates the unit's buffers, ``write``
scatters a batch into them, ``complete`` writes every array region the unit owns and
then its commit marker, last. ``failed`` writes nothing: a unit without a marker is
incomplete and will be redone whole.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from actcache.schemas import store as layout
from actcache.schemas.errors import OverflowStorageError
from actcache.schemas.store import Manifest, UnitReceipt, UnitTask
from actcache.workers.dtypes import encode, stored_dtype

FLOAT16_MAX = 65504.0


def to_storage(x: torch.Tensor, dtype: str, layer: int) -> np.ndarray:
    """Cast float32 states to the storage dtype on the host; float16 overflow is an error.

    Plain numpy on purpose: this runs on the writer thread beside the forward pass, and a
    torch op here would start a second intra-op thread team competing for the same cores.
    """
    values = x.detach().to("cpu", torch.float32).numpy()
    if dtype == "float16" and values.size:
        peak = float(np.max(np.abs(values)))
        if peak > FLOAT16_MAX:
            raise OverflowStorageError(
                f"layer {layer} has values up to {peak:.4g}, beyond float16's ±65504; "
                "set `dtype: bfloat16` or `dtype: float32` in the job"
            )
    return encode(values, dtype)


class UnitWriter:
    """Collects one unit's rows and writes the shards it owns."""

    def __init__(self, group: Any, manifest: Manifest) -> None:
        self.group = group
        self.manifest = manifest
        self.dtype = manifest.dtype
        self.hidden = manifest.model.hidden_size
        self._arrays: dict[str, Any] = {}

    def array(self, key: str) -> Any:
        if key not in self._arrays:
            import zarr

            # Every chunk is written, zeros included: a reader then knows a committed
            # unit's missing shard for a loss, not for chunks zarr chose to skip.
            with zarr.config.set({"array.write_empty_chunks": True}):
                self._arrays[key] = zarr.open_array(self.group.store, path=self._path(key),
                                                    mode="r+")
        return self._arrays[key]

    def _path(self, key: str) -> str:
        return f"{self.group.path}/{key}".lstrip("/")

    def start(self, task: UnitTask, lengths: Sequence[int],
              extra: dict[str, Any] | None = None) -> None:
        self.task = task
        # Image rows: each example's patch grid (rows, columns), for readers of `tokens`.
        self.grid = (extra or {}).get("grid")
        n = len(task.ids)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        total = int(self.lengths.sum())
        np_dtype = stored_dtype(self.dtype)
        self.buffers: dict[tuple[str, int], np.ndarray] = {}
        for pooling in self.manifest.poolings:
            for layer in self.manifest.layers:
                rows = total if pooling == "tokens" else n
                self.buffers[(pooling, layer)] = np.empty((rows, self.hidden), dtype=np_dtype)

    def write(self, rows: np.ndarray, pooled: dict[tuple[str, int], torch.Tensor]) -> None:
        """Scatter one batch (``rows``: positions within the unit) into the buffers."""
        for (pooling, layer), states in pooled.items():
            values = to_storage(states, self.dtype, layer)
            buffer = self.buffers[(pooling, layer)]
            if pooling != "tokens":
                buffer[rows] = values
                continue
            at = 0
            for row in rows:
                length = int(self.lengths[row])
                start = int(self.offsets[row])
                buffer[start : start + length] = values[at : at + length]
                at += length

    def complete(self, truncated: Sequence[bool], wall_s: float) -> UnitReceipt:
        task = self.task
        n = len(task.ids)
        lo, hi = task.slot_start, task.slot_start + n
        nbytes = 0
        for (pooling, layer), buffer in self.buffers.items():
            if pooling == "tokens":
                self._write_packed(layer, buffer)
            else:
                self.array(layout.activation_key(pooling, layer))[lo:hi] = buffer
            nbytes += buffer.nbytes
        self.array(layout.IDS_KEY)[lo:hi] = np.array(task.ids, dtype=str)
        self.array(layout.SEQ_KEY)[lo:hi] = np.array(task.seq, dtype=np.int64)
        self.array(layout.HASH_KEY)[lo:hi] = np.array(task.hashes, dtype=str)
        self.array(layout.META_KEY)[lo:hi] = np.array(task.meta, dtype=str)
        self.array(layout.TRUNCATED_KEY)[lo:hi] = np.asarray(truncated, dtype=bool)
        if self.grid is not None and self.manifest.modality == "image":
            self.array(layout.GRID_KEY)[lo:hi] = np.asarray(self.grid, dtype=np.int32).reshape(n, 2)
        if self.manifest.store_inputs:
            # A sentence pair is kept as the JSON list [text, pair].
            inputs = [x if isinstance(x, str) else json.dumps(list(x), ensure_ascii=False)
                      for x in task.inputs]
            self.array(layout.INPUT_KEY)[lo:hi] = np.array(inputs, dtype=str)
        if "tokens" in self.manifest.poolings:
            self.array(layout.TOKEN_OFFSET_KEY)[lo:hi] = self.offsets
            self.array(layout.TOKEN_LENGTH_KEY)[lo:hi] = self.lengths
        receipt = UnitReceipt(
            unit=task.unit,
            slot_start=task.slot_start,
            rows=n,
            bytes=nbytes,
            truncated=int(np.sum(truncated)),
            tokens=int(self.lengths.sum()),
            wall_s=round(wall_s, 4),
            run_id=task.run_id,
            host=socket.gethostname(),
        )
        commit(self.group, receipt)
        return receipt

    def _write_packed(self, layer: int, buffer: np.ndarray) -> None:
        """Format 3: the unit's tokens as one array of exactly their length, uncompressed.

        The unit owns the array whole, as it owns whole shards of the row arrays; a rerun
        of the unit replaces it. A unit without any token position writes no array.
        """
        from zarr.codecs import Crc32cCodec

        key = layout.token_unit_key(layer, self.task.unit)
        if not len(buffer):
            if key in self.group:
                del self.group[key]
            return
        chunk, shard = layout.token_chunks(len(buffer))
        arr = self.group.create_array(
            key, shape=buffer.shape, chunks=(chunk, self.hidden), shards=(shard, self.hidden),
            dtype=buffer.dtype, fill_value=0, compressors=(Crc32cCodec(),),
            attributes={layout.DTYPE_ATTR: self.dtype},
            # One dimension name per unit: the arrays differ in length, and xarray refuses
            # one name with several sizes in a group.
            dimension_names=(f"token_{layout.unit_name(self.task.unit)}", "hidden"), overwrite=True,
            config={"write_empty_chunks": True},
        )
        arr[:] = buffer

    def failed(self) -> None:
        self.buffers = {}


def commit(group: Any, receipt: UnitReceipt) -> None:
    """Mark a unit complete: the marker is written after every byte of the unit."""
    units = group[layout.UNITS_GROUP]
    units.create_array(
        name=layout.unit_name(receipt.unit),
        shape=(0,),
        dtype="uint8",
        attributes=json.loads(receipt.model_dump_json()),
        dimension_names=("marker",),
        overwrite=True,
    )
