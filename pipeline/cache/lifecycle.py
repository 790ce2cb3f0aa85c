"""The store's lifecycle on its filesystem, as a caching run sees it.

Before a run: is there a store (or something else) at the URL, does it take this job,
which rows does it already hold. During: made anew or grown to the plan's units, each
planned row's id and order noted, metadata-only edits applied. After: the truncation
count noted in the manifest. Reads go through ``Store``'s public surface and plain zarr.
"""

from __future__ import annotations

from typing import Any

from actcache.cache.create import check_compatible, create_store, grow
from actcache.cache.plan import Plan, StoredRows, empty_stored, make_plan
from actcache.schemas import store as layout
from actcache.schemas.errors import StoreMismatchError
from actcache.schemas.job import JobConfig
from actcache.schemas.store import Manifest
from actcache.workers.storage import filesystem, open_group


def store_exists(url: str, storage_options: dict[str, Any] | None) -> tuple[bool, dict[str, Any] | None]:
    """(anything at the URL, the actcache manifest if it is a store)."""
    fs, root = filesystem(url, storage_options)
    if not fs.exists(f"{root}/zarr.json"):
        # Another run's lease alone (it is creating the store) does not make the folder
        # foreign: that run's lease refuses this one with a message naming its holder.
        occupied = fs.exists(root) and any(
            not is_lease(e) for e in fs.ls(root, detail=False)
        )
        return occupied, None
    group = open_group(url, "r", storage_options)
    return True, dict(group.attrs.get(layout.MANIFEST_ATTR) or {}) or None


def is_lease(entry: str) -> bool:
    """The lease folder, or a lease being created (see actcache.cache.lease)."""
    name = entry.rstrip("/").rsplit("/", 1)[-1]
    return name == "lease" or name.startswith(".lease-")


def clear(url: str, storage_options: dict[str, Any] | None) -> None:
    """Remove everything at the URL but the lease we hold."""
    fs, root = filesystem(url, storage_options)
    if not fs.exists(root):
        return
    for entry in fs.ls(root, detail=False):
        if not is_lease(entry):
            fs.rm(entry, recursive=True)


def check_store(
    job: JobConfig, manifest: Manifest, overwrite: bool, storage_options: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The existing store's manifest (None when there is none); refuses an incompatible one."""
    occupied, existing = store_exists(job.store, storage_options)
    if occupied and not overwrite:
        if existing is None:
            raise StoreMismatchError(
                f"{job.store!r} exists and is not an actcache store; use another `store`, "
                "or --overwrite to replace it"
            )
        check_compatible(existing, manifest)
    return existing


def plan_run(
    job: JobConfig, manifest: Manifest, inputs: Any, overwrite: bool,
    storage_options: dict[str, Any] | None, run_id: str,
) -> tuple[bool, Plan]:
    """(whether the store is made anew, the plan) after checking the store against the job."""
    existing = check_store(job, manifest, overwrite, storage_options)
    fresh = overwrite or existing is None
    stored = empty_stored() if fresh else stored_rows(job.store, storage_options)
    return fresh, make_plan(inputs, stored, job.rows_per_unit, run_id)


def stored_rows(url: str, storage_options: dict[str, Any] | None) -> StoredRows:
    """The store's complete rows, and the rows earlier runs planned but did not complete."""
    import numpy as np

    from actcache.store import Store

    store = Store(url, storage_options)
    slots = store.physical_slots()
    complete = {r.unit for r in store.receipts}
    n_units = store.spec.n_units
    # Store order has no reader of its own in Store (only planning needs it): read from
    # the group with zarr, at the complete rows' slots.
    seq = np.asarray(store.group[layout.SEQ_KEY].oindex[slots]) if len(slots) else np.zeros(0)
    return StoredRows(
        ids=list(store.ids),
        seq=seq.astype("int64"),
        hashes=list(store.content_hashes()),
        meta=list(store.raw_metadata()),
        slots=slots,
        complete_units=complete,
        n_units=n_units,
        planned_seq=planned_seq(store.group, complete, n_units, store.rows_per_unit),
    )


def planned_seq(group: Any, complete: set[int], n_units: int, rows_per_unit: int) -> dict[str, int]:
    """Ids and store order that earlier runs planned into units they did not complete."""
    import numpy as np

    open_units = [u for u in range(n_units) if u not in complete]
    if not open_units:
        return {}
    slots = np.concatenate([np.arange(u * rows_per_unit, (u + 1) * rows_per_unit) for u in open_units])
    # One orthogonal read per array: zarr fetches the chunks concurrently (many requests on S3).
    ids = group[layout.IDS_KEY].oindex[slots]
    seq = group[layout.SEQ_KEY].oindex[slots]
    return {str(i): int(q) for i, q in zip(ids, seq, strict=True) if q >= 0 and i}


def start_store(
    url: str, manifest: Manifest, n_units: int, fresh: bool,
    storage_options: dict[str, Any] | None,
) -> tuple[Any, dict[str, Any]]:
    """(the group opened for writing, its manifest as stored) with room for ``n_units``.

    A fresh store is made anew (anything else at the URL but our lease removed); the
    workers' self-check record, when there is one, goes into the stored manifest.
    """
    if fresh:
        clear(url, storage_options)
        create_store(open_group(url, "a", storage_options), manifest)
    group = open_group(url, "r+", storage_options)
    stored = dict(group.attrs[layout.MANIFEST_ATTR])
    if manifest.self_check is not None:
        stored = {**stored, "self_check": manifest.self_check}
        group.attrs.update({layout.MANIFEST_ATTR: stored})
    return group, grow(group, stored, n_units)


def write_plan(group: Any, plan: Plan) -> None:
    """Record each planned row's id and store order before any worker starts.

    Workers write the same values again with their unit; what an interrupted run leaves
    here lets the next run keep those rows in their planned order.
    """
    import numpy as np

    ids_arr, seq_arr = group[layout.IDS_KEY], group[layout.SEQ_KEY]
    for task in plan.tasks:
        lo, hi = task.slot_start, task.slot_start + len(task.ids)
        ids_arr[lo:hi] = np.array(task.ids, dtype=str)
        seq_arr[lo:hi] = np.array(task.seq, dtype=np.int64)


def apply_metadata_updates(group: Any, plan: Plan) -> None:
    """Rows whose metadata alone changed: new metadata, the same stored values."""
    if not plan.metadata_updates:
        return
    import numpy as np

    slots = np.array(sorted(plan.metadata_updates), dtype=np.int64)
    values = np.array([plan.metadata_updates[int(s)] for s in slots], dtype=str)
    group[layout.META_KEY].oindex[slots] = values


def note_truncated(group: Any, url: str, storage_options: dict[str, Any] | None) -> int:
    """Count truncated inputs over the complete rows and note them in the manifest."""
    from actcache.store import Store

    store = Store(url, storage_options)
    truncated = int(store.truncated().sum()) if store.n_rows else 0
    manifest = dict(group.attrs[layout.MANIFEST_ATTR])
    group.attrs.update({layout.MANIFEST_ATTR: {**manifest, "truncated": truncated}})
    return truncated
