"""The query API: select, read by id, top-k and nearest against brute-force numpy."""

from __future__ import annotations

import numpy as np
import pytest

from actcache.query import _search, parse_where
from actcache.read import _fetch, _reader
from actcache.schemas.errors import (
    ColumnNotFoundError,
    ConfigError,
    IdNotFoundError,
    LayerNotFoundError,
    ShapeMismatchError,
)
from actcache.testing import synthetic_store

N, HIDDEN = 300, 16


@pytest.fixture(scope="module")
def data() -> dict[int, np.ndarray]:
    rng = np.random.default_rng(7)
    return {2: rng.standard_normal((N, HIDDEN)).astype(np.float32),
            6: rng.standard_normal((N, HIDDEN)).astype(np.float32)}


@pytest.fixture(scope="module")
def store(tmp_path_factory, data):  # type: ignore[no-untyped-def]
    meta = [{"label": i % 3, "split": ["train", "test", "val"][i % 5 % 3], "name": f"n{i}"}
            for i in range(N)]
    url = str(tmp_path_factory.mktemp("query") / "s.zarr")
    return synthetic_store(url, data, [f"ex-{i}" for i in range(N)], meta,
                           rows_per_unit=64, chunk_rows=16, num_hidden_layers=6)


def brute_rank(scores: np.ndarray, k: int) -> np.ndarray:
    """Score descending, ties by row order."""
    return np.lexsort((np.arange(len(scores)), -scores))[:k]


def test_select_matches_metadata_with_type_tolerance(store) -> None:
    meta = store.metadata
    expected = np.flatnonzero((meta["label"] == 1) & (meta["split"] == "test"))
    for where in ({"label": 1, "split": "test"}, {"label": "1", "split": "test"},
                  {"label": 1.0, "split": "test"}):
        q = store.select(where=where)
        np.testing.assert_array_equal(q.rows, expected)
    assert q.ids == tuple(f"ex-{i}" for i in expected)
    assert q.metadata["label"].tolist() == [1] * len(expected)
    np.testing.assert_array_equal(q.read(6), store.read(6)[expected])


def test_select_list_means_any_and_no_filter_means_all(store) -> None:
    q = store.select(where={"split": ["test", "val"], "label": 0})
    meta = store.metadata
    expected = np.flatnonzero(meta["split"].isin(["test", "val"]) & (meta["label"] == 0))
    np.testing.assert_array_equal(q.rows, expected)
    assert len(store.select()) == N


def test_select_with_ids_keeps_their_order(store) -> None:
    q = store.select(where={"label": 2}, ids=["ex-8", "ex-2", "ex-3", "ex-5"])
    assert q.ids == ("ex-8", "ex-2", "ex-5")


def test_unknown_column_lists_the_available_ones(store) -> None:
    with pytest.raises(ColumnNotFoundError) as e:
        store.select(where={"colour": "red"})
    assert str(e.value) == ("column 'colour' is not in the store's metadata; "
                            "available columns: label, split, name")


def test_read_by_ids_in_order_with_duplicates(store, data) -> None:
    rows = store.rows_for_ids(["ex-17", "ex-42", "ex-17"])
    np.testing.assert_array_equal(store.read(layer=6, rows=rows), data[6][[17, 42, 17]])
    with pytest.raises(IdNotFoundError, match="id 'ex-999' not in the store"):
        store.rows_for_ids(["ex-1", "ex-999"])


@pytest.mark.parametrize("k", [1, 20, N, N + 5], ids=["1", "20", "all", "more-than-rows"])
def test_topk_equals_brute_force(store, data, k) -> None:
    w = np.random.default_rng(k).standard_normal(HIDDEN).astype(np.float32)
    result = store.topk(layer=6, direction=w, k=k)
    scores = data[6] @ w
    expected = brute_rank(scores, k)
    np.testing.assert_array_equal(result.rows, expected)
    assert result.ids == tuple(f"ex-{i}" for i in expected)
    np.testing.assert_allclose(result.scores, scores[expected], rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(result.scores) <= 0)


