"""The caching driver: load a job, check or create its store, plan, run the pool, record."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import time
import uuid
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
from actcache.schemas.errors import ConfigError, RunInterrupted, StoreMismatchError
from actcache.schemas.job import JobConfig
from actcache.schemas.store import Manifest, ModelInfo, RunRecord, UnitReceipt
from actcache.workers.model import (
    hidden_size,
    load_config,
    num_layers,
    resolve_layers,
    weights_fingerprint,
)
from actcache.workers.storage import open_group


def load_job(path: str | os.PathLike[str], **overrides: Any) -> JobConfig:
    """Read and validate a job YAML; relative paths resolve against its folder."""
    file = Path(path)
    try:
        raw = yaml.safe_load(file.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"job file {str(file)!r} does not exist") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"job file {str(file)!r} is not valid YAML: {e}") from e
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
    from actcache.workers.adapters import TextAdapter

    config = load_config(job.model, job.revision, job.trust_remote_code)
    adapter = TextAdapter(
        job.model,
        revision=job.revision,
        trust_remote_code=job.trust_remote_code,
        max_length=job.max_length,
        truncation_side=job.truncation_side,
        model_config=config,
    )
    weights, commit = weights_fingerprint(job.model, job.revision)
    info = ModelInfo(
        name=job.model,
        revision=commit or job.revision,
        weights_hash=weights,
        model_type=str(getattr(config, "model_type", "unknown")),
        num_hidden_layers=num_layers(config),
        hidden_size=hidden_size(config),
        tokenizer=adapter.description,
        padding_side=adapter.padding_side,
    )
    return info, config, adapter


def build_manifest(job: JobConfig, info: ModelInfo, max_length: int) -> Manifest:
    layers = resolve_layers(job.layers, info.num_hidden_layers)
    return Manifest(
        actcache_version=__version__,
        model=info,
        layers=layers,
        poolings=tuple(p.value for p in job.pooling),
        dtype=job.dtype.value,
        model_dtype=job.model_dtype.value,
        max_length=max_length,
        truncation_side=job.truncation_side,
        text_column=job.text_column,
        id_column=job.id_column,
        rows_per_unit=job.rows_per_unit,
        chunk_rows=chunk_rows_for(job.rows_per_unit),
        codec=CODEC,
        job=job.model_dump(mode="json"),
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
            e.rstrip("/").rsplit("/", 1)[-1] != "lease" for e in fs.ls(root, detail=False)
        )
        return occupied, None
    group = open_group(url, "r", storage_options)
    return True, dict(group.attrs.get(layout.MANIFEST_ATTR) or {}) or None


def _clear(url: str, storage_options: dict[str, Any] | None) -> None:
    """Remove everything at the URL but the lease we hold."""
    from actcache.workers.storage import filesystem

    fs, root = filesystem(url, storage_options)
    if not fs.exists(root):
        return
    for entry in fs.ls(root, detail=False):
        if entry.rstrip("/").rsplit("/", 1)[-1] != "lease":
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
) -> RunSummary:
    """Run ``job``: cache every new or edited input row into its store, then record the run."""
    started = time.perf_counter()
    info, _config, adapter = describe_model(job)
    manifest = build_manifest(job, info, adapter.max_length)
    inputs = load_inputs(job.inputs, job.text_column, job.id_column, storage_options)
    if job.store.startswith("memory://") and not inline:
        raise ConfigError(
            "a memory:// store lives inside one process and Ray workers cannot reach it; "
            "use a local path or s3:// for `store`"
        )
    occupied, existing = _store_exists(job.store, storage_options)
    if occupied and not overwrite:
        if existing is None:
            raise StoreMismatchError(
                f"{job.store!r} exists and is not an actcache store; use another `store`, "
                "or --overwrite to replace it"
            )
        check_compatible(existing, manifest)
    fresh = overwrite or existing is None
    stored = empty_stored() if fresh else stored_rows(job.store, storage_options)
    run_id = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    plan = make_plan(inputs, stored, job.rows_per_unit, run_id)
    if dry_run:
        _print_plan(echo, job, manifest, plan, estimate_bytes(manifest, plan, adapter))
        return RunSummary(job.store, run_id, 0, 0, 0, 0, time.perf_counter() - started, plan)
    with Lease(job.store, run_id, storage_options):
        return _execute(job, manifest, plan, fresh, storage_options, inline, worker_cls, echo, started)


def _print_plan(echo: Any, job: JobConfig, manifest: Manifest, plan: Plan, nbytes: int) -> None:
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


def _execute(
    job: JobConfig,
    manifest: Manifest,
    plan: Plan,
    fresh: bool,
    storage_options: dict[str, Any] | None,
    inline: bool,
    worker_cls: type | None,
    echo: Any,
    started: float,
) -> RunSummary:
    if fresh:
        _clear(job.store, storage_options)
        create_store(open_group(job.store, "a", storage_options), manifest)
    group = open_group(job.store, "r+", storage_options)
    current = grow(group, dict(group.attrs[layout.MANIFEST_ATTR]), plan.n_units)
    record = RunRecord(
        run_id=plan.tasks[0].run_id if plan.tasks else "noop",
        started=_now(),
        actcache_version=__version__,
        host=socket.gethostname(),
    )
    _record(group, record)
    receipts: list[UnitReceipt] = []
    try:
        _write_plan(group, plan)
        _apply_metadata_updates(group, plan)
        if plan.tasks:
            _run_units(job, current, plan, storage_options, inline, worker_cls, receipts)
    except KeyboardInterrupt:
        with sigint_deferred():
            # The actors are stopped by now; a unit may have committed after its receipt
            # stopped being awaited, so the store's markers are the count.
            receipts = _committed_by(group, record.run_id)
            mark_valid(group)
            _record(group, record.model_copy(update={
                "ended": _now(), "status": "interrupted", **_committed(plan, receipts)}))
        rows = sum(r.rows for r in receipts)
        raise RunInterrupted(f"interrupted; {rows} rows committed, rerun to finish") from None
    except BaseException as e:
        with contextlib.suppress(Exception):  # the run's own error is the one to report
            mark_valid(group)
        _record(group, record.model_copy(update={
            "ended": _now(), "status": "failed", **_committed(plan, receipts),
            "errors": (f"{type(e).__name__}: {e}",),
        }))
        raise
    mark_valid(group)
    truncated = _finish(group, job, storage_options)
    _record(group, record.model_copy(update={
        "ended": _now(), "status": "succeeded", "units": len(receipts),
        "rows_added": plan.added, "rows_updated": plan.updated, "rows_skipped": plan.skipped,
        "rows_missing": plan.missing, "rows_metadata_updated": len(plan.metadata_updates),
    }))
    summary = RunSummary(
        job.store, record.run_id, sum(r.rows for r in receipts), len(receipts),
        sum(r.bytes for r in receipts), truncated, time.perf_counter() - started, plan,
    )
    echo(summary.line())
    return summary


def _run_units(job: JobConfig, manifest: dict[str, Any], plan: Plan,
               storage_options: dict[str, Any] | None, inline: bool, worker_cls: type | None,
               receipts: list[UnitReceipt]) -> None:
    """Compute the plan's units, appending each receipt as its unit commits.

    A local Ray instance started here is stopped here too, whatever ends the run: a
    Python caller who wants one Ray instance across runs starts it first (``ray.init()``).
    Ray's messages go to the run's log file, not the terminal.
    """
    from actcache.pool import ActorPool, InlinePool, worker_options
    from actcache.workers.actor import CachingWorker

    cls = worker_cls or CachingWorker
    progress = Progress(plan.pending_rows, len(plan.tasks))

    def on_receipt(receipt: UnitReceipt) -> None:
        receipts.append(receipt)
        progress.update(receipt)

    if inline:
        try:
            InlinePool(job.store, manifest, storage_options, cls).run(
                plan.tasks, on_receipt, progress.computed)
        finally:
            progress.close()
        return
    import ray

    log = run_log(plan.tasks[0].run_id)
    with ray_output_to(log):
        started_ray, pool = False, None
        try:
            started_ray = connect_ray()
            note(log, f"Ray session logs (the actors' output): {_session_dir()}")
            count, options = worker_options(job.workers, job.cpus_per_worker,
                                            ray.cluster_resources())
            pool = ActorPool(job.store, manifest, storage_options, count, options, cls)
            pool.run(plan.tasks, on_receipt, progress.computed)
        finally:
            progress.close()
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


def _record(group: Any, record: RunRecord) -> None:
    runs = [r for r in group.attrs.get(layout.RUNS_ATTR, []) if r.get("run_id") != record.run_id]
    runs.append(record.model_dump(mode="json"))
    group.attrs.update({layout.RUNS_ATTR: runs})


__all__ = ["RunSummary", "load_job", "parse_job", "run_job"]
