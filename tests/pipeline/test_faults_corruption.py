"""Corruption at rest: checksummed chunks, `info --verify`, `cache --repair`, format 1 still reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from actcache import open_store
from actcache.cli import main
from actcache.driver import load_job, run_job
from actcache.schemas.errors import StoreCorruptError
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
    flip_byte(store / "tokens" / "layer_0" / "c" / "4" / "0")

    s = open_store(url)
    with pytest.raises(StoreCorruptError, match=r"in unit 1 \(mean/layer_3\); rerun"):
        s.read(3, "mean")
    with pytest.raises(StoreCorruptError, match=r"in unit 1 \(mean/layer_3\); rerun"):
        s.topk(3, np.ones(s.manifest["model"]["hidden_size"], np.float32), k=3, pooling="mean")
    np.testing.assert_array_equal(s.read(3, "mean", rows=[0, 1, 8]),  # other units still read
                                  before[("mean", 3)][[0, 1, 8]])
    with pytest.raises(StoreCorruptError, match=r"in unit 4 \(tokens/layer_0\)"):
        s.read(0, "tokens", rows=[16])

    assert main(["info", "--verify", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: store {url} has chunks that fail their checksum in unit 1 (mean/layer_3); "
        "unit 4 (tokens/layer_0); rerun its job with `actcache cache JOB.yaml --repair` "
        "to recompute those units"
    ]

    lines: list[str] = []
    summary = run_job(load_job(job), inline=True, repair=True, echo=lines.append)
    assert lines[0] == "repair: recomputing units 1, 4 (chunks that failed their checksum)"
    assert sorted(t.unit for t in summary.plan.tasks) == [1, 4]
    assert summary.plan.skipped == len(SENTENCES) - 2 * ROWS
    after = values(url)
    for key, want in before.items():
        np.testing.assert_array_equal(after[key], want)
    assert open_store(url).ids == tuple(f"s{i:02d}" for i in range(len(SENTENCES)))
    # The other units' chunks were not rewritten.
    for path, data in untouched.items():
        if not any(f"/c/{u}/" in str(path) for u in (1, 4)):
            assert path.read_bytes() == data, path
    assert main(["info", "--verify", url]) == 0


def test_a_format_1_store_without_checksums_still_reads(
    tmp_path: Path, tiny_bert: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import zarr

    import actcache.create

    job = make_job(tmp_path, tiny_bert)
    with monkeypatch.context() as m:  # the format 1 layout: no crc32c in the chunk codecs
        m.setattr(actcache.create, "CHECKSUM_CODECS", ())
        run_job(load_job(job), inline=True, echo=lambda *_: None)
    url = str(tmp_path / "store.zarr")
    group = zarr.open_group(url, mode="r+")
    manifest = dict(group.attrs["actcache"])
    manifest.pop("checksum")
    group.attrs["actcache"] = {**manifest, "format_version": 1}
    codecs = json.loads((tmp_path / "store.zarr/mean/layer_3/zarr.json").read_text())
    assert "crc32c" not in json.dumps(codecs["codecs"][0]["configuration"]["codecs"])

    want = values(url)
    s = open_store(url)
    assert s.manifest["format_version"] == 1 and s.complete
    assert want[("mean", 3)].shape == (len(SENTENCES), 32)
    assert main(["info", "--verify", url]) == 0
    (tmp_path / "v2").mkdir()
    run_job(load_job(make_job(tmp_path / "v2", tiny_bert)), inline=True, echo=lambda *_: None)
    v2 = values(str(tmp_path / "v2" / "store.zarr"))  # checksums change no value
    for key, got in want.items():
        np.testing.assert_array_equal(got, v2[key])
