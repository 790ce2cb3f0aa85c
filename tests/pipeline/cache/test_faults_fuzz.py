"""Bad input, fuzzed: job YAML and input files (jsonl, csv, parquet; odd types, empty files,
huge lines, non-UTF-8 bytes, duplicate ids, NaN labels) end in success or in one `error:`
line with exit 2 — never a traceback, never a changed existing store.

Examples run in this process through the CLI's `main` (one subprocess per example would
cost seconds each); units run inline, the same worker code Ray actors run.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import actcache.cache.driver
from actcache import open_store
from actcache.cache.driver import parse_job, run_job
from actcache.cli import main
from tests.pipeline.cache.test_bad_input import tree_digest

pytestmark = pytest.mark.slow

FUZZ = settings(max_examples=12, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, tiny_bert: str) -> tuple[Path, dict]:
    """A complete store of 6 rows and the job that wrote it."""
    folder = tmp_path_factory.mktemp("pristine")
    (folder / "in.jsonl").write_text("".join(
        json.dumps({"id": f"k{i}", "text": f"known sentence {i}", "label": i % 2}) + "\n"
        for i in range(6)))
    job = {"model": tiny_bert, "inputs": "in.jsonl", "store": "s.zarr", "id_column": "id",
           "layers": [0, 1], "pooling": ["mean"], "rows_per_unit": 4}
    run_job(parse_job({**job, "inputs": str(folder / "in.jsonl"),
                       "store": str(folder / "s.zarr")}), inline=True, echo=lambda *_: None)
    return folder, job


@pytest.fixture(autouse=True)
def inline_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(actcache.cache.driver, "run_job", functools.partial(run_job, inline=True))
    monkeypatch.setenv("ACTCACHE_LOG_DIR", str(tmp_path / "logs"))


def run_case(pristine: tuple[Path, dict], job: Any, inputs: bytes | None, name: str,
             capsys: pytest.CaptureFixture[str]) -> None:
    """Run `actcache cache` on a copy of the pristine store; check the outcome's contract."""
    source, _ = pristine
    folder = Path(tempfile.mkdtemp(dir=source.parent))
    try:
        shutil.copytree(source / "s.zarr", folder / "s.zarr")
        shutil.copy(source / "in.jsonl", folder / "in.jsonl")
        if inputs is not None:
            (folder / name).write_bytes(inputs)
        path = folder / "job.yaml"
        path.write_bytes(job if isinstance(job, bytes) else yaml.safe_dump(job).encode())
        before = tree_digest(folder / "s.zarr")
        capsys.readouterr()
        code = main(["cache", str(path)])
        err = [line for line in capsys.readouterr().err.splitlines()
               if line.strip() and not line.startswith("caching:")]
        assert code in (0, 2), err  # 1 would be a fault: a traceback in a log
        if code == 2:
            assert len(err) == 1 and err[0].startswith("error: "), err
            assert tree_digest(folder / "s.zarr") == before, err
        else:
            store = open_store(str(folder / "s.zarr"))
            assert store.complete and len(set(store.ids)) == len(store.ids)
            assert set(store.ids) >= {f"k{i}" for i in range(6)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
TEXTS = st.one_of(st.text(min_size=0, max_size=40), st.text(min_size=3000, max_size=6000),
                  st.sampled_from(["known sentence 1", "a fine sentence", "   "]), ODD_VALUES)
IDS = st.one_of(st.sampled_from(["k1", "new1", "new2", "1", 1, 1.0, None]),
                st.floats(allow_nan=True), st.text(max_size=8))
ROWS = st.lists(st.fixed_dictionaries({"id": IDS, "text": TEXTS}, optional={"label": ODD_VALUES}),
                min_size=0, max_size=6)


def encode_rows(rows: list[dict[str, Any]], fmt: str) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps(r, default=str) + "\n" for r in rows).encode()
    frame = pd.DataFrame.from_records(rows)
    if fmt == "csv":
        return frame.to_csv(index=False).encode()
    for column in frame.columns:  # parquet wants one type per column: odd ones become text
        values = frame[column].tolist()
        if len({type(v) for v in values if v is not None}) > 1 or any(
            isinstance(v, (list, dict)) or (isinstance(v, int) and abs(v) >= 2**63) for v in values
        ):
            frame[column] = [None if v is None else str(v) for v in values]
    import io

    out = io.BytesIO()
    frame.to_parquet(out)
    return out.getvalue()


@FUZZ
@given(rows=ROWS, fmt=st.sampled_from(["jsonl", "csv", "parquet"]))
def test_fuzzed_input_files(pristine, capsys, rows, fmt) -> None:  # type: ignore[no-untyped-def]
    _, job = pristine
    name = f"fuzz.{fmt}"
    run_case(pristine, {**job, "inputs": name}, encode_rows(rows, fmt), name, capsys)


@FUZZ
@given(raw=st.one_of(st.binary(max_size=200), st.just(b""), st.just(b"\xff\xfe\x00garbage\n"),
                     st.just(b'{"id": "x", "text": "caf\xe9"}\n'),
                     st.just(b'{"id": "x", "text": "a"}\n' * 2),
                     st.just(b'{"id": "x", "text": "' + b"w " * 200_000 + b'"}\n')),
       fmt=st.sampled_from(["jsonl", "csv", "parquet"]))
def test_fuzzed_raw_bytes(pristine, capsys, raw, fmt) -> None:  # type: ignore[no-untyped-def]
    _, job = pristine
    name = f"raw.{fmt}"
    run_case(pristine, {**job, "inputs": name}, raw, name, capsys)


FIELDS = ["model", "inputs", "store", "id_column", "text_column", "layers", "pooling", "dtype",
          "model_dtype", "max_length", "rows_per_unit", "batch_size", "workers",
          "truncation_side", "revision", "unknown_field"]


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(FIELDS), ODD_VALUES, max_size=3),
       dropped=st.sets(st.sampled_from(FIELDS[:5]), max_size=1),
       raw=st.one_of(st.none(), st.binary(max_size=60), st.text(max_size=60).map(str.encode)))
def test_fuzzed_job_yaml(pristine, capsys, changes, dropped, raw) -> None:  # type: ignore[no-untyped-def]
    _, job = pristine
    spec = {k: v for k, v in {**job, **changes}.items() if k not in dropped}
    spec = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in spec.items()}
    run_case(pristine, raw if raw is not None else spec, None, "", capsys)
