"""The caching worker: loads its model once, then computes and writes one unit per call.

The driver wraps this class with ``ray.remote`` (one actor per GPU, or per CPU slot
group). On a GPU it runs with ``max_concurrency=2``: while one call writes its unit's
shards, the next call's forward passes already run (a lock keeps forward passes one at
a time).
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

from actcache.schemas.store import UnitReceipt, UnitTask
from actcache.workers.adapters import TextAdapter
from actcache.workers.capture import Capture
from actcache.workers.model import first_line, load_config, num_layers, resolve_model_path
from actcache.workers.storage import open_group
from actcache.workers.writer import UnitWriter

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_QUEUE_DEPTH = 4


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def load_model(name: str, job: dict[str, Any], device: torch.device) -> Any:
    from transformers import AutoModel

    from actcache.schemas.errors import ModelLoadError

    try:
        model = AutoModel.from_pretrained(
            resolve_model_path(name),
            revision=job.get("revision"),
            trust_remote_code=bool(job.get("trust_remote_code")),
            dtype=_DTYPES[job.get("model_dtype", "float32")],
            local_files_only=True,
        )
    except Exception as e:
        raise ModelLoadError(f"cannot load model {name!r}: {first_line(e)}") from e
    return model.to(device).eval()


class CachingWorker:
    """Actor body: ``process(task)`` computes a unit, writes it, commits it, returns a receipt."""

    def __init__(
        self,
        store_url: str,
        manifest: dict[str, Any],
        storage_options: dict[str, Any] | None = None,
        threads: int | None = None,
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.manifest = manifest
        job = manifest["job"]
        self.device = pick_device()
        name = job["model"]
        config = load_config(name, job.get("revision"), bool(job.get("trust_remote_code")))
        self.adapter = TextAdapter(
            name,
            revision=job.get("revision"),
            trust_remote_code=bool(job.get("trust_remote_code")),
            max_length=manifest["max_length"],
            truncation_side=manifest["truncation_side"],
            model_config=config,
        )
        self.model = load_model(name, job, self.device)
        self.capture = Capture(
            self.model, manifest["layers"], num_layers(config), manifest["poolings"]
        )
        self.batch_size = int(job["batch_size"])
        self.group = open_group(store_url, "r+", storage_options)
        self._forward_lock = threading.Lock()
        # On a CPU there is no device copy to hide, and a writer thread only takes the GIL
        # from the forward pass (measured ~10% slower on MiniLM): batches are written inline.
        self.threaded_writer = self.device.type != "cpu"

    def ping(self) -> dict[str, Any]:
        """Where this actor runs: for scheduling checks and logs."""
        import ray

        ctx = ray.get_runtime_context()
        return {
            "pid": os.getpid(),
            "node": ctx.get_node_id(),
            "gpus": [str(g) for g in ray.get_gpu_ids()],
            "device": str(self.device),
        }

    def process(self, task: UnitTask | dict[str, Any], counter: Any = None) -> dict[str, Any]:
        """Compute, write and commit ``task``; ``counter.add(rows)`` (a Ray actor's, or a
        plain object's) hears of every forwarded batch."""
        if isinstance(task, dict):
            task = UnitTask.model_validate(task)
        started = time.perf_counter()
        encoded = self.adapter.encode(task.inputs)
        writer = UnitWriter(self.group, self.manifest)
        writer.start(task, encoded.lengths)
        add = None if counter is None else getattr(counter.add, "remote", counter.add)
        try:
            self._forward_all(encoded.input_ids, writer, add)
            receipt: UnitReceipt = writer.complete(encoded.truncated, time.perf_counter() - started)
        except BaseException:
            writer.failed()
            raise
        return receipt.model_dump()

    def _forward_all(self, input_ids: list[list[int]], writer: UnitWriter,
                     add: Any = None) -> None:
        # Longest first: batches of similar length waste little on padding, and the peak
        # memory of the unit shows on its first batch rather than its last.
        order = np.argsort([-len(ids) for ids in input_ids], kind="stable")
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if not self.threaded_writer:
            with self._forward_lock:
                for rows in batches:
                    batch = self.adapter.batch([input_ids[i] for i in rows])
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
                    batch = self.adapter.batch([input_ids[i] for i in rows])
                    batch = {k: v.to(self.device) for k, v in batch.items()}
                    pending.put((rows, self.capture(batch)))
                    if add is not None:
                        add(len(rows))
        finally:
            pending.put(None)
            thread.join()
        if errors:
            raise errors[0]
