"""The caching driver: the orchestration of a run.

Check the job against its store, take the store's lease, plan, start the workers (Ray
actors, or one worker in this process), compute the units, record the run. What each
step needs lives beside it: job files (``jobfile``), the worker wiring (``wiring``), the
store's lifecycle (``lifecycle``), the Ray session (``raysession``), resources and fit
(``fit``), dry-run printing (``dryrun``), run records (``runrecord``).

Why an in-process run (``inline``, ``actcache cache --in-process``) beside Ray: starting
Ray and an actor costs seconds that a small job on one machine never gets back (measured
in the README). Ray stays the default: it joins a cluster, gives each GPU its own actor
and replaces a worker that dies mid-unit. Both run the same worker class, with the same
lease, store, commit markers, resume, run record and progress.
"""

from __future__ import annotations

import contextlib
import errno
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from actcache.cache.create import mark_valid
from actcache.cache.fit import check_one_worker, plan_workers
from actcache.cache.jobfile import load_job, parse_job
from actcache.cache.lease import Lease
from actcache.cache.lifecycle import (
    apply_metadata_updates,
    check_store,
    note_truncated,
    plan_run,
    start_store,
    write_plan,
)
from actcache.cache.plan import Plan
from actcache.cache.progress import Progress
from actcache.cache.raysession import connect_ray, ray_session
from actcache.cache.runlog import sigint_deferred
from actcache.cache.runrecord import (
    committed,
    committed_by,
    new_run_id,
    now,
    record,
    record_failure,
    started_record,
    succeeded,
)
from actcache.cache.wiring import Described, describe_job, in_process_worker, worker_spec
from actcache.schemas.errors import ConfigError, RunInterrupted, StorageFullError
from actcache.schemas.job import JobConfig
from actcache.schemas.store import UnitReceipt
from actcache.workers.storage import check_access


@dataclass
class RunSummary:
    store: str
    run_id: str
    rows: int
    units: int
    bytes: int
    truncated: int
    wall_s: float
    plan: Plan

    def line(self) -> str:
        p = self.plan
        meta = len(p.metadata_updates)
        return (
            f"{self.rows} rows cached in {self.units} units ({self.bytes / 1e6:.1f} MB "
            f"uncompressed) in {self.wall_s:.1f}s; {p.added} added, {p.updated} updated, "
            f"{p.skipped} skipped" + (f" ({meta} with new metadata only)" if meta else "")
            + f", {p.missing} missing from input; {self.truncated} truncated inputs -> {self.store}"
        )


def run_job(
    job: JobConfig,
    *,
    overwrite: bool = False,
    dry_run: bool = False,
    storage_options: dict[str, Any] | None = None,
    inline: bool = False,
    worker_cls: type | None = None,
    echo: Any = print,
    repair: bool = False,
) -> RunSummary:
    """Run ``job``: cache every new or edited input row into its store, then record the run.

    ``inline``: one worker in this process instead of Ray actors (no Ray is started).
    """
    started = time.perf_counter()
    check_access(job.store, storage_options)
    described = describe_job(job, storage_options)
    if job.store.startswith("memory://") and not inline:
        raise ConfigError(
            "a memory:// store lives inside one process and Ray workers cannot reach it; "
            "use a local path or s3:// for `store`, or run with --in-process"
        )
    if inline:
        check_one_worker(job)
    run_id = new_run_id()
    if dry_run:
        from actcache.cache.dryrun import dry_run as print_dry_run

        plan = print_dry_run(job, described, overwrite, storage_options, run_id, echo)
        return RunSummary(job.store, run_id, 0, 0, 0, 0, time.perf_counter() - started, plan)
    check_store(job, described.manifest, overwrite, storage_options)  # refuse before touching it
    # The store is read again and planned under the lease: a run that waited for another
    # to finish plans against what that run wrote, never against what it saw before.
    try:
        with Lease(job.store, run_id, storage_options) as lease:
            if repair:
                from actcache.cache.verify import repair as uncommit_corrupt

                uncommit_corrupt(job.store, set(described.inputs.ids), storage_options, echo)
            fresh, plan = plan_run(job, described.manifest, described.inputs, overwrite,
                                   storage_options, run_id)
            with _workers(job, described, plan, fresh, storage_options, inline,
                          worker_cls) as (pool, group):
                return _execute(job, plan, group, storage_options, pool, echo, started, lease)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise StorageFullError(
            f"store {job.store}: no space left on its device ({e.strerror}); every unit "
            "committed so far is kept: free space (or move the store) and run the job again "
            "to finish it"
        ) from e


