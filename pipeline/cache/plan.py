"""Planning a run: which rows need computing, packed into units with free unit indices."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from actcache.cache.inputs import InputRows
from actcache.schemas.store import UnitTask


@dataclass(frozen=True)
class StoredRows:
    """The complete rows of an existing store, in store order."""

    ids: list[str]
    seq: np.ndarray
    hashes: list[str]
    meta: list[str]
    slots: np.ndarray
    complete_units: set[int]
    n_units: int
    planned_seq: dict[str, int] = field(default_factory=dict)
    """Store order given to ids planned by an earlier run into units it never completed."""


@dataclass
class Plan:
    """What a run will do. ``tasks`` are the units to compute."""

    tasks: list[UnitTask]
    n_units: int
    rows: int
    added: int = 0
    updated: int = 0
    skipped: int = 0
    missing: int = 0
    metadata_updates: dict[int, str] = field(default_factory=dict)
    updated_ids: set[str] = field(default_factory=set)
    """Ids re-cached because their model input changed (the others in tasks are new)."""

    @property
    def pending_rows(self) -> int:
        return sum(len(t.ids) for t in self.tasks)


def make_plan(
    inputs: InputRows, stored: StoredRows, rows_per_unit: int, run_id: str
) -> Plan:
    """Compare the inputs with the store's complete rows and pack what is new or edited."""
    position = {row_id: i for i, row_id in enumerate(stored.ids)}
    known = [int(stored.seq.max())] if len(stored.seq) else []
    known += list(stored.planned_seq.values())
    next_seq = max(known) + 1 if known else 0
    pending: list[tuple[str, int, str, str, str]] = []
    plan = Plan(tasks=[], n_units=stored.n_units, rows=len(inputs))
    for row_id, text, digest, meta in zip(
        inputs.ids, inputs.texts, inputs.hashes, inputs.meta, strict=True
    ):
        at = position.get(row_id)
        if at is None:
            # An id an interrupted run had planned keeps its place, so a crash does not
            # reorder the rows of the units it left incomplete.
            seq = stored.planned_seq.get(row_id)
            if seq is None:
                seq, next_seq = next_seq, next_seq + 1
            pending.append((row_id, seq, digest, meta, text))
            plan.added += 1
        elif stored.hashes[at] != digest:
            # Re-cached alone, superseding the old row; it keeps its place in store order.
            pending.append((row_id, int(stored.seq[at]), digest, meta, text))
            plan.updated += 1
            plan.updated_ids.add(row_id)
        else:
            plan.skipped += 1
            if stored.meta[at] != meta:
                plan.metadata_updates[int(stored.slots[at])] = meta
    plan.missing = len(set(stored.ids) - set(inputs.ids))
    free = _free_units(stored.complete_units, stored.n_units)
    for start in range(0, len(pending), rows_per_unit):
        chunk = pending[start : start + rows_per_unit]
        unit = next(free)
        plan.n_units = max(plan.n_units, unit + 1)
        plan.tasks.append(
            UnitTask(
                unit=unit,
                slot_start=unit * rows_per_unit,
                ids=tuple(c[0] for c in chunk),
                seq=tuple(c[1] for c in chunk),
                hashes=tuple(c[2] for c in chunk),
                meta=tuple(c[3] for c in chunk),
                inputs=tuple(c[4] for c in chunk),
                run_id=run_id,
            )
        )
    return plan


def _free_units(complete: set[int], n_units: int):  # type: ignore[no-untyped-def]
    """Unit indices without a commit marker, ascending, then fresh ones past the end."""
    for unit in range(n_units):
        if unit not in complete:
            yield unit
    unit = n_units
    while True:
        yield unit
        unit += 1


def empty_stored() -> StoredRows:
    return StoredRows(
        ids=[], seq=np.zeros(0, np.int64), hashes=[], meta=[], slots=np.zeros(0, np.int64),
        complete_units=set(), n_units=0,
    )
