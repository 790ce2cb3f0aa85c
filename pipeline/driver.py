"""The caching driver: load a job, check or create its store, plan, run the pool, record."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from actcache import __version__
from actcache.create import (
    CODEC,
    check_compatible,
    chunk_rows_for,
    create_store,
    grow,
    mark_valid,
)
from actcache.inputs import load_inputs
from actcache.lease import Lease
from actcache.plan import Plan, StoredRows, empty_stored, make_plan
from actcache.progress import Progress
from actcache.runlog import note, ray_output_to, run_log, sigint_deferred
from actcache.schemas import store as layout
from actcache.schemas.errors import (
    ConfigError,
    RunInterrupted,
    StorageFullError,
    StoreMismatchError,
)
from actcache.schemas.job import JobConfig, ModelDtype
from actcache.schemas.store import Manifest, ModelInfo, RunRecord, UnitReceipt
from actcache.workers.media import IMAGE_BACKEND
from actcache.workers.model import (
    depth_needed,
    encoder_config,
    hidden_size,
    load_config,
    model_folder,
    resolve_layers,
    resolve_model_dtype,
    weights_fingerprint,
)
from actcache.workers.storage import check_access, open_group


def load_job(path: str | os.PathLike[str], **overrides: Any) -> JobConfig:
    """Read and validate a job YAML; relative paths resolve against its folder."""
    file = Path(path)
    try:
        raw = yaml.safe_load(file.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"job file {str(file)!r} does not exist") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"job file {str(file)!r} is not UTF-8 text (byte {e.start})") from e
    except yaml.YAMLError as e:
        flat = " ".join(str(e).split())  # one line: the error names line and column itself
        raise ConfigError(f"job file {str(file)!r} is not valid YAML: {flat}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"job file {str(file)!r} must be a mapping of job fields")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    base = file.resolve().parent
    for key in ("inputs", "store", "model"):
        value = raw.get(key)
        if isinstance(value, str) and "://" not in value and not os.path.isabs(value):
            candidate = base / value
            # A model may also be a hub id ("org/name"): only rebase it when it exists here.
            if key != "model" or candidate.exists():
                raw[key] = os.path.normpath(candidate)
    return parse_job(raw, str(file))


def parse_job(raw: dict[str, Any], source: str = "job") -> JobConfig:
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "job"
        raise ConfigError(f"{source}: `{where}`: {first['msg']}") from e


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


def describe_model(job: JobConfig) -> tuple[ModelInfo, Any, Any]:
    """Resolve the model and its tokenizer without loading weights (fast, before Ray)."""
    from actcache.workers.adapters import make_adapter, model_side, side_layers

    config = load_config(job.model, job.revision, job.trust_remote_code)
    adapter = make_adapter(job.model_dump(mode="json"), config, job.max_length, job.truncation_side)
    side = model_side(job.model_dump(mode="json"), config)
    config = encoder_config(config, job.modality)
    check_media_job(job, config, adapter)
    weights, commit = weights_fingerprint(job.model, job.revision)
    info = ModelInfo(
        name=job.model,
        revision=commit or job.revision,
        weights_hash=weights,
        model_type=str(getattr(config, "model_type", "unknown")),
        num_hidden_layers=side_layers(config, side),
        hidden_size=hidden_size(config),
        tokenizer=adapter.description,
        padding_side=adapter.padding_side,
    )
    return info, config, adapter


def check_media_job(job: JobConfig, config: Any, adapter: Any) -> None:
    """Refuse, before anything runs, what an image or audio model cannot give."""
    if job.final_norm:
        from actcache.workers.final_norm import check_final_norm

        check_final_norm(config)
    if "first" in job.pooling and job.modality != "text" and not adapter.has_class_token:
        raise ConfigError(
            f"a {getattr(config, 'model_type', 'this')} model has no class token, so `first` "
            "pooling is not defined for it; use mean or tokens"
        )


def build_manifest(job: JobConfig, info: ModelInfo, max_length: int,
                   side: str | None = None, prefix: int = 0) -> Manifest:
    layers = resolve_layers(job.layers, info.num_hidden_layers)
    # `model_dtype: auto` is recorded as the dtype it resolved to: a store is compared,
    # and its values made, by the dtype that actually ran.
    model_dtype = resolve_model_dtype(job.model, job.revision, job.trust_remote_code,
                                      job.model_dtype.value)
    job = job.model_copy(update={"model_dtype": ModelDtype(model_dtype)})
    return Manifest(
        actcache_version=__version__,
        model=info,
        layers=layers,
        poolings=tuple(p.value for p in job.pooling),
        dtype=job.dtype.value,
        model_dtype=model_dtype,
        max_length=max_length,
        truncation_side=job.truncation_side,
        text_column=job.input_column,
        id_column=job.id_column,
        rows_per_unit=job.rows_per_unit,
        chunk_rows=chunk_rows_for(job.rows_per_unit),
        codec=CODEC,
        job=job.model_dump(mode="json"),
        modality=job.modality,
        prefix_tokens=prefix,
        final_norm=job.final_norm,
        processor_backend=IMAGE_BACKEND if job.modality == "image" else None,
        side=side,
    )


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _store_exists(url: str, storage_options: dict[str, Any] | None) -> tuple[bool, dict[str, Any] | None]:
    """(anything at the URL, the actcache manifest if it is a store)."""
    from actcache.workers.storage import filesystem

    fs, root = filesystem(url, storage_options)
    if not fs.exists(f"{root}/zarr.json"):
        # Another run's lease alone (it is creating the store) does not make the folder
        # foreign: that run's lease refuses this one with a message naming its holder.
        occupied = fs.exists(root) and any(
            not _is_lease(e) for e in fs.ls(root, detail=False)
        )
        return occupied, None
    group = open_group(url, "r", storage_options)
    return True, dict(group.attrs.get(layout.MANIFEST_ATTR) or {}) or None


def _is_lease(entry: str) -> bool:
    """The lease folder, or a lease being created (see actcache.lease)."""
    name = entry.rstrip("/").rsplit("/", 1)[-1]
    return name == "lease" or name.startswith(".lease-")


def _clear(url: str, storage_options: dict[str, Any] | None) -> None:
    """Remove everything at the URL but the lease we hold."""
    from actcache.workers.storage import filesystem

    fs, root = filesystem(url, storage_options)
    if not fs.exists(root):
        return
    for entry in fs.ls(root, detail=False):
        if not _is_lease(entry):
            fs.rm(entry, recursive=True)


def stored_rows(url: str, storage_options: dict[str, Any] | None) -> StoredRows:
    from actcache.store import Store, _gather

    store = Store(url, storage_options)
    slots = store.physical_slots()
    complete = {r.unit for r in store.receipts}
    n_units = int(store.manifest.get("n_units", 0))
    return StoredRows(
        ids=list(store.ids),
        seq=_gather(store.group[layout.SEQ_KEY], slots).astype("int64"),
        hashes=list(store.content_hashes()),
        meta=list(store.raw_metadata()),
        slots=slots,
        complete_units=complete,
        n_units=n_units,
        planned_seq=_planned_seq(store.group, complete, n_units, int(store.manifest["rows_per_unit"])),
    )


def _planned_seq(group: Any, complete: set[int], n_units: int, rows_per_unit: int) -> dict[str, int]:
    """Ids and store order that earlier runs planned into units they did not complete."""
    import numpy as np

    open_units = [u for u in range(n_units) if u not in complete]
    if not open_units:
        return {}
    slots = np.concatenate([np.arange(u * rows_per_unit, (u + 1) * rows_per_unit) for u in open_units])
    from actcache.store import _gather

    ids = _gather(group[layout.IDS_KEY], slots)
    seq = _gather(group[layout.SEQ_KEY], slots)
    return {str(i): int(q) for i, q in zip(ids, seq, strict=True) if q >= 0 and i}


def _write_plan(group: Any, plan: Plan) -> None:
    """Record each planned row's id and store order before any actor starts.

    Actors write the same values again with their unit; what an interrupted run leaves
    here lets the next run keep those rows in their planned order.
    """
    import numpy as np

    ids_arr, seq_arr = group[layout.IDS_KEY], group[layout.SEQ_KEY]
    for task in plan.tasks:
        lo, hi = task.slot_start, task.slot_start + len(task.ids)
        ids_arr[lo:hi] = np.array(task.ids, dtype=str)
        seq_arr[lo:hi] = np.array(task.seq, dtype=np.int64)


def connect_ray() -> bool:
    """Join the Ray cluster this runs in, else start a local instance; True when started."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        raise ConfigError(
            f"RAY_ADDRESS={address} is a dashboard address: submit the job with "
            f"`actcache submit JOB.yaml --address {address}` instead"
        )
    # Outside a cluster this starts a local instance; the dashboard is not needed for it.
    # The actors' output (model loading bars, warnings) stays in Ray's session logs.
    ray.init(address=address or None, include_dashboard=False, log_to_driver=False)
    return True


