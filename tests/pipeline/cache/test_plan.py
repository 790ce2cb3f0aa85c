"""Planning and actor options: pure functions, no Ray, no model."""

from __future__ import annotations

import numpy as np
import pytest

from actcache.cache.inputs import InputRows, content_hash
from actcache.cache.plan import StoredRows, empty_stored, make_plan
from actcache.cache.pool import worker_options
from actcache.schemas.errors import UserError


def rows(ids, texts=None, meta=None) -> InputRows:
    ids = list(ids)
    texts = texts or [f"text {i}" for i in ids]
    meta = meta or ["{}"] * len(ids)
    return InputRows(list(ids), texts, [content_hash(t) for t in texts], meta, [])


def stored(ids, texts=None, meta=None, units=None, n_units=None, rpu=2) -> StoredRows:
    texts = texts or [f"text {i}" for i in ids]
    return StoredRows(
        ids=list(ids), seq=np.arange(len(ids)), hashes=[content_hash(t) for t in texts],
        meta=meta or ["{}"] * len(ids), slots=np.arange(len(ids)),
        complete_units=set(units if units is not None else range((len(ids) + rpu - 1) // rpu)),
        n_units=n_units if n_units is not None else (len(ids) + rpu - 1) // rpu,
    )


@pytest.mark.parametrize(("n", "rpu", "units"), [(1, 1, 1), (5, 1, 5), (5, 2, 3), (4, 4, 1),
                                                 (4, 5, 1)])
def test_fresh_plan_packs_rows_in_input_order(n, rpu, units):
    plan = make_plan(rows(map(str, range(n))), empty_stored(), rpu, "r")
    assert len(plan.tasks) == units == plan.n_units
    assert [i for t in plan.tasks for i in t.ids] == [str(i) for i in range(n)]
    assert [t.slot_start for t in plan.tasks] == [u * rpu for u in range(units)]
    assert [s for t in plan.tasks for s in t.seq] == list(range(n))


def test_grown_input_adds_only_new_rows_in_new_units():
    plan = make_plan(rows(["a", "b", "c", "d", "e"]), stored(["a", "b", "c"]), 2, "r")
    assert (plan.added, plan.updated, plan.skipped) == (2, 0, 3)
    assert [t.unit for t in plan.tasks] == [2]
    assert plan.tasks[0].ids == ("d", "e") and plan.tasks[0].seq == (3, 4)


def test_edited_text_is_recomputed_alone_and_keeps_its_place():
    texts = ["text a", "EDITED", "text c"]
    plan = make_plan(rows(["a", "b", "c"], texts), stored(["a", "b", "c"]), 2, "r")
    assert (plan.added, plan.updated, plan.skipped) == (0, 1, 2)
    assert plan.tasks[0].ids == ("b",) and plan.tasks[0].seq == (1,)
    assert plan.tasks[0].unit == 2  # a new unit: the old row is superseded, not rewritten


def test_metadata_only_change_recomputes_nothing():
    plan = make_plan(rows(["a", "b"], meta=["{}", '{"label": 1}']), stored(["a", "b"]), 2, "r")
    assert plan.tasks == [] and plan.metadata_updates == {1: '{"label": 1}'}


def test_missing_ids_are_counted_and_kept():
    plan = make_plan(rows(["a"]), stored(["a", "b", "c"]), 2, "r")
    assert (plan.missing, plan.skipped, plan.tasks) == (2, 1, [])


def test_incomplete_units_are_redone_first():
    # units 0 and 2 complete, unit 1 (rows c, d) never committed
    prior = stored(["a", "b", "e"], units={0, 2}, n_units=3)
    plan = make_plan(rows(["a", "b", "c", "d", "e", "f"]), prior, 2, "r")
    assert [(t.unit, t.ids) for t in plan.tasks] == [(1, ("c", "d")), (3, ("f",))]


@pytest.mark.parametrize(
    ("workers", "cpw", "resources", "expected"),
    [
        (None, None, {"CPU": 2}, (1, {"num_cpus": 2})),
        (2, None, {"CPU": 2}, (2, {"num_cpus": 1})),
        (3, None, {"CPU": 2}, (3, {"num_cpus": 1})),
        (1, 4, {"CPU": 2}, (1, {"num_cpus": 4})),
        (None, None, {"CPU": 16, "GPU": 4}, (4, {"num_gpus": 1.0, "num_cpus": 1})),
        (1, None, {"CPU": 16, "GPU": 4}, (1, {"num_gpus": 1.0, "num_cpus": 1})),
    ],
    ids=["cpu-default", "cpu-two", "cpu-oversubscribed", "cpu-explicit", "gpu-one-each",
         "gpu-fewer-workers"],
)
def test_worker_options(workers, cpw, resources, expected):
    assert worker_options(workers, cpw, None, resources) == expected


def test_more_workers_than_gpus_is_refused():
    with pytest.raises(UserError, match="set `workers` to at most 2"):
        worker_options(3, None, None, {"CPU": 8, "GPU": 2})


def test_rows_an_interrupted_run_planned_keep_their_order():
    # Run 1 planned a..f into units 0-2 and died with only unit 1 (c, d) complete.
    prior = StoredRows(
        ids=["c", "d"], seq=np.array([2, 3]), hashes=[content_hash(f"text {i}") for i in "cd"],
        meta=["{}", "{}"], slots=np.array([2, 3]), complete_units={1}, n_units=3,
        planned_seq={"a": 0, "b": 1, "e": 4, "f": 5},
    )
    plan = make_plan(rows(["a", "b", "c", "d", "e", "f", "g"]), prior, 2, "r")
    assert [(t.unit, t.ids, t.seq) for t in plan.tasks] == [
        (0, ("a", "b"), (0, 1)), (2, ("e", "f"), (4, 5)), (3, ("g",), (6,))]