def test_topk_ties_break_by_row_order_across_blocks(tmp_path, monkeypatch) -> None:
    # Integer values: scores are exact, many rows tie, and ties span every block.
    x = (np.arange(500)[:, None] % 7 == np.arange(4)[None, :]).astype(np.float32)
    x[::3, 0] += 1  # scores 0, 1, 2 with many ties each
    s = synthetic_store(str(tmp_path / "ties.zarr"), {0: x}, rows_per_unit=100, chunk_rows=20)
    monkeypatch.setattr(_reader, "BLOCK_BYTES", 20 * 4 * 4 * 2)  # two chunks per block
    w = np.array([1, 1, 1, 1], np.float32)
    scores = x @ w
    for k in (1, 7, 60, 171, 500):
        result = s.topk(0, w, k)
        np.testing.assert_array_equal(result.rows, brute_rank(scores, k))
        np.testing.assert_array_equal(result.scores, scores[brute_rank(scores, k)])


def test_blocks_are_chunk_aligned_and_bounded(store, monkeypatch) -> None:
    chunk_bytes = store.chunk_rows * HIDDEN * 4
    seen = []
    for block in store.blocks(6, block_bytes=3 * chunk_bytes):
        positions = block.rows
        assert len(block.values) == len(positions) <= 3 * store.chunk_rows
        slots = store.physical_slots()[positions]
        assert len(set(slots // (3 * store.chunk_rows))) == 1
        seen.extend(positions.tolist())
    assert seen == list(range(N))


def test_topk_scores_a_shard_at_a_time(store, monkeypatch) -> None:
    """Each shard's rows are scored once, on a shard thread that keeps only the candidates:
    the running top-k receives at most k (no ties here) a shard and never holds more."""
    kept: list[int] = []
    pushed: list[int] = []
    keep, push = _search.RunningTopK.keep, _search.RunningTopK.push

    def counted_keep(self, rows, scores):  # type: ignore[no-untyped-def]
        kept.append(len(rows))
        return keep(self, rows, scores)

    def counted_push(self, scores, rows):  # type: ignore[no-untyped-def]
        pushed.append(len(scores))
        push(self, scores, rows)
        assert len(self.rows) <= self.k

    monkeypatch.setattr(_search.RunningTopK, "keep", counted_keep)
    monkeypatch.setattr(_search.RunningTopK, "push", counted_push)
    monkeypatch.setattr(_reader, "BLOCK_BYTES", store.chunk_rows * HIDDEN * 4)
    monkeypatch.setattr(_fetch, "TASK_ROWS", 1)  # a thread's task: one shard
    result = store.topk(2, np.ones(HIDDEN), 5)
    assert max(kept) == store.rows_per_unit
    assert sum(kept) == N
    assert len(kept) == len(pushed) == -(-N // store.rows_per_unit)
    assert max(pushed) == 5
    np.testing.assert_array_equal(result.rows, brute_rank(store.read(2) @ np.ones(HIDDEN), 5))


@pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean"])
def test_nearest_equals_brute_force(store, data, metric) -> None:
    x = data[2]
    query = x[123]
    if metric == "cosine":
        scores = (x @ query) / (np.linalg.norm(x, axis=1) * np.linalg.norm(query))
    elif metric == "dot":
        scores = x @ query
    else:
        scores = -np.linalg.norm(x - query, axis=1)
    result = store.nearest(layer=2, query=query, k=10, metric=metric)
    expected = brute_rank(scores, 10)
    np.testing.assert_array_equal(result.rows, expected)
    np.testing.assert_allclose(result.scores, scores[expected], rtol=1e-5, atol=1e-5)
    if metric != "dot":
        assert result.ids[0] == "ex-123"  # the query's own row is not excluded


def test_nearest_zero_vector_scores_zero(tmp_path) -> None:
    x = np.eye(3, dtype=np.float32)
    x[1] = 0
    s = synthetic_store(str(tmp_path / "z.zarr"), {0: x}, rows_per_unit=4)
    result = s.nearest(0, [1, 0, 0], k=3)
    assert result.rows.tolist() == [0, 1, 2]
    assert result.scores.tolist() == [1.0, 0.0, 0.0]


def test_search_within_rows(store, data) -> None:
    from actcache.query import topk

    rows = store.select(where={"label": 1}).rows
    w = np.ones(HIDDEN, np.float32)
    result = topk(store, 6, w, 7, rows=rows)
    expected = rows[brute_rank(data[6][rows] @ w, 7)]
    np.testing.assert_array_equal(result.rows, expected)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda s: s.topk(6, np.ones(HIDDEN + 1), 3), ShapeMismatchError,
         "the direction has shape (17,) but rows of layer 6 have 16 values; "
         "give a vector of length 16"),
        (lambda s: s.nearest(2, np.ones((2, HIDDEN)), 3), ShapeMismatchError,
         "the query has shape (2, 16)"),
        (lambda s: s.topk(4, np.ones(HIDDEN), 3), LayerNotFoundError,
         "layer 4 is not in the store; stored layers: 2, 6"),
        (lambda s: s.topk(6, np.ones(HIDDEN), 0), ConfigError, "k must be a positive integer"),
        (lambda s: s.nearest(6, np.ones(HIDDEN), 3, metric="l1"), ConfigError,
         "metric 'l1' is not one of cosine, dot, euclidean"),
    ],
    ids=["direction-width", "query-shape", "layer", "k", "metric"],
)
def test_bad_queries_name_the_culprit(store, call, error, message) -> None:
    with pytest.raises(error) as e:
        call(store)
    assert str(e.value).startswith(message)


