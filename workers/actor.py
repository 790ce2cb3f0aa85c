"""The caching worker: loads its model once, then computes and writes one unit per call.

The driver wraps this class with ``ray.remote`` (one actor per ``gpus_per_worker``
GPUs, or per CPU slot group). On a GPU it runs with ``max_concurrency=2``: while one
call writes its unit's shards, the next call's forward passes already run (a lock keeps
forward passes one at a time). Its model is built only as deep as the deepest requested
layer and placed over the actor's GPUs (workers/model.py, workers/placement.py).
Inside a call on a GPU, a writer thread behind a bounded queue copies each batch to the
host, casts and scatters it while the next batch runs forward; on a CPU that copy does
not exist and the batch is written inline.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any

import numpy as np
import torch

from actcache.schemas.errors import UserError
from actcache.schemas.store import UnitReceipt, UnitTask, WorkerSpec
from actcache.workers.adapters import make_adapter, model_side, side_layers
from actcache.workers.capture import Capture
from actcache.workers.final_norm import final_norm
from actcache.workers.model import depth_needed, input_device, load_config, load_model
from actcache.workers.placement import actor_gpus, offloaded
from actcache.workers.selfcheck import self_check, tolerance
from actcache.workers.storage import open_group
from actcache.workers.writer import UnitWriter

_QUEUE_DEPTH = 4


class CachingWorker:
    """Actor body: ``process(task)`` computes a unit, writes it, commits it, returns a receipt."""

    def __init__(
        self,
        store_url: str | None,
        spec: WorkerSpec | dict[str, Any],
        storage_options: dict[str, Any] | None = None,
        threads: int | None = None,
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        # Validated once, here: past this point every default is the schema's.
        spec = WorkerSpec.model_validate(spec)
        self.manifest = manifest = spec.manifest
        self.check_inputs = spec.check_inputs
        self.job = job = manifest.job_config
        name = job.model
        config = load_config(name, job.revision, job.trust_remote_code)
        self.adapter = make_adapter(job, config, manifest.max_length, manifest.truncation_side,
                                    storage_options)
        config = self.adapter.encoder_config(config)
        side = model_side(job, config)
        n_layers = side_layers(config, side)
        # Text models are built only as deep as asked (tested family by family); the
        # decoder side and other modalities load whole and are cut after loading.
        depth = (depth_needed(manifest.layers, n_layers)
                 if self.adapter.modality == "text" and side != "decoder" else None)
        self.load_error: UserError | None = None
        try:
            self.model = self.adapter.encoder(
                load_model(name, job, depth, actor_gpus(job.gpus_per_worker))
            )
        except UserError as e:
            # Raised here, Ray would only say the actor died (and start another); kept and
            # raised by each call, it reaches the user as itself: one line, exit 2.
            self.load_error = e
            return
        self.device = input_device(self.model)
        try:
            self.capture = Capture(self.model, manifest.layers, n_layers, manifest.poolings,
                                   side, last_block=job.last_layer == "block")
            if job.final_norm:
                self.capture.norm = final_norm(self.capture.net, config, n_layers)
        except UserError as e:
            # A layer this model cannot give: kept and raised by each call, as a load error is.
            self.load_error = e
            return
        self.batch_size = job.batch_size
        # Opened at the first unit: workers check themselves before the store is written.
        self._store = (store_url, storage_options)
        self._group: Any = None
        self.checked: dict[str, Any] | None = None
        self._forward_lock = threading.Lock()
        # On a CPU there is no device copy to hide, and a writer thread only takes the GIL
        # from the forward pass (measured ~10% slower on MiniLM): batches are written inline.
        self.threaded_writer = self.device.type != "cpu"

    def ping(self) -> dict[str, Any]:
        """Where this actor runs: for scheduling checks and logs."""
        import ray

        if self.load_error is not None:
            raise self.load_error
        ctx = ray.get_runtime_context()
        return {
            "pid": os.getpid(),
            "node": ctx.get_node_id(),
            "gpus": [str(g) for g in ray.get_gpu_ids()],
            "device": str(self.device),
            "offloaded": offloaded(self.model),
        }

    @property
    def group(self) -> Any:
        if self._group is None:
            self._group = open_group(self._store[0] or "", "r+", self._store[1])
        return self._group

    def check(self) -> dict[str, Any]:
        """The start-up self-check on the run's check inputs (see actcache.workers.selfcheck).

        Leaves the chosen padding side and position rule applied, returns the record.
        """
        if self.load_error is not None:
            raise self.load_error
        if self.checked is not None:
            return self.checked
        inputs = list(self.check_inputs)
        started = time.perf_counter()
        if self.batch_size == 1 or len(inputs) < 2:
            # Every input runs alone: there is no padding to check.
            record: dict[str, Any] = {"examples": 0, "padding_side": self.adapter.padding_side,
                                      "positions": self.capture.positions, "max_rel_error": 0.0}
        else:
            tol = tolerance(self.manifest.dtype, self.manifest.model_dtype)
            with self._forward_lock, torch.inference_mode():
                record = self_check(self.capture, self.adapter, inputs, tol, self.job.model,
                                    self.device)
        record["seconds"] = round(time.perf_counter() - started, 3)
        self.checked = record
        return record

    def process(self, task: UnitTask | dict[str, Any], counter: Any = None) -> dict[str, Any]:
        """Compute, write and commit ``task``; ``counter.add(rows)`` (a Ray actor's, or a
        plain object's) hears of every forwarded batch."""
        if self.load_error is not None:
            raise self.load_error
        if isinstance(task, dict):
            task = UnitTask.model_validate(task)
        self.check()
        started = time.perf_counter()
        encoded = self.adapter.encode(task.inputs)
        writer = UnitWriter(self.group, self.manifest)
        writer.start(task, encoded.lengths, encoded.extra)
        add = None if counter is None else getattr(counter.add, "remote", counter.add)
        try:
            self._forward_all(encoded.examples, encoded.lengths, writer, add)
            receipt: UnitReceipt = writer.complete(encoded.truncated, time.perf_counter() - started)
        except BaseException:
            writer.failed()
            raise
        return receipt.model_dump()

    def _batches(self, order: np.ndarray, examples: list[dict[str, Any]]) -> list[np.ndarray]:
        """Runs of at most ``batch_size`` rows in ``order`` that the adapter may batch together.

        Images of different pixel shapes, and audio for a group-norm feature encoder of
        different lengths, never share a batch (``adapter.batch_key``).
        """
        groups: dict[Any, list[int]] = {}
        for i in order:
            groups.setdefault(self.adapter.batch_key(examples[i]), []).append(int(i))
        return [
            np.asarray(rows[i : i + self.batch_size])
            for rows in groups.values()
            for i in range(0, len(rows), self.batch_size)
        ]

    def _forward_all(
        self, examples: list[dict[str, Any]], lengths: list[int], writer: UnitWriter,
        add: Any = None,
    ) -> None:
        # Longest first: batches of similar length waste little on padding, and the peak
        # memory of the unit shows on its first batch rather than its last.
        order = np.argsort([-n for n in lengths], kind="stable")
        batches = self._batches(order, examples)
        if not self.threaded_writer:
            with self._forward_lock:
                for rows in batches:
                    batch = self.adapter.batch([examples[i] for i in rows])
                    writer.write(rows, self.capture(batch))
                    if add is not None:
                        add(len(rows))
            return
        pending: queue.Queue[Any] = queue.Queue(maxsize=_QUEUE_DEPTH)
        errors: list[BaseException] = []

        def drain() -> None:
            while (item := pending.get()) is not None:
                if not errors:
                    try:
                        writer.write(*item)
                    except BaseException as e:  # re-raised on the calling thread
                        errors.append(e)

        thread = threading.Thread(target=drain, name="unit-writer", daemon=True)
        thread.start()
        try:
            with self._forward_lock:
                for rows in batches:
                    if errors:
                        break
                    batch = self.adapter.batch([examples[i] for i in rows]).to(self.device)
                    pending.put((rows, self.capture(batch)))
                    if add is not None:
                        add(len(rows))
        finally:
            pending.put(None)
            thread.join()
        if errors:
            raise errors[0]