@contextlib.contextmanager
def _workers(job: JobConfig, described: Described, plan: Plan, fresh: bool,
             storage_options: dict[str, Any] | None, inline: bool,
             worker_cls: type | None) -> Iterator[tuple[Any, Any]]:
    """(the pool that computes the plan's units, the store's group ready for them).

    The pool is None when there is nothing to compute. Every worker checks itself before
    the store is written: a refused model leaves the store as it was. Ray's messages go
    to the run's log file, not the terminal.
    """
    from actcache.cache.pool import ActorPool, InlinePool
    from actcache.workers.actor import CachingWorker

    if not plan.tasks:
        yield None, start_store(job.store, described.manifest, plan.n_units, fresh,
                                storage_options)[0]
        return
    if inline:
        plan_workers(job, described.manifest, inline=True)
        wired = in_process_worker(job, storage_options=storage_options, described=described,
                                  plan=plan, fresh=fresh, worker_cls=worker_cls)
        yield InlinePool(wired.worker), wired.group
        return
    with ray_session(plan.tasks[0].run_id):
        count, options = plan_workers(job, described.manifest, inline=False)
        pool = None
        try:
            pool = ActorPool(job.store, worker_spec(described.manifest, plan),
                             storage_options, count, options, worker_cls or CachingWorker)
            manifest = described.manifest.model_copy(update={"self_check": pool.check()})
            yield pool, start_store(job.store, manifest, plan.n_units, fresh, storage_options)[0]
        finally:
            if pool is not None:
                with sigint_deferred():
                    pool.shutdown()


def _settled(group: Any, run_id: str, step_s: float = 0.25, tries: int = 20
             ) -> list[UnitReceipt]:
    """The run's committed units, once two counts ``step_s`` apart agree."""
    receipts = committed_by(group, run_id)
    for _ in range(tries):
        time.sleep(step_s)
        again = committed_by(group, run_id)
        if len(again) == len(receipts):
            return again
        receipts = again
    return receipts


def _execute(
    job: JobConfig,
    plan: Plan,
    group: Any,
    storage_options: dict[str, Any] | None,
    pool: Any,
    echo: Any,
    started: float,
    lease: Lease | None = None,
) -> RunSummary:
    run = started_record(plan)
    record(group, run)
    receipts: list[UnitReceipt] = []
    redone: list[int] = []
    try:
        write_plan(group, plan)
        apply_metadata_updates(group, plan)
        if pool is not None:
            _run_units(job, plan, pool, lease, receipts, redone)
    except KeyboardInterrupt:
        with sigint_deferred():
            # Stop the workers first: an actor still running could commit a unit after the
            # count below. A unit whose actor was killed while committing lands within
            # milliseconds, so the store's markers are counted once they stop changing.
            if pool is not None:
                pool.shutdown()
            receipts = _settled(group, run.run_id)
            mark_valid(group)
            record(group, run.model_copy(update={
                "ended": now(), "status": "interrupted", **committed(plan, receipts),
                "units_redone": tuple(redone)}))
        rows = sum(r.rows for r in receipts)
        raise RunInterrupted(f"interrupted; {rows} rows committed, rerun to finish") from None
    except BaseException as e:
        with contextlib.suppress(Exception):  # the run's own error is the one to report
            mark_valid(group)
        record_failure(group, run.model_copy(update={
            "ended": now(), "status": "failed", **committed(plan, receipts),
            "errors": (f"{type(e).__name__}: {e}",), "units_redone": tuple(redone),
        }))
        raise
    mark_valid(group)
    truncated = note_truncated(group, job.store, storage_options)
    record(group, run.model_copy(update={
        **succeeded(plan, len(receipts)), "units_redone": tuple(redone)}))
    summary = RunSummary(
        job.store, run.run_id, sum(r.rows for r in receipts), len(receipts),
        sum(r.bytes for r in receipts), truncated, time.perf_counter() - started, plan,
    )
    echo(summary.line())
    return summary


def _run_units(job: JobConfig, plan: Plan, pool: Any, lease: Lease | None,
               receipts: list[UnitReceipt], redone: list[int]) -> None:
    """Compute the plan's units on ``pool``, appending each receipt as its unit commits."""
    if hasattr(pool, "on_lost"):

        def on_lost(unit: int, why: str) -> None:
            redone.append(unit)
            print(f"caching: a worker was lost ({why}); unit {unit} is redone on another",
                  file=sys.stderr, flush=True)

        pool.on_lost = on_lost
    off = pool.offloaded() if job.offload else 0
    progress = Progress(plan.pending_rows, len(plan.tasks),
                        f"{off} modules offloaded to CPU/disk (slow)" if off else "")

    def on_receipt(receipt: UnitReceipt) -> None:
        if lease is not None:
            lease.check()
        receipts.append(receipt)
        progress.update(receipt)

    try:
        pool.run(plan.tasks, on_receipt, progress.computed)
    finally:
        progress.close()


__all__ = ["RunSummary", "connect_ray", "load_job", "parse_job", "run_job"]