def test_negative_layer_counts_from_the_last(store, data) -> None:
    w = np.ones(HIDDEN, np.float32)
    assert store.topk(-1, w, 5).ids == store.topk(6, w, 5).ids


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        (["label=1"], {"label": 1}),
        (["flag=true", "x=1.5", "name=ex-1"], {"flag": True, "x": 1.5, "name": "ex-1"}),
        (["split=test", "split=val"], {"split": ["test", "val"]}),
        (["note=a=b", "empty="], {"note": "a=b", "empty": ""}),
        (["v=null", "l=[1]"], {"v": None, "l": "[1]"}),
    ],
    ids=["int", "scalars", "repeat", "equals-in-value", "null-and-list"],
)
def test_parse_where(items, expected) -> None:
    assert parse_where(items) == expected


def test_bool_column_matches_text_true(tmp_path) -> None:
    meta = [{"flag": i % 2 == 0, "code": str(i)} for i in range(4)]
    s = synthetic_store(str(tmp_path / "b.zarr"), {0: np.zeros((4, 2), np.float32)}, None, meta,
                        rows_per_unit=4)
    assert s.select(where=parse_where(["flag=true"])).rows.tolist() == [0, 2]
    assert s.select(where=parse_where(["code=3"])).rows.tolist() == [3]


@pytest.mark.parametrize("metric", [None, "cosine", "euclidean"])
def test_search_peak_memory_is_three_reads_and_the_scoring(tmp_path, monkeypatch,
                                                           metric) -> None:
    """The stated bound, measured: per reading thread (two) one read's stored values (here a
    unit's shard) and the scoring's float32 slice and its temporaries (``SCORE_BYTES``
    each), plus a read ahead and the row numbers (16 bytes a row); numpy reports its
    allocations to tracemalloc, zarr's buffers included."""
    import tracemalloc

    rng = np.random.default_rng(3)
    hidden, rows = 128, 32_768
    url = str(tmp_path / "big.zarr")
    store = synthetic_store(url, {0: rng.standard_normal((rows, hidden)).astype(np.float32)},
                            rows_per_unit=1024, dtype="float16")
    read = 1024 * hidden * 2  # one unit's stored values a read
    monkeypatch.setattr(_fetch, "MERGE_BYTES", read)
    query = rng.standard_normal(hidden)
    store.topk(0, query, 5) if metric is None else store.nearest(0, query, 5, metric=metric)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        if metric is None:
            store.topk(0, query, 5)
        else:
            store.nearest(0, query, 5, metric=metric)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert rows * hidden * 2 >= 16 * read  # the layer is far larger than the bound
    bound = 3 * read + 6 * _search.SCORE_BYTES + 16 * rows + 2**18
    assert peak <= bound, peak / bound


