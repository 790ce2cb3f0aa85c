"""Run records: each run's start, end, status and counts, kept in the store's history."""

from __future__ import annotations

import datetime as dt
import socket
import uuid
from typing import Any

from actcache import __version__
from actcache.cache.plan import Plan
from actcache.schemas import store as layout
from actcache.schemas.store import RunRecord, UnitReceipt


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def new_run_id() -> str:
    """Sortable by start time; the suffix keeps two runs started in one second apart."""
    return f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


def started_record(plan: Plan) -> RunRecord:
    return RunRecord(
        run_id=plan.tasks[0].run_id if plan.tasks else "noop",
        started=now(),
        actcache_version=__version__,
        host=socket.gethostname(),
    )


def record(group: Any, run: RunRecord) -> None:
    """Add ``run`` to the store's history, replacing an earlier record of the same run."""
    runs = [r for r in group.attrs.get(layout.RUNS_ATTR, []) if r.get("run_id") != run.run_id]
    runs.append(run.model_dump(mode="json"))
    group.attrs.update({layout.RUNS_ATTR: runs})


def record_failure(group: Any, run: RunRecord) -> None:
    """Record a failed run where the store still takes writes (not on a full disk)."""
    try:
        record(group, run)
    except OSError:
        pass


def committed_by(group: Any, run_id: str) -> list[UnitReceipt]:
    """Receipts of the units ``run_id`` committed, read from the store's markers."""
    from actcache.store import read_units

    return [r for r in read_units(group) if r.run_id == run_id]


def committed(plan: Plan, receipts: list[UnitReceipt]) -> dict[str, int]:
    """The run record's counts for the units committed so far."""
    done = {r.unit for r in receipts}
    ids = [i for task in plan.tasks if task.unit in done for i in task.ids]
    updated = sum(1 for i in ids if i in plan.updated_ids)
    return {
        "units": len(receipts), "rows_added": len(ids) - updated, "rows_updated": updated,
        "rows_skipped": plan.skipped, "rows_missing": plan.missing,
        "rows_metadata_updated": len(plan.metadata_updates),
    }


def succeeded(plan: Plan, units: int) -> dict[str, Any]:
    """The run record's counts for a run that computed all of ``plan``."""
    return {
        "ended": now(), "status": "succeeded", "units": units,
        "rows_added": plan.added, "rows_updated": plan.updated, "rows_skipped": plan.skipped,
        "rows_missing": plan.missing, "rows_metadata_updated": len(plan.metadata_updates),
    }