def estimate_bytes(manifest: Manifest, plan: Plan, adapter: Any) -> int:
    width = manifest.model.hidden_size * (4 if manifest.dtype == "float32" else 2)
    per_row = width * len(manifest.layers)
    pooled = sum(1 for p in manifest.poolings if p != "tokens")
    total = plan.pending_rows * per_row * pooled
    if "tokens" in manifest.poolings:
        texts = [t for task in plan.tasks for t in task.inputs]
        tokens = sum(adapter.encode(texts).lengths) if texts else 0
        total += tokens * per_row
    return total


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
    """Run ``job``: cache every new or edited input row into its store, then record the run."""
    started = time.perf_counter()
    check_access(job.store, storage_options)
    info, _config, adapter = describe_model(job)
    manifest = build_manifest(job, info, adapter.max_length, adapter.side,
                              getattr(adapter, "prefix", 0))
    inputs = load_inputs(job.inputs, job.input_column, job.id_column, storage_options,
                         job.modality, pair_column=job.text_pair_column)
    if job.store.startswith("memory://") and not inline:
        raise ConfigError(
            "a memory:// store lives inside one process and Ray workers cannot reach it; "
            "use a local path or s3:// for `store`"
        )
    manifest = _with_rendering(manifest, adapter, inputs.texts)
    run_id = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    if dry_run:
        _, plan = _prepare(job, manifest, inputs, overwrite, storage_options, run_id)
        check = _check_here(worker_manifest(manifest, plan)) if plan.tasks else None
        _print_plan(echo, job, manifest, plan, estimate_bytes(manifest, plan, adapter), check)
        return RunSummary(job.store, run_id, 0, 0, 0, 0, time.perf_counter() - started, plan)
    _check_store(job, manifest, overwrite, storage_options)  # refuse before touching it
    # The store is read again and planned under the lease: a run that waited for another
    # to finish plans against what that run wrote, never against what it saw before.
    try:
        with Lease(job.store, run_id, storage_options) as lease:
            if repair:
                from actcache.verify import repair as uncommit_corrupt

                uncommit_corrupt(job.store, set(inputs.ids), storage_options, echo)
            fresh, plan = _prepare(job, manifest, inputs, overwrite, storage_options, run_id)
            for_workers = worker_manifest(manifest, plan)
            with _workers(job, manifest, for_workers, plan, storage_options, inline,
                          worker_cls) as pool:
                # Every worker checks itself before anything is written: a refused model
                # leaves the store as it was.
                if pool is not None:
                    manifest = manifest.model_copy(update={"self_check": pool.check()})
                return _execute(job, manifest, plan, fresh, storage_options, pool, echo,
                                started, lease)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise StorageFullError(
            f"store {job.store}: no space left on its device ({e.strerror}); every unit "
            "committed so far is kept: free space (or move the store) and run the job again "
            "to finish it"
        ) from e


