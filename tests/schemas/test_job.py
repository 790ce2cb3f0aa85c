"""The job schema: defaults, boundary values, and the errors a bad field gets."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from actcache.schemas.job import JobConfig, Pooling

BASE = {"model": "m", "inputs": "in.jsonl", "store": "s.zarr"}


def test_defaults_live_in_the_schema():
    job = JobConfig(**BASE)
    assert job.layers == "all" and job.pooling == (Pooling.MEAN,)
    assert (job.dtype.value, job.model_dtype.value, job.batch_size, job.rows_per_unit) == (
        "float16", "auto", 32, 1024)
    assert job.trust_remote_code is False and job.id_column is None
    assert job.last_layer == "hidden_states" and job.final_norm is False


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("layers", [0, -1], (0, -1)),
        ("layers", 3, (3,)),
        ("pooling", "tokens", (Pooling.TOKENS,)),
        ("pooling", ["mean", "last", "first", "max", "tokens"], tuple(Pooling)),
        ("batch_size", 1, 1),
        ("rows_per_unit", 1, 1),
        ("max_length", 1, 1),
        ("workers", 1, 1),
        ("last_layer", "block", "block"),
    ],
    ids=["layers-list", "layers-int", "pooling-str", "pooling-all", "batch-1", "unit-1",
         "maxlen-1", "workers-1", "last-block"],
)
def test_valid_values(field, value, expected):
    assert getattr(JobConfig(**BASE, **{field: value}), field) == expected


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pooling": ["median"]}, "unknown pooling 'median'"),
        ({"pooling": []}, "at least one pooling"),
        ({"pooling": ["mean", "mean"]}, "names a pooling twice"),
        ({"layers": "some"}, "'all' or a list of ints"),
        ({"layers": [1, 1]}, "names a layer twice"),
        ({"layers": []}, "is empty"),
        ({"batch_size": 0}, "greater than or equal to 1"),
        ({"rows_per_unit": 0}, "greater than or equal to 1"),
        ({"dtype": "int8"}, "float16"),
        ({"truncation_side": "middle"}, "'right' or 'left'"),
        ({"modle": "x"}, "Extra inputs are not permitted"),
        ({"last_layer": "residual"}, "'hidden_states' or 'block'"),
        ({"last_layer": "block", "final_norm": True}, "choose one"),
    ],
    ids=lambda v: str(v)[:24],
)
def test_invalid_values(change, message):
    with pytest.raises(ValidationError, match=message):
        JobConfig(**{**BASE, **change})


def test_config_is_frozen():
    job = JobConfig(**BASE)
    with pytest.raises(ValidationError):
        job.batch_size = 4  # type: ignore[misc]
