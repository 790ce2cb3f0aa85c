"""Resource and fit planning: how many workers, with what, and whether the model fits them.

Checked before anything is written, so a job that cannot run leaves its store as it was.
"""

from __future__ import annotations

from typing import Any

from actcache.cache.plan import Plan
from actcache.schemas.errors import ConfigError
from actcache.schemas.job import JobConfig
from actcache.schemas.store import Manifest
from actcache.workers.dtypes import ITEMSIZE
from actcache.workers.model import depth_needed, model_folder


def plan_workers(job: JobConfig, manifest: Manifest, inline: bool) -> tuple[int, dict[str, Any]]:
    """Check the job against the GPUs before anything is written: (actors, Ray options).

    In process, one worker. The weights to load are estimated from the checkpoint's
    headers (only the blocks the deepest layer needs), against one GPU's memory.
    """
    from actcache.cache.pool import (
        check_fits,
        check_quantize,
        cluster_gpu_memory,
        gpu_memory_bytes,
        worker_options,
    )
    from actcache.workers.placement import weight_bytes

    if inline:
        from actcache.workers.devices import gpu_count

        resources = {"CPU": 1.0, "GPU": float(gpu_count())}
    else:
        import ray

        from actcache.cache.raysession import connect_ray

        connect_ray()
        resources = ray.cluster_resources()
    count, options = worker_options(
        1 if inline else job.workers, job.cpus_per_worker, job.gpus_per_worker, resources
    )
    check_quantize(job, int(resources.get("GPU", 0)))
    if "num_gpus" in options:
        n_layers = manifest.model.num_hidden_layers
        depth = depth_needed(manifest.layers, n_layers)
        folder = model_folder(job.model, job.revision)
        weights = weight_bytes(folder, depth, n_layers, manifest.model_dtype, job.quantize)
        check_fits(job, weights, depth, gpu_memory_bytes() if inline else cluster_gpu_memory())
    return count, options


def check_one_worker(job: JobConfig) -> None:
    """An in-process run is one worker: refuse a job that asks for more, rather than
    quietly running a job meant for several actors on one."""
    if job.workers is not None and job.workers > 1:
        raise ConfigError(
            f"`workers: {job.workers}` asks for {job.workers} Ray actors, and an in-process "
            "run (--in-process) is one worker; drop --in-process, or set `workers: 1`"
        )


def estimate_bytes(manifest: Manifest, plan: Plan, adapter: Any) -> int:
    """Bytes the plan's units will write, uncompressed (tokens counted by the adapter)."""
    width = manifest.model.hidden_size * ITEMSIZE[manifest.dtype]
    per_row = width * len(manifest.layers)
    pooled = sum(1 for p in manifest.poolings if p != "tokens")
    total = plan.pending_rows * per_row * pooled
    if "tokens" in manifest.poolings:
        texts = [t for task in plan.tasks for t in task.inputs]
        tokens = sum(adapter.encode(texts).lengths) if texts else 0
        total += tokens * per_row
    return total