def _check_store(
    job: JobConfig, manifest: Manifest, overwrite: bool, storage_options: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The existing store's manifest (None when there is none); refuses an incompatible one."""
    occupied, existing = _store_exists(job.store, storage_options)
    if occupied and not overwrite:
        if existing is None:
            raise StoreMismatchError(
                f"{job.store!r} exists and is not an actcache store; use another `store`, "
                "or --overwrite to replace it"
            )
        check_compatible(existing, manifest)
    return existing


def _prepare(
    job: JobConfig, manifest: Manifest, inputs: Any, overwrite: bool,
    storage_options: dict[str, Any] | None, run_id: str,
) -> tuple[bool, Plan]:
    """(whether the store is made anew, the plan) after checking the store against the job."""
    existing = _check_store(job, manifest, overwrite, storage_options)
    fresh = overwrite or existing is None
    stored = empty_stored() if fresh else stored_rows(job.store, storage_options)
    return fresh, make_plan(inputs, stored, job.rows_per_unit, run_id)


def plan_workers(job: JobConfig, manifest: Manifest, inline: bool) -> tuple[int, dict[str, Any]]:
    """Check the job against the GPUs before anything is written: (actors, Ray options).

    In process, one worker. The weights to load are estimated from the checkpoint's
    headers (only the blocks the deepest layer needs), against one GPU's memory.
    """
    from actcache.pool import (
        check_fits,
        check_quantize,
        cluster_gpu_memory,
        gpu_memory_bytes,
        worker_options,
    )
    from actcache.workers.placement import weight_bytes

    if inline:
        import torch

        resources = {"CPU": 1.0, "GPU": float(torch.cuda.device_count())}
    else:
        import ray

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


def worker_manifest(manifest: Manifest, plan: Plan) -> dict[str, Any]:
    """The manifest as workers get it: with the self-check's inputs (a few of this run's)."""
    from actcache.workers.selfcheck import CHECK_INPUTS, pick_inputs

    inputs = pick_inputs([x for task in plan.tasks for x in task.inputs])
    return {**manifest.model_dump(mode="json"), CHECK_INPUTS: inputs}


def _with_rendering(manifest: Manifest, adapter: Any, texts: list[Any]) -> Manifest:
    """Note what the model sees of the first row when a template reshapes the text."""
    rendered = adapter.render(texts[0]) if texts else None
    return manifest.model_copy(update={"rendered_example": rendered})


def _check_here(for_workers: dict[str, Any]) -> dict[str, Any]:
    """The workers' self-check, run in this process (``--dry-run``)."""
    from actcache.workers.actor import CachingWorker

    return CachingWorker(None, for_workers).check()


def _print_plan(echo: Any, job: JobConfig, manifest: Manifest, plan: Plan, nbytes: int,
                check: dict[str, Any] | None) -> None:
    echo(f"store:    {job.store}")
    echo(f"model:    {manifest.model.name} ({manifest.model.model_type}, "
         f"{manifest.model.num_hidden_layers} blocks, hidden {manifest.model.hidden_size})")
    echo(f"layers:   {', '.join(map(str, manifest.layers))}")
    echo(f"pooling:  {', '.join(manifest.poolings)}  dtype: {manifest.dtype}  "
         f"max_length: {manifest.max_length}")
    echo(f"rows:     {plan.rows} in input; {plan.added} new, {plan.updated} edited, "
         f"{plan.skipped} unchanged, {plan.missing} missing from input")
    echo(f"units:    {len(plan.tasks)} to compute ({job.rows_per_unit} rows each)")
    echo(f"bytes:    {nbytes / 1e6:.1f} MB to write (uncompressed)")
    if check is not None:
        echo(f"check:    padded batch = each input alone (max rel. error {check['max_rel_error']:.2g}"
             f" over {check['examples']} inputs) with {check['padding_side']} padding, "
             f"{check['positions']} positions")


def _execute(
    job: JobConfig,
    manifest: Manifest,
    plan: Plan,
    fresh: bool,
    storage_options: dict[str, Any] | None,
    pool: Any,
    echo: Any,
    started: float,
    lease: Lease | None = None,
) -> RunSummary:
    if fresh:
        _clear(job.store, storage_options)
        create_store(open_group(job.store, "a", storage_options), manifest)
    group = open_group(job.store, "r+", storage_options)
    stored = dict(group.attrs[layout.MANIFEST_ATTR])
    if manifest.self_check is not None:
        stored = {**stored, "self_check": manifest.self_check}
        group.attrs.update({layout.MANIFEST_ATTR: stored})
    grow(group, stored, plan.n_units)
    record = RunRecord(
        run_id=plan.tasks[0].run_id if plan.tasks else "noop",
        started=_now(),
        actcache_version=__version__,
        host=socket.gethostname(),
    )
    _record(group, record)
    receipts: list[UnitReceipt] = []
    redone: list[int] = []
    try:
        _write_plan(group, plan)
        _apply_metadata_updates(group, plan)
        if pool is not None:
            _run_units(job, plan, pool, lease, receipts, redone)
    except KeyboardInterrupt:
        with sigint_deferred():
            # The actors are stopped by now; a unit may have committed after its receipt
            # stopped being awaited, so the store's markers are the count.
            receipts = _committed_by(group, record.run_id)
            mark_valid(group)
            _record(group, record.model_copy(update={
                "ended": _now(), "status": "interrupted", **_committed(plan, receipts),
                "units_redone": tuple(redone)}))
        rows = sum(r.rows for r in receipts)
        raise RunInterrupted(f"interrupted; {rows} rows committed, rerun to finish") from None
    except BaseException as e:
        with contextlib.suppress(Exception):  # the run's own error is the one to report
            mark_valid(group)
        _record_failure(group, record.model_copy(update={
            "ended": _now(), "status": "failed", **_committed(plan, receipts),
            "errors": (f"{type(e).__name__}: {e}",), "units_redone": tuple(redone),
        }))
        raise
    mark_valid(group)
    truncated = _finish(group, job, storage_options)
    _record(group, record.model_copy(update={
        "ended": _now(), "status": "succeeded", "units": len(receipts),
        "rows_added": plan.added, "rows_updated": plan.updated, "rows_skipped": plan.skipped,
        "rows_missing": plan.missing, "rows_metadata_updated": len(plan.metadata_updates),
        "units_redone": tuple(redone),
    }))
    summary = RunSummary(
        job.store, record.run_id, sum(r.rows for r in receipts), len(receipts),
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


@contextlib.contextmanager
def _workers(job: JobConfig, manifest: Manifest, for_workers: dict[str, Any], plan: Plan,
             storage_options: dict[str, Any] | None, inline: bool,
             worker_cls: type | None) -> Iterator[Any]:
    """The pool that computes the plan's units (None when there is nothing to compute).

    A local Ray instance started here is stopped here too, whatever ends the run: a
    Python caller who wants one Ray instance across runs starts it first (``ray.init()``).
    Ray's messages go to the run's log file, not the terminal.
    """
    from actcache.pool import ActorPool, InlinePool
    from actcache.workers.actor import CachingWorker

    cls = worker_cls or CachingWorker
    if not plan.tasks:
        yield None
        return
    if inline:
        plan_workers(job, manifest, inline=True)
        yield InlinePool(job.store, for_workers, storage_options, cls)
        return
    import ray

    log = run_log(plan.tasks[0].run_id)
    with ray_output_to(log):
        started_ray, pool = False, None
        try:
            started_ray = connect_ray()
            note(log, f"Ray session logs (the actors' output): {_session_dir()}")
            count, options = plan_workers(job, manifest, inline=False)
            pool = ActorPool(job.store, for_workers, storage_options, count, options, cls)
            yield pool
        finally:
            with sigint_deferred():
                if pool is not None:
                    pool.shutdown()
                if started_ray:
                    ray.shutdown()


def _session_dir() -> str:
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    return str(node.get_session_dir_path()) if node is not None else "(unknown)"


def _committed_by(group: Any, run_id: str) -> list[UnitReceipt]:
    from actcache.store import read_units

    return [r for r in read_units(group) if r.run_id == run_id]


def _committed(plan: Plan, receipts: list[UnitReceipt]) -> dict[str, int]:
    """The run record's counts for the units committed so far."""
    done = {r.unit for r in receipts}
    ids = [i for task in plan.tasks if task.unit in done for i in task.ids]
    updated = sum(1 for i in ids if i in plan.updated_ids)
    return {
        "units": len(receipts), "rows_added": len(ids) - updated, "rows_updated": updated,
        "rows_skipped": plan.skipped, "rows_missing": plan.missing,
        "rows_metadata_updated": len(plan.metadata_updates),
    }


def _apply_metadata_updates(group: Any, plan: Plan) -> None:
    if not plan.metadata_updates:
        return
    import numpy as np

    slots = np.array(sorted(plan.metadata_updates), dtype=np.int64)
    values = np.array([plan.metadata_updates[int(s)] for s in slots], dtype=str)
    group[layout.META_KEY].oindex[slots] = values


def _finish(group: Any, job: JobConfig, storage_options: dict[str, Any] | None) -> int:
    """Count truncated inputs over the complete rows and note them in the manifest."""
    from actcache.store import Store

    store = Store(job.store, storage_options)
    truncated = int(store.truncated().sum()) if store.n_rows else 0
    manifest = dict(group.attrs[layout.MANIFEST_ATTR])
    group.attrs.update({layout.MANIFEST_ATTR: {**manifest, "truncated": truncated}})
    return truncated


def _record_failure(group: Any, record: RunRecord) -> None:
    """Record a failed run where the store still takes writes (not on a full disk)."""
    try:
        _record(group, record)
    except OSError:
        pass


def _record(group: Any, record: RunRecord) -> None:
    runs = [r for r in group.attrs.get(layout.RUNS_ATTR, []) if r.get("run_id") != record.run_id]
    runs.append(record.model_dump(mode="json"))
    group.attrs.update({layout.RUNS_ATTR: runs})


__all__ = ["RunSummary", "load_job", "parse_job", "run_job"]
