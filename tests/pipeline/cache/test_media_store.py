"""Image stores behave as text stores do: sources, class folders, resume, edits, probes, query."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from actcache import open_store
from actcache.cache.driver import parse_job, run_job
from actcache.probes import train_probes
from actcache.schemas.probe import ProbeConfig
from actcache.workers.actor import CachingWorker
from tests.media import image_bytes, reference_states, write_images

QUIET = {"inline": True, "echo": lambda *_: None}


def image_job(model: str, inputs: Path | str, store: Path, **extra: object) -> dict:
    ids = {} if Path(inputs).is_dir() else {"id_column": "id"}
    return {"model": model, "inputs": str(inputs), "store": str(store), "image_column": "image", **ids,
            "layers": "all", "pooling": ["mean", "tokens"], "dtype": "float32",
            "rows_per_unit": 3, "batch_size": 2, **extra}


def table(path: Path, cells: list, **columns: list) -> Path:
    frame = pd.DataFrame({"id": [f"im{i}" for i in range(len(cells))], "image": cells, **columns})
    if path.suffix == ".parquet":
        frame.to_parquet(path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in frame.to_dict(orient="records")))
    return path


def assert_same_rows(a, b) -> None:
    assert a.ids == b.ids
    assert (a.content_hashes() == b.content_hashes()).all()
    assert (a.patch_grid() == b.patch_grid()).all()
    for layer in a.layers:
        for pooling in ("mean", "tokens"):
            np.testing.assert_array_equal(a.read(layer, pooling), b.read(layer, pooling))


@pytest.mark.s3
def test_paths_urls_and_bytes_give_identical_stores(tmp_path, media_models, s3_bucket):
    import s3fs

    model = media_models("vit")
    files = write_images(tmp_path / "images")
    fs = s3fs.S3FileSystem()
    for f in files:
        fs.put(str(f), f"{s3_bucket}/images/{f.name}")
    sources = {
        "paths": table(tmp_path / "paths.jsonl", [str(f) for f in files]),
        "relative": table(tmp_path / "relative.jsonl", [f"images/{f.name}" for f in files]),
        "urls": table(tmp_path / "urls.jsonl", [f"s3://{s3_bucket}/images/{f.name}" for f in files]),
        "bytes": table(tmp_path / "bytes.parquet", [f.read_bytes() for f in files]),
    }
    stores = {}
    for name, inputs in sources.items():
        run_job(parse_job(image_job(model, inputs, tmp_path / f"{name}.zarr")), **QUIET)
        stores[name] = open_store(str(tmp_path / f"{name}.zarr"))
    for name in ("relative", "urls", "bytes"):
        assert_same_rows(stores["paths"], stores[name])
    assert stores["bytes"].metadata.columns.tolist() == []


def test_class_folders_give_ids_and_labels(tmp_path, media_models):
    model = media_models("vit")
    root = tmp_path / "tree"
    for label, seeds in (("cat", (1, 2)), ("dog", (3,)), ("dog/puppies", (4,))):
        (root / label).mkdir(parents=True)
        for s in seeds:
            (root / label / f"{s}.png").write_bytes(image_bytes(s, (32, 32)))
    (root / "README.txt").write_text("not an image, not in a class folder")
    (root / "loose.png").write_bytes(image_bytes(9, (32, 32)))  # no class folder: skipped
    run_job(parse_job(image_job(model, root, tmp_path / "s.zarr")), **QUIET)
    store = open_store(str(tmp_path / "s.zarr"))
    assert store.ids == ("cat/1.png", "cat/2.png", "dog/3.png", "dog/puppies/4.png")
    assert store.metadata["label"].tolist() == ["cat", "cat", "dog", "dog"]
    want = reference_states(model, [root / i for i in store.ids], [2])
    np.testing.assert_allclose(store.read(2, "mean"), np.stack([s[2][1:].mean(0) for s in want]),
                               rtol=1e-4, atol=1e-5)


class FailOnUnit1(CachingWorker):
    def process(self, task, counter=None):  # type: ignore[no-untyped-def]
        if task.unit == 1:
            raise RuntimeError("simulated crash")
        return super().process(task, counter)


@pytest.mark.slow
def test_resume_edit_probe_and_query_on_an_image_store(tmp_path, media_models):
    model = media_models("vit")
    folder = tmp_path / "images"
    files = write_images(folder)
    labels = ["a" if i % 2 else "b" for i in range(len(files))]
    inputs = table(tmp_path / "in.jsonl", [f"images/{f.name}" for f in files], label=labels)
    job = parse_job(image_job(model, inputs, tmp_path / "s.zarr"))
    reference = tmp_path / "ref.zarr"
    run_job(parse_job(image_job(model, inputs, reference)), **QUIET)

    # Resume: a run that fails part-way keeps its complete units; the next run does the rest.
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_job(job, worker_cls=FailOnUnit1, **QUIET)
    partial = open_store(job.store)
    assert 0 < len(partial.ids) < len(files)
    summary = run_job(job, **QUIET)
    assert summary.plan.skipped == len(partial.ids)
    assert_same_rows(open_store(job.store), open_store(str(reference)))

    # Incremental: a replaced image file is an edited row, re-cached alone.
    files[2].write_bytes(image_bytes(99, (32, 32)))
    summary = run_job(job, **QUIET)
    assert (summary.plan.updated, summary.plan.added, summary.plan.skipped) == (1, 0, len(files) - 1)
    store = open_store(job.store)
    assert store.ids == open_store(str(reference)).ids
    want = reference_states(model, [files[2]], [1])[0][1]
    np.testing.assert_allclose(store.read(1, "tokens", rows=[2]), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(store.read(1, "mean", rows=[2]), want[1:].mean(0, keepdims=True),
                               rtol=1e-4, atol=1e-5)

    # Probes and query read it as any store.
    result = train_probes(store, ProbeConfig(label="label", probes=["ridge"], test_fraction=0.3))
    assert sorted(result.metrics["layer"].unique()) == [0, 1, 2]
    chosen = store.select(where={"label": "a"})
    assert chosen.ids == tuple(i for i, lab in zip(store.ids, labels, strict=True) if lab == "a")
    hits = store.nearest(2, store.read(2, "mean", rows=[4])[0], k=1)
    assert hits.ids[0] == store.ids[4]


def test_moved_file_with_the_same_bytes_is_not_recomputed(tmp_path, media_models):
    model = media_models("vit")
    files = write_images(tmp_path / "a")[:3]
    run_job(parse_job(image_job(model, table(tmp_path / "in.jsonl", [str(f) for f in files]),
                                tmp_path / "s.zarr")), **QUIET)
    moved = tmp_path / "b"
    shutil.copytree(tmp_path / "a", moved)
    inputs = table(tmp_path / "in.jsonl", [str(moved / f.name) for f in files])
    summary = run_job(parse_job(image_job(model, inputs, tmp_path / "s.zarr")), **QUIET)
    assert (summary.plan.skipped, summary.plan.updated) == (3, 0)