@pytest.mark.parametrize("rows", [None, list(range(60, 300))], ids=["all", "restricted"])
def test_search_names_the_unit_of_a_flipped_byte_and_of_a_missing_shard(tmp_path,
                                                                        rows) -> None:
    """Whole shards read on the search threads still name the unit they belong to."""
    from pathlib import Path

    from actcache.schemas.errors import StoreCorruptError

    x = np.random.default_rng(5).standard_normal((320, 8)).astype(np.float32)
    url = str(tmp_path / "s.zarr")
    synthetic_store(url, {0: x}, rows_per_unit=64, chunk_rows=16)
    shard = Path(url) / "mean" / "layer_0" / "c" / "2" / "0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x5A
    shard.write_bytes(bytes(data))
    from actcache import open_store

    for search in (lambda s: _search.topk(s, 0, np.ones(8), 3, rows=rows),
                   lambda s: _search.nearest(s, 0, x[0], 3, rows=rows)):
        with pytest.raises(StoreCorruptError, match=r"in unit 2 \(mean/layer_0\); rerun"):
            search(open_store(url))
    (Path(url) / "mean" / "layer_0" / "c" / "2" / "0").write_bytes(
        bytes(data[:100] + bytes([data[100] ^ 0x5A]) + data[101:]))
    missing = Path(url) / "mean" / "layer_0" / "c" / "3" / "0"
    saved = missing.read_bytes()
    missing.unlink()
    with pytest.raises(StoreCorruptError, match=r"in unit 3 \(mean/layer_0\); rerun"):
        _search.topk(open_store(url), 0, np.ones(8), 3, rows=rows)
    missing.write_bytes(saved)
    # A shard longer than its layout holds (bytes appended by a bad copy).
    longer = Path(url) / "mean" / "layer_0" / "c" / "4" / "0"
    longer.write_bytes(longer.read_bytes() + bytes(4096))
    with pytest.raises(StoreCorruptError, match=r"in unit 4 \(mean/layer_0\); rerun"):
        _search.topk(open_store(url), 0, np.ones(8), 3, rows=rows)


@pytest.mark.parametrize(("hidden", "chunk"), [(16, 5), (384, 7)])
def test_identical_rows_tie_and_rank_by_row(tmp_path, hidden, chunk) -> None:
    """Identical rows score alike wherever a chunk, a shard or a scoring slice cuts them,
    so ties rank by row order as a brute-force sort would rank them."""
    row = np.random.default_rng(11).standard_normal(hidden).astype(np.float32)
    x = np.tile(row, (200, 1))
    s = synthetic_store(str(tmp_path / "same.zarr"), {0: x}, rows_per_unit=3 * chunk,
                        chunk_rows=chunk, dtype="float16")
    w = np.random.default_rng(12).standard_normal(hidden)
    everything = s.topk(0, w, 200)
    assert len(set(everything.scores.tolist())) == 1
    assert s.topk(0, w, 10).rows.tolist() == list(range(10))
    assert _search.topk(s, 0, w, 10, rows=list(range(33, 200, 3))).rows.tolist() == list(
        range(33, 63, 3))
    for metric in ("cosine", "dot", "euclidean"):
        assert s.nearest(0, x[0], 10, metric=metric).rows.tolist() == list(range(10)), metric


@pytest.mark.parametrize("content", [b"", bytes(4), bytes(64)], ids=["empty", "4-bytes", "64-bytes"])
def test_a_shard_file_too_short_for_its_index_names_its_unit(tmp_path, content) -> None:
    from pathlib import Path

    from actcache import open_store
    from actcache.schemas.errors import StoreCorruptError

    x = np.random.default_rng(6).standard_normal((320, 8)).astype(np.float32)
    url = str(tmp_path / "s.zarr")
    synthetic_store(url, {0: x}, rows_per_unit=64, chunk_rows=16)
    (Path(url) / "mean" / "layer_0" / "c" / "2" / "0").write_bytes(content)
    s = open_store(url)
    for attempt in (lambda: s.topk(0, np.ones(8), 3), lambda: s.nearest(0, x[0], 3),
                    lambda: s.read(0), lambda: s.read(0, rows=[130])):
        with pytest.raises(StoreCorruptError, match=r"in unit 2 \(mean/layer_0\); rerun"):
            attempt()


def test_a_search_inside_a_search_and_searches_side_by_side(store, data) -> None:
    """The shard threads are the process's: a search started from a shard thread (inside
    another search's scoring) or from several threads at once still finishes, exact."""
    from concurrent.futures import ThreadPoolExecutor

    w = np.ones(HIDDEN, np.float32)
    expected = brute_rank(data[2] @ w, 4).tolist()
    inner: list[list[int]] = []

    def score(values):  # type: ignore[no-untyped-def]
        if not inner:
            inner.append(store.topk(2, w, 4).rows.tolist())
        return values @ w

    got = list(store.reader.scored(2, "mean", None, score, _search.RunningTopK(4).keep))
    assert inner and all(r == expected for r in inner) and len(got) > 0  # one a thread
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: store.topk(2, w, 4).rows.tolist(), range(8)))
    assert results == [expected] * 8
