import pytest
from pydantic import ValidationError

from actcache.schemas.probe import Precision, ProbeConfig, ProbeKind, Task, parse_bytes


def test_defaults_match_the_contract():
    cfg = ProbeConfig(label="y")
    assert cfg.strengths == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0])
    assert cfg.probes == (ProbeKind.LOGISTIC,)
    assert cfg.precision == Precision.AUTO
    assert cfg.layers == "all"
    assert cfg.val_fraction == 0.2
    assert cfg.max_memory == 512_000_000
    assert cfg.task == Task.AUTO


@pytest.mark.parametrize(
    ("text", "expected"),
    [("512MB", 512_000_000), ("1GiB", 2**30), ("2 kb", 2000), (1048576, 2**20), ("3", 3),
     ("1.5GB", 1_500_000_000)],
    ids=["MB", "GiB", "spaced-lower", "int", "bare", "fraction"],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_parse_bytes_rejects_unknown_units():
    with pytest.raises(ValueError, match="not a memory size: '5 parsecs'; write e.g. 512MB"):
        parse_bytes("5 parsecs")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"split_column": "split", "test_fraction": 0.3},
         "Cannot specify both `split_column` and `test_fraction`"),
        ({"probes": ["svm"]}, "unknown probe 'svm'; choose from logistic, ridge, mean-diff"),
        ({"probes": ["ridge", "ridge"]}, "`probes` names a probe twice"),
        ({"layers": "some"}, "`layers` must be 'all' or a list of ints, got 'some'"),
        ({"layers": [1, 1]}, "`layers` names a layer twice"),
        ({"strengths": [1.0, 0.0]}, "`strengths` must be a non-empty list of positive C values"),
        ({"max_memory": "10KB"}, "`max_memory` of 10000 bytes is too small; give at least 1MiB"),
        ({"test_fraction": 1.0}, "less than 1"),
        ({"task": "ranking"}, "Input should be 'auto', 'classification' or 'regression'"),
    ],
    ids=["split-and-fraction", "unknown-probe", "probe-twice", "layers-word", "layer-twice",
         "zero-strength", "tiny-memory", "fraction-one", "unknown-task"],
)
def test_invalid_configs(fields, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ProbeConfig(label="y", **fields)


def test_boundaries_are_valid():
    cfg = ProbeConfig(label="y", layers=-1, probes="mean-diff", max_memory="1MiB",
                      split_column="split", strengths=[1e-9])
    assert cfg.layers == (-1,)
    assert cfg.probes == (ProbeKind.MEAN_DIFF,)
    assert cfg.max_memory == 2**20


def test_frozen():
    cfg = ProbeConfig(label="y")
    with pytest.raises(ValidationError):
        cfg.label = "z"  # type: ignore[misc]
