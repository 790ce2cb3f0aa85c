"""`actcache cache` / `info` as a user runs them: plan, progress, summary, store description."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from actcache.cache.progress import Progress
from actcache.cli import main
from actcache.schemas.store import UnitReceipt
from actcache.testing import synthetic_store
from tests.conftest import SENTENCES


@pytest.fixture
def job_file(tmp_path, tiny_bert) -> Path:
    inputs = tmp_path / "data" / "in.jsonl"
    inputs.parent.mkdir()
    inputs.write_text("".join(json.dumps({"text": t, "topic": "x"}) + "\n" for t in SENTENCES))
    path = tmp_path / "job.yaml"
    # Relative paths resolve against the job file's folder.
    path.write_text(f"model: {tiny_bert}\ninputs: data/in.jsonl\nstore: out/s.zarr\n"
                    "layers: [0, -1]\npooling: [mean, tokens]\nrows_per_unit: 10\n")
    return path


def test_dry_run_prints_the_plan_and_writes_nothing(job_file, capsys):
    assert main(["cache", str(job_file), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "layers:   0, 3" in out
    assert f"rows:     {len(SENTENCES)} in input; {len(SENTENCES)} new" in out
    assert "units:    3 to compute (10 rows each)" in out
    assert "MB to write" in out
    assert not (job_file.parent / "out").exists()


def test_progress_reports_rows_per_second_and_units(capsys):
    progress = Progress(rows=20, units=2)
    for unit in range(2):
        progress.update(UnitReceipt(unit=unit, slot_start=unit * 10, rows=10, bytes=1, truncated=0,
                                    tokens=50, wall_s=0.1, run_id="r"))
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("caching: 20/20 rows, ")
    assert lines[-1].endswith(" rows/s, 2/2 units committed")


def test_progress_moves_within_a_unit(tmp_path, tiny_bert, sentences_jsonl, monkeypatch):
    """Rows advance batch by batch, before the unit's commit, and the bar's rows follow."""
    from actcache.cache import driver
    from actcache.cache.driver import load_job, run_job

    seen: list[tuple[str, int]] = []

    class Recording(Progress):
        def computed(self, rows: int) -> None:
            super().computed(rows)
            seen.append(("batch", self.shown_rows))

        def update(self, receipt: UnitReceipt) -> None:
            super().update(receipt)
            seen.append(("commit", self.rows_done))

    monkeypatch.setattr(driver, "Progress", Recording)
    job = tmp_path / "job.yaml"
    job.write_text(f"model: {tiny_bert}\ninputs: {sentences_jsonl}\nstore: s.zarr\n"
                   "rows_per_unit: 16\nbatch_size: 4\n")
    run_job(load_job(job), inline=True, echo=lambda *_: None)
    assert seen[:5] == [("batch", 4), ("batch", 8), ("batch", 12), ("batch", 16), ("commit", 16)]
    assert seen[-1] == ("commit", len(SENTENCES))


def test_progress_lines_carry_the_note(capsys):
    progress = Progress(rows=10, units=1, note="3 modules offloaded to CPU/disk (slow)")
    progress.update(UnitReceipt(unit=0, slot_start=0, rows=10, bytes=1, truncated=0, tokens=50,
                                wall_s=0.1, run_id="r"))
    progress.close()
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.endswith("units committed · 3 modules offloaded to CPU/disk (slow)")


@pytest.mark.ray
@pytest.mark.slow
def test_console_script_caches_then_info_describes(job_file, tmp_path):
    exe = shutil.which("actcache") or str(Path(sys.executable).parent / "actcache")
    env = {**os.environ, "ACTCACHE_LOG_DIR": str(tmp_path / "logs")}
    run = subprocess.run([exe, "cache", str(job_file)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"{len(SENTENCES)} rows cached in 3 units" in run.stdout
    assert "MB uncompressed) in " in run.stdout
    assert "0 truncated inputs" in run.stdout
    assert f"caching: {len(SENTENCES)}/{len(SENTENCES)} rows, " in run.stderr
    assert run.stderr.rstrip().endswith("3/3 units committed")
    # Ray's and the model's own messages go to the run's log, not the terminal.
    for noise in ("Ray instance", "Token authentication", "Loading weights", "\x1b[", "WARNING"):
        assert noise not in run.stderr + run.stdout
    (log,) = (tmp_path / "logs").glob("cache-*.log")
    assert "Started a local Ray instance" in log.read_text()
    store = job_file.parent / "out" / "s.zarr"
    info = subprocess.run([exe, "info", str(store)], capture_output=True, text=True, env=env)
    assert info.returncode == 0, info.stderr
    assert "layers:      0, 3" in info.stdout
    assert f"rows:        {len(SENTENCES)} complete" in info.stdout
    assert "units:       3/3 complete" in info.stdout
    assert "columns:     topic" in info.stdout
    # Every layer is stored raw (create.py's CODEC): nothing is called compressed.
    assert re.search(r"bytes: +\d+\.\d MB on storage, \d+\.\d MB of activations\n", info.stdout)
    again = subprocess.run([exe, "cache", str(job_file)], capture_output=True, text=True,
                           timeout=300, env=env)
    assert again.returncode == 0
    assert f"0 added, 0 updated, {len(SENTENCES)} skipped" in again.stdout


def _bytes_line(store: Path, capsys) -> str:
    assert main(["info", str(store)]) == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("bytes:")]
    return line


def _compress(store: Path, key: str) -> None:
    """Rewrite one activation array through zstd, as actcache up to format 2 stored it."""
    import zarr
    from zarr.codecs import BloscCodec, Crc32cCodec

    group = zarr.open_group(str(store), mode="a")
    old = group[key]
    values, attrs = old[:], dict(old.attrs)
    chunks, shards = old.chunks, old.shards
    del group[key]
    new = group.create_array(key, shape=values.shape, dtype=values.dtype, chunks=chunks,
                             shards=shards, dimension_names=old.metadata.dimension_names,
                             compressors=(BloscCodec(cname="zstd", clevel=3), Crc32cCodec()))
    new[:] = values
    new.attrs.update(attrs)


def test_info_calls_a_store_compressed_only_where_its_arrays_compress(tmp_path, capsys):
    values = np.arange(40 * 8, dtype="float32").reshape(40, 8)
    store = tmp_path / "s.zarr"
    synthetic_store(str(store), {0: values, 1: values}, rows_per_unit=20)
    # Pooled layers are stored raw: their size on storage is not a compressed one.
    assert re.fullmatch(r"bytes: +\d+\.\d MB on storage, \d+\.\d MB of activations",
                        _bytes_line(store, capsys))
    for layer in (0, 1):
        _compress(store, f"mean/layer_{layer}")
    assert re.fullmatch(r"bytes: +\d+\.\d MB on storage \(compressed\), "
                        r"\d+\.\d MB of activations uncompressed", _bytes_line(store, capsys))


def test_info_on_a_missing_store_is_one_line(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.strip() == f"error: no actcache store at '{tmp_path / 'nothing'}'"


def test_help_does_not_import_torch_or_ray():
    code = ("import sys; from actcache.cli import main; main(['--help']); "
            "print('torch' in sys.modules, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip().endswith("False False"), out.stdout + out.stderr


def test_a_fault_exits_1_with_the_traceback_in_a_log(tmp_path, monkeypatch, capsys):
    import actcache.info

    def broken(*_args, **_kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setenv("ACTCACHE_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setattr(actcache.info, "describe", broken)
    assert main(["info", str(tmp_path)]) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: internal error (RuntimeError: disk on fire); traceback in ")
    log = Path(line.rsplit(" ", 1)[-1])
    assert "Traceback" in log.read_text() and "disk on fire" in log.read_text()


def test_a_dashboard_address_outside_a_job_points_to_submit(monkeypatch):
    import ray

    from actcache.cache.driver import connect_ray
    from actcache.schemas.errors import ConfigError

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(ConfigError, match="actcache submit JOB.yaml --address http://127.0.0.1:8265"):
        connect_ray()
