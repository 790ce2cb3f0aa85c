"""The actor pool: one Ray actor per ``gpus_per_worker`` GPUs (or CPU slot group), units handed out as they free up.

Why a small pool of our own rather than Ray Data's ``map_batches``: each unit is one
call whose receipt must come back only after the unit's commit, progress is counted in
rows per receipt, and an actor keeps two units in flight (one computing, one writing).
Ray Data would add block bookkeeping and its own progress output for no gain here. We
keep what matters from it: actors load the model once, a dead actor is replaced and its
units retried (at-least-once, safe because a unit owns its shards and commits last).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from actcache.schemas.errors import ConfigError, ModelTooLargeError
from actcache.schemas.job import JobConfig
from actcache.schemas.store import UnitReceipt, UnitTask, WorkerSpec
from actcache.workers.actor import CachingWorker
from actcache.workers.devices import memory_bytes
from actcache.workers.placement import headroom, offloaded
from actcache.workers.storage import storage_env

IN_FLIGHT_PER_ACTOR = 2
POLL_S = 0.5
"""How often the driver reads the actors' batch counts while no unit commits."""
MAX_ATTEMPTS = 3


def worker_options(
    workers: int | None,
    cpus_per_worker: int | None,
    gpus_per_worker: float | None,
    resources: dict[str, float],
) -> tuple[int, dict[str, Any]]:
    """(number of actors, Ray options for each) from the cluster's resources.

    On a cluster with GPUs each actor reserves ``gpus_per_worker`` of them (default 1) and
    there are as many actors as fit; otherwise ``workers`` actors (default 1) share the
    CPUs, each running torch on its share of threads.
    """
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", 1)))
    if gpus_per_worker and not gpus:
        raise ConfigError(
            f"`gpus_per_worker: {gpus_per_worker:g}` but the cluster has no GPUs; "
            "drop it (and --gpus-per-worker) or add GPU nodes"
        )
    if gpus:
        per = gpus_per_worker or 1.0
        fit = int(gpus // per)
        if not fit:
            raise ConfigError(
                f"`gpus_per_worker: {per:g}` is more than the cluster's {gpus} GPUs; "
                f"set it to at most {gpus}"
            )
        count = workers or fit
        if count * per > gpus:
            raise ConfigError(
                f"`workers: {count}` with {per:g} GPUs each asks for more than the cluster's "
                f"{gpus} GPUs; set `workers` to at most {fit}"
            )
        return count, {"num_gpus": per, "num_cpus": cpus_per_worker or 1}
    count = workers or 1
    per_cpu = cpus_per_worker or max(1, cpus // count)
    return count, {"num_cpus": per_cpu}


def check_fits(job: JobConfig, weights: int, depth: int, gpu_bytes: int | None) -> None:
    """Refuse, before any actor starts, a model whose weights exceed the actor's GPUs.

    ``weights``: bytes of blocks 0..depth-1 as loaded (from the checkpoint's headers);
    ``gpu_bytes``: one GPU's memory, None where it cannot be told (then the actor's own
    placement check still refuses a model that does not fit).
    """
    if job.offload or gpu_bytes is None:
        return
    per = job.gpus_per_worker or 1.0
    usable = per * (gpu_bytes - headroom(gpu_bytes))
    if weights > usable:
        gib = 1 << 30
        raise ModelTooLargeError(
            f"model {job.model!r} needs about {weights / gib:.1f} GiB for its weights up to block "
            f"{depth}, more than the {usable / gib:.1f} GiB that {per:g} GPU(s) of "
            f"{gpu_bytes / gib:.0f} GiB leave for weights; raise `gpus_per_worker`, set "
            "`quantize`, cache fewer layers, or set `offload: true` (slow)"
        )


def check_quantize(job: JobConfig, gpus: int) -> None:
    if not job.quantize:
        return
    if not gpus:
        raise ConfigError(
            f"`quantize: {job.quantize}` needs CUDA GPUs (bitsandbytes) and there are none; "
            "drop `quantize` or run on GPU nodes"
        )
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"`quantize: {job.quantize}` needs bitsandbytes: `pip install bitsandbytes`"
        )


class RowCounter:
    """Rows forwarded so far in a run, counted batch by batch.

    Actors call ``add`` after every batch (a fire-and-forget ``add.remote`` on the small
    Ray actor the pool starts; a plain call in-process), so progress moves within a unit
    without a round trip per batch on the actors' side.
    """

    def __init__(self, on_change: Callable[[int], None] | None = None) -> None:
        self.rows = 0
        self.on_change = on_change

    def add(self, rows: int) -> None:
        self.rows += rows
        if self.on_change is not None:
            self.on_change(self.rows)

    def total(self) -> int:
        return self.rows


class ActorPool:
    """Runs unit tasks on ``count`` actors; calls ``on_receipt`` as each unit commits."""

    def __init__(
        self,
        store_url: str,
        spec: WorkerSpec,
        storage_options: dict[str, Any] | None,
        count: int,
        options: dict[str, Any],
        worker_cls: type = CachingWorker,
    ) -> None:
        import ray

        # No weight-loading bars in the actors' logs: progress is the driver's to show.
        env = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", **storage_env()}
        # On a GPU two calls run at once: one unit's shards are written on the CPU while
        # the next unit's forward passes run on the GPU. On a CPU the second call's
        # tokenizer and writer would compete with the forward pass for the same cores
        # (measured slower), so calls run one at a time; the second unit still waits
        # queued in the actor, so the actor never idles between units.
        self._cls = ray.remote(worker_cls).options(
            max_concurrency=IN_FLIGHT_PER_ACTOR if options.get("num_gpus") else 1,
            runtime_env={"env_vars": env},
            **options,
        )
        threads = int(options.get("num_cpus", 1))
        self._args = (store_url, spec, storage_options, threads)
        self.actors = [self._new() for _ in range(count)]
        self.on_lost: Callable[[int, str], None] | None = None
        """Called with (unit, why) for each unit whose actor died (a lost worker or node)."""
        # The counter lives beside the driver: a lost worker node must not take it along.
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        self.counter = ray.remote(num_cpus=0)(RowCounter).options(
            scheduling_strategy=here).remote()

    def _new(self) -> Any:
        return self._cls.remote(*self._args)

    def check(self) -> dict[str, Any]:
        """Every actor's start-up self-check; the record of the first (they agree)."""
        import ray
        from ray.exceptions import RayTaskError

        try:
            records = ray.get([actor.check.remote() for actor in self.actors])
        except RayTaskError as e:
            cause = e.cause if isinstance(e.cause, BaseException) else e
            raise cause from None
        choices = {(r["padding_side"], r["positions"]) for r in records}
        if len(choices) > 1:
            raise RuntimeError(f"workers chose different padding fixes: {sorted(choices)}")
        return dict(records[0])

    def offloaded(self) -> int:
        """Modules the actors' models keep off their GPUs (offload was asked for)."""
        import ray
        from ray.exceptions import RayTaskError

        try:
            placed = ray.get([a.ping.remote() for a in self.actors])
        except RayTaskError as e:  # the actor's own error (its model could not be placed)
            raise (e.cause if isinstance(e.cause, BaseException) else e) from None
        return sum(len(p["offloaded"]) for p in placed)

    def run(self, tasks: list[UnitTask], on_receipt: Callable[[UnitReceipt], None],
            on_rows: Callable[[int], None] | None = None) -> None:
        """Compute ``tasks``; ``on_receipt`` as each unit commits, ``on_rows`` with the rows
        forwarded so far while none does."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        queue = list(reversed(tasks))
        attempts: dict[int, int] = {}
        in_flight: dict[Any, tuple[int, UnitTask]] = {}

        def submit(slot: int) -> None:
            task = queue.pop()
            attempts[task.unit] = attempts.get(task.unit, 0) + 1
            ref = self.actors[slot].process.remote(task.model_dump(), self.counter)
            in_flight[ref] = (slot, task)

        for slot in range(len(self.actors)):
            for _ in range(IN_FLIGHT_PER_ACTOR):
                if queue:
                    submit(slot)
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=POLL_S)
            if not done:
                if on_rows is not None:
                    try:
                        on_rows(int(ray.get(self.counter.total.remote())))
                    except RayActorError:  # progress only: the units' receipts still count
                        on_rows = None
                continue
            ref = done[0]
            slot, task = in_flight.pop(ref)
            try:
                receipt = UnitReceipt.model_validate(ray.get(ref))
            except RayTaskError as e:
                cause = e.cause if isinstance(e.cause, BaseException) else e
                raise cause from None
            except RayActorError as e:
                if attempts[task.unit] >= MAX_ATTEMPTS:
                    raise RuntimeError(
                        f"unit {task.unit} failed {MAX_ATTEMPTS} times: its actor died ({e})"
                    ) from e
                queue.append(task)
                redone = [task.unit] + self._replace(slot, in_flight)
                if self.on_lost is not None:
                    why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    for unit in redone:
                        self.on_lost(unit, why)
            else:
                on_receipt(receipt)
            if queue and sum(1 for s, _ in in_flight.values() if s == slot) < IN_FLIGHT_PER_ACTOR:
                submit(slot)

    def _replace(self, slot: int, in_flight: dict[Any, tuple[int, UnitTask]]) -> list[int]:
        """Start a new actor for ``slot``; returns its other in-flight units, resubmitted."""
        import ray

        old = self.actors[slot]
        self.actors[slot] = self._new()
        resubmitted = []
        for ref, (s, task) in list(in_flight.items()):
            if s == slot:
                # The old actor is dead, so this call fails too; resubmit it on the new actor.
                in_flight.pop(ref)
                ref = self.actors[slot].process.remote(task.model_dump(), self.counter)
                in_flight[ref] = (slot, task)
                resubmitted.append(task.unit)
        ray.kill(old, no_restart=True)
        return resubmitted

    def shutdown(self) -> None:
        import ray

        for actor in [*self.actors, self.counter]:
            ray.kill(actor, no_restart=True)


class InlinePool:
    """Runs units in this process, one after another, on a worker wired by
    ``actcache.cache.wiring.in_process_worker``: an in-process run, ``memory://`` stores, tests."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker

    def check(self) -> dict[str, Any]:
        return dict(self.worker.check())

    def offloaded(self) -> int:
        if self.worker.load_error is not None:
            raise self.worker.load_error
        return len(offloaded(self.worker.model))

    def run(self, tasks: list[UnitTask], on_receipt: Callable[[UnitReceipt], None],
            on_rows: Callable[[int], None] | None = None) -> None:
        counter = RowCounter(on_rows)
        for task in tasks:
            on_receipt(UnitReceipt.model_validate(self.worker.process(task, counter)))

    def shutdown(self) -> None:
        pass


def gpu_memory_bytes() -> int | None:
    """One caching GPU's memory where this runs (None without CUDA): the body of the Ray
    task ``cluster_gpu_memory`` sends to a GPU node, and the in-process run's answer."""
    return memory_bytes(0)


def cluster_gpu_memory(timeout_s: float = 120.0) -> int | None:
    """One of the cluster's GPUs' memory, asked of a short task on a GPU node.

    None when it cannot be told in time (every GPU busy): the actors then check for themselves.
    """
    import ray
    from ray.exceptions import GetTimeoutError

    ref = ray.remote(num_gpus=1, num_cpus=0)(gpu_memory_bytes).remote()
    try:
        return ray.get(ref, timeout=timeout_s)  # type: ignore[no-any-return]
    except GetTimeoutError:
        ray.cancel(ref, force=True)
        return None
