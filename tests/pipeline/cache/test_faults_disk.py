"""A full disk: the store on a small tmpfs fills mid-run; one line, committed units kept,
a rerun with space finishes the store."""

from __future__ import annotations

import functools
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

import actcache.cache.driver
from actcache import open_store
from actcache.cache.driver import load_job, run_job
from actcache.cli import main
from tests.conftest import SENTENCES

pytestmark = pytest.mark.slow
TEXTS = [f"{s} ({i})" for i in range(6) for s in SENTENCES]  # 138 rows


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs (mounting needs root: skipped where it cannot be mounted)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def write_job(folder: Path, model: str, store: Path) -> Path:
    with (folder / "in.jsonl").open("w") as f:
        for i, text in enumerate(TEXTS):
            f.write(json.dumps({"id": f"t{i:03d}", "text": text}) + "\n")
    path = folder / f"{store.name}.yaml"
    path.write_text(yaml.safe_dump({
        "model": model, "inputs": "in.jsonl", "store": str(store), "id_column": "id",
        "layers": "all", "pooling": ["mean", "tokens"], "dtype": "float32", "rows_per_unit": 8,
    }))
    return path


def test_a_full_disk_ends_the_run_in_one_line_and_a_rerun_with_space_finishes(
    tmp_path: Path, tiny_bert: str, small_disk: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(actcache.cache.driver, "run_job", functools.partial(run_job, inline=True))
    monkeypatch.setenv("ACTCACHE_LOG_DIR", str(tmp_path / "logs"))
    reference = tmp_path / "reference.zarr"
    run_job(load_job(write_job(tmp_path, tiny_bert, reference)), inline=True,
            echo=lambda *_: None)
    want = open_store(str(reference))
    store = small_disk / "s.zarr"
    job = write_job(tmp_path, tiny_bert, store)
    capsys.readouterr()

    assert main(["cache", str(job)]) == 2
    output = capsys.readouterr().err
    err = [line for line in output.splitlines() if line.startswith("error")]
    assert "Traceback" not in output
    assert err == [
        f"error: store {store}: no space left on its device (No space left on device); every "
        "unit committed so far is kept: free space (or move the store) and run the job again "
        "to finish it"
    ]
    # No traceback log: the line says it all (Ray's own messages have their run log).
    assert not list((tmp_path / "logs").glob("actcache-*.log"))
    partial = open_store(str(store))
    assert 0 < len(partial.receipts) < len(TEXTS) // 8, "the disk must fill mid-run"
    rows = want.rows_for_ids(partial.ids)
    for layer in partial.layers:
        for pooling in partial.poolings:
            np.testing.assert_array_equal(partial.read(layer, pooling),
                                          want.read(layer, pooling, rows))

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    assert main(["cache", str(job)]) == 0
    done = open_store(str(store))
    assert done.complete and done.ids == want.ids  # every row exactly once, in order
    for layer in done.layers:
        np.testing.assert_array_equal(done.read(layer, "mean"), want.read(layer, "mean"))
        np.testing.assert_array_equal(done.read(layer, "tokens"), want.read(layer, "tokens"))
    print(f"units committed before the disk filled: {len(partial.receipts)}")
