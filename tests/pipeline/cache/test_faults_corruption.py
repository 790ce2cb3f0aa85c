"""Corruption at rest: checksummed chunks, `info --verify`, `cache --repair`, format 1 still reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from actcache import open_store
from actcache.cache.driver import load_job, run_job
from actcache.cli import main
from actcache.schemas import store as layout
from actcache.schemas.errors import StoreCorruptError, StoreMismatchError
from tests.conftest import SENTENCES

ROWS = 4  # rows per unit: SENTENCES make 6 units


def make_job(folder: Path, model: str) -> Path:
    with (folder / "inputs.jsonl").open("w") as f:
        for i, text in enumerate(SENTENCES):
            f.write(json.dumps({"id": f"s{i:02d}", "text": text}) + "\n")
    job = folder / "job.yaml"
    job.write_text(yaml.safe_dump({
        "model": model, "inputs": "inputs.jsonl", "store": "store.zarr", "id_column": "id",
        "layers": [0, 3], "pooling": ["mean", "tokens"], "rows_per_unit": ROWS,
    }))
    return job


def values(url: str) -> dict[tuple[str, int], np.ndarray]:
    s = open_store(url)
    return {(p, layer): s.read(layer, p) for p in s.poolings for layer in s.layers}


def flip_byte(shard: Path) -> None:
    """Change one byte of a shard's first chunk, as bit rot or a bad disk would."""
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x5A
    shard.write_bytes(bytes(data))


@pytest.fixture
def cached(tmp_path: Path, tiny_bert: str) -> tuple[Path, Path, dict]:
    job = make_job(tmp_path, tiny_bert)
    run_job(load_job(job), inline=True, echo=lambda *_: None)
    store = tmp_path / "store.zarr"
    return job, store, values(str(store))


def test_a_corrupt_chunk_is_an_error_naming_its_unit_and_repair_recomputes_exactly_it(
    cached: tuple[Path, Path, dict], capsys: pytest.CaptureFixture[str]
) -> None:
    job, store, before = cached
    url = str(store)
    assert main(["info", "--verify", url]) == 0
    # 2 layers x 2 poolings, and 9 row arrays (ids, seq, hash, meta, truncated, input, valid,
    # token_offset, token_length)
    assert "verified: 6 complete units x 13 arrays" in capsys.readouterr().out
    untouched = {p: p.read_bytes() for p in store.rglob("*") if p.is_file() and "/c/" in str(p)}
    flip_byte(store / "mean" / "layer_3" / "c" / "1" / "0")
    flip_byte(store / "tokens" / "layer_0" / "00000004" / "c" / "0" / "0")
    (store / "mean" / "layer_0" / "c" / "2" / "0").unlink()  # a partial copy lost it

    s = open_store(url)
    with pytest.raises(StoreCorruptError, match=r"in unit 1 \(mean/layer_3\); rerun"):
        s.read(3, "mean")
    with pytest.raises(StoreCorruptError, match=r"in unit 1 \(mean/layer_3\); rerun"):
        s.topk(3, np.ones(s.manifest["model"]["hidden_size"], np.float32), k=3, pooling="mean")
    np.testing.assert_array_equal(s.read(3, "mean", rows=[0, 1, 8]),  # other units still read
                                  before[("mean", 3)][[0, 1, 8]])
    with pytest.raises(StoreCorruptError, match=r"in unit 4 \(tokens/layer_0/00000004\)"):
        s.read(0, "tokens", rows=[16])
    with pytest.raises(StoreCorruptError, match=r"in unit 4 \(tokens/layer_0/00000004\)"):
        for _ in s.blocks(0, "tokens"):
            pass
    for read in (lambda: s.read(0, "mean"), lambda: s.read(0, "mean", rows=[9]),
                 lambda: list(s.blocks(0, "mean")),
                 lambda: s.nearest(0, np.ones(32, np.float32), k=2, pooling="mean")):
        with pytest.raises(StoreCorruptError, match=r"missing in unit 2 \(mean/layer_0\); rerun"):
            read()
    np.testing.assert_array_equal(s.read(0, "mean", rows=[0, 12]), before[("mean", 0)][[0, 12]])

    assert main(["info", "--verify", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: store {url} has chunks that fail their checksum or are missing in unit 1 "
        "(mean/layer_3); unit 2 (mean/layer_0); unit 4 (tokens/layer_0/00000004); rerun its "
        "job with `actcache cache JOB.yaml --repair` to recompute those units"
    ]

    lines: list[str] = []
    summary = run_job(load_job(job), inline=True, repair=True, echo=lines.append)
    assert lines[0] == ("repair: recomputing units 1, 2, 4 (chunks that failed their checksum "
                        "or shards that are missing)")
    assert sorted(t.unit for t in summary.plan.tasks) == [1, 2, 4]
    assert summary.plan.skipped == len(SENTENCES) - 3 * ROWS
    after = values(url)
    for key, want in before.items():
        np.testing.assert_array_equal(after[key], want)
    assert open_store(url).ids == tuple(f"s{i:02d}" for i in range(len(SENTENCES)))
    # The other units' chunks were not rewritten.
    for path, data in untouched.items():
        if not any(f"/c/{u}/" in str(path) or f"/{layout.unit_name(u)}/" in str(path) for u in (1, 2, 4)):
            assert path.read_bytes() == data, path
    assert main(["info", "--verify", url]) == 0


def test_stores_of_formats_1_and_2_still_read_and_verify(tmp_path: Path, tiny_bert: str) -> None:
    from actcache.testing import downgrade

    job = make_job(tmp_path, tiny_bert)
    run_job(load_job(job), inline=True, echo=lambda *_: None)
    want = values(str(tmp_path / "store.zarr"))
    for version in (2, 1):
        url = str(tmp_path / f"v{version}.zarr")
        shutil.copytree(tmp_path / "store.zarr", url)
        s = downgrade(url, version)
        assert s.manifest["format_version"] == version and s.complete
        codecs = json.loads((Path(url) / "mean/layer_3/zarr.json").read_text())
        assert ("crc32c" in json.dumps(codecs["codecs"][0]["configuration"]["codecs"])) == (
            version == 2)
        got = values(url)
        for key, value in want.items():
            np.testing.assert_array_equal(got[key], value)
        assert main(["info", "--verify", url]) == 0
        # A job refuses to append to an older format, naming the fix.
        job.write_text(job.read_text().replace("store.zarr", f"v{version}.zarr"))
        with pytest.raises(StoreMismatchError, match=f"format version {version}.*--overwrite"):
            run_job(load_job(job), inline=True, echo=lambda *_: None)
        job.write_text(job.read_text().replace(f"v{version}.zarr", "store.zarr"))
