"""The start-up self-check: which inputs it takes, and what --dry-run reports of it."""

from __future__ import annotations

import json

import pytest

from actcache.cache.driver import parse_job, run_job
from actcache.workers.selfcheck import pick_inputs, tolerance
from tests.conftest import SENTENCES


@pytest.mark.parametrize(
    ("inputs", "picked"),
    [
        pytest.param(["a", "bb"], ["a", "bb"], id="fewer-than-four"),
        pytest.param(["ccc", "a", "ccc", "bb"], ["a", "bb", "ccc"], id="duplicates-once"),
        pytest.param([x * "x" for x in range(1, 11)], ["x", "xxxx", "xxxxxxx", 10 * "x"],
                     id="spread-shortest-to-longest"),
    ],
)
def test_pick_inputs_spans_the_lengths(inputs, picked):
    assert pick_inputs(inputs) == picked


def test_tolerance_follows_the_least_precise_dtype():
    assert tolerance("float32", "float32") == 1e-4
    assert tolerance("float16", "float32") == tolerance("float32", "float16") == 2e-3
    assert tolerance("float16", "bfloat16") == 2e-2


@pytest.mark.parametrize(("fixture", "positions"), [("tiny_gpt2_left", "mask"),
                                                    ("tiny_gpt2_right", "model")])
def test_dry_run_reports_the_check_and_writes_nothing(request, tmp_path, fixture, positions):
    model = request.getfixturevalue(fixture)
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"text": t}) + "\n" for t in SENTENCES))
    lines: list[str] = []
    job = parse_job({"model": model, "inputs": str(inputs), "store": str(tmp_path / "s.zarr"),
                     "batch_size": 4})
    run_job(job, dry_run=True, echo=lines.append)
    side = "left" if "left" in fixture else "right"
    check = [line for line in lines if line.startswith("check:")]
    assert check == [check[0]] and f"with {side} padding, {positions} positions" in check[0]
    assert not (tmp_path / "s.zarr").exists()
