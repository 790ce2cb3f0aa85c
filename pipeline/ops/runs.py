"""``actcache runs``: a store's run history as a table.

The driver records a run as ``running`` when it starts and ``succeeded``/``failed`` when
it ends. A driver killed outright (SIGKILL, a lost node) never writes its end, so its
record stays ``running``; such a record is shown as ``crashed`` once the store's write
lease no longer belongs to a live holder of that run (no lease, another run's lease, or
a lease whose holder is provably dead or stale — the same rule the lease uses to take
over).
"""

from __future__ import annotations

from typing import Any

from actcache.cache.lease import Lease
from actcache.store import open_store

COLUMNS = ("run_id", "status", "started", "ended", "added", "updated", "meta", "skipped",
           "missing", "errors")
"""``meta``: rows whose metadata alone changed, rewritten without recomputing."""
ERROR_WIDTH = 80


def live_run(url: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """The run id holding the store's lease, when its holder is alive."""
    lease = Lease(url, "runs", storage_options)
    holder = lease.current()
    if holder is None or lease._holder_dead(holder):
        return None
    return str(holder.get("run_id"))


def shown_status(record: dict[str, Any], live: str | None) -> str:
    status = str(record.get("status", "running"))
    if status == "running" and not record.get("ended") and record.get("run_id") != live:
        return "crashed"
    return status


def _time(value: str | None) -> str:
    if not value:
        return "-"
    return value.replace("+00:00", "Z")


def history(url: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The store's runs, oldest first, with the status as shown (``crashed`` applied)."""
    store = open_store(url, storage_options)
    live = live_run(url, storage_options)
    rows = []
    for record in store.runs:
        errors = list(record.get("errors") or [])
        rows.append({
            "run_id": record.get("run_id", "?"),
            "status": shown_status(record, live),
            "started": _time(record.get("started")),
            "ended": _time(record.get("ended")),
            "added": int(record.get("rows_added", 0)),
            "updated": int(record.get("rows_updated", 0)),
            "meta": int(record.get("rows_metadata_updated", 0)),
            "skipped": int(record.get("rows_skipped", 0)),
            "missing": int(record.get("rows_missing", 0)),
            "errors": errors,
        })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Aligned plain text, one run per line (no truncation but of long error lines)."""
    cells = [list(COLUMNS)]
    for row in rows:
        errors = row["errors"]
        first = errors[0] if errors else "-"
        if len(first) > ERROR_WIDTH:
            first = first[: ERROR_WIDTH - 3] + "..."
        if len(errors) > 1:
            first += f" (+{len(errors) - 1} more)"
        cells.append([str(row[c]) for c in COLUMNS[:-1]] + [first])
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS) - 1)]
    numeric = {"added", "updated", "meta", "skipped", "missing"}
    lines = []
    for r in cells:
        parts = [
            r[i].rjust(widths[i]) if COLUMNS[i] in numeric else r[i].ljust(widths[i])
            for i in range(len(COLUMNS) - 1)
        ]
        lines.append("  ".join([*parts, r[-1]]).rstrip())
    return "\n".join(lines)
