"""One read-API test class that every store backend passes: local folder, memory://, S3.

As zarr's ``StoreTests``: ``StoreBackendTests`` holds the tests, each subclass says where
its stores live (``backend_url``), so every backend runs the same tests. The stores are
written by ``synthetic_store`` (the code of a caching run) in float16, bfloat16 and
float32, and every answer is checked against numpy on the same values cast the same way.
Only the public read API (CONTRACT.md) is used, so the tests hold for any store format.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from actcache import open_store
from actcache.schemas.errors import (
    ColumnNotFoundError,
    ConfigError,
    IdNotFoundError,
    LayerNotFoundError,
    PoolingNotFoundError,
)
from actcache.store import Store
from actcache.testing import synthetic_store
from tests.conftest import fresh_bucket

# Three units (128 + 128 + 44 rows) of 32-row chunks: reads cross unit and chunk edges.
N, HIDDEN, RPU, CHUNK = 300, 12, 128, 32
LAYERS, BLOCKS = (0, 2, 4), 4  # layer -1 is 4, -3 is 2; -2 is 3, which is not stored
TIE = (10, 250)  # two equal rows in different units: ties go to the earlier row
QUERY = 37  # the row whose values nearest() is asked about
DTYPES = ("float16", "bfloat16", "float32")


def cast(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as a store of ``dtype`` gives them back (round to nearest even)."""
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        return torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    return x


@dataclass(frozen=True)
class Written:
    """A store and what it must give back."""

    store: Store
    url: str
    dtype: str
    x: dict[int, np.ndarray]  # pooled values per layer, already cast
    tokens: dict[int, np.ndarray]  # token values per layer, already cast
    lengths: np.ndarray
    ids: list[str]
    meta: list[dict[str, object]]
    direction: np.ndarray

    def token_rows(self, layer: int, rows: list[int]) -> np.ndarray:
        offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        return np.concatenate([self.tokens[layer][offsets[r]:offsets[r + 1]] for r in rows])


def _values(seed: int = 0) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], np.ndarray,
                                    np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 6, N)
    # Small integers and quarters (exact in every dtype): the tied rows score exactly
    # alike against the direction and the query row, whatever the summation order.
    direction = rng.integers(-3, 4, HIDDEN).astype(np.float32)
    direction[direction == 0] = 1
    x, tokens = {}, {}
    for layer in LAYERS:
        x[layer] = rng.standard_normal((N, HIDDEN), dtype=np.float32) * (layer + 1)
        # Far along the direction: the top two, tied.
        x[layer][list(TIE)] = 2 * np.sign(direction) * (layer + 1)
        x[layer][QUERY] = rng.integers(-8, 9, HIDDEN) / 4 * (layer + 1)
        tokens[layer] = rng.standard_normal((int(lengths.sum()), HIDDEN), dtype=np.float32)
    return x, tokens, lengths, direction


def _write(url: str, dtype: str) -> Written:
    x, tokens, lengths, direction = _values()
    ids = [f"doc-{i:03d}" for i in range(N)]
    meta = [{"label": i % 3, "split": "test" if i % 4 == 0 else "train", "text": f"row {i}"}
            for i in range(N)]
    store = synthetic_store(url, x, ids, meta, rows_per_unit=RPU, dtype=dtype,
                            poolings=("mean", "tokens"), chunk_rows=CHUNK, tokens=tokens,
                            token_lengths=lengths.tolist(), num_hidden_layers=BLOCKS)
    return Written(store, url, dtype, {k: cast(v, dtype) for k, v in x.items()},
                   {k: cast(v, dtype) for k, v in tokens.items()}, lengths, ids, meta, direction)


def _ranked(scores: np.ndarray, k: int) -> np.ndarray:
    """Rows by score descending, ties by row order: the contract's order."""
    return np.lexsort((np.arange(len(scores)), -scores))[:k]


class StoreBackendTests:
    """The read API on a store written by ``synthetic_store``; subclasses pick the backend
    by overriding the class-scoped ``backend_url`` fixture (a name → URL function)."""

    @pytest.fixture(scope="class")
    @classmethod
    def backend_url(cls) -> Callable[[str], str]:
        raise NotImplementedError

    @pytest.fixture(scope="class", params=DTYPES)
    @classmethod
    def written(cls, request: pytest.FixtureRequest,
                backend_url: Callable[[str], str]) -> Written:
        return _write(backend_url(f"{request.param}.zarr"), request.param)

    # -- ids and metadata -----------------------------------------------------------
    def test_ids_and_metadata_in_store_order(self, written: Written) -> None:
        s = written.store
        assert s.ids == tuple(written.ids)
        assert s.metadata.to_dict("records") == written.meta
        assert list(s.metadata.index) == list(range(N))

    def test_a_reopened_store_reads_the_same(self, written: Written) -> None:
        again = open_store(written.url)
        assert again.ids == written.store.ids
        np.testing.assert_array_equal(again.read(2, rows=[5, 299]), written.x[2][[5, 299]])

    # -- read -----------------------------------------------------------------------
    @pytest.mark.parametrize("layer", LAYERS)
    def test_read_a_whole_layer(self, written: Written, layer: int) -> None:
        got = written.store.read(layer)
        assert got.dtype == np.float32 and got.shape == (N, HIDDEN)
        np.testing.assert_array_equal(got, written.x[layer])
        np.testing.assert_array_equal(written.store.read(layer, "mean"), written.x[layer])

    @pytest.mark.parametrize(
        "rows",
        [[299, 0, 150, 0, 127, 128, 299], np.array([255, 256, 3, 3]), [42], range(120, 140)],
        ids=["any-order-duplicates", "numpy", "one", "range-across-units"],
    )
    def test_read_rows_in_the_order_given(self, written: Written, rows: object) -> None:
        got = written.store.read(4, rows=rows)
        np.testing.assert_array_equal(got, written.x[4][np.asarray(list(rows))])

    def test_read_no_rows(self, written: Written) -> None:
        assert written.store.read(0, rows=[]).shape == (0, HIDDEN)

    @pytest.mark.parametrize(("negative", "layer"), [(-1, 4), (-3, 2), (-5, 0)])
    def test_negative_layers_count_from_the_last_hidden_state(
        self, written: Written, negative: int, layer: int
    ) -> None:
        np.testing.assert_array_equal(written.store.read(negative, rows=[7, 1]),
                                      written.x[layer][[7, 1]])

    # -- tokens ---------------------------------------------------------------------
    def test_token_lengths(self, written: Written) -> None:
        s = written.store
        np.testing.assert_array_equal(s.token_lengths(), written.lengths)
        np.testing.assert_array_equal(s.token_lengths(rows=[260, 2, 2]),
                                      written.lengths[[260, 2, 2]])

    def test_tokens_of_one_row(self, written: Written) -> None:
        got = written.store.read(2, "tokens", rows=[200])
        assert got.shape == (written.lengths[200], HIDDEN)
        np.testing.assert_array_equal(got, written.token_rows(2, [200]))

    def test_tokens_of_several_rows_concatenate_in_the_order_given(self, written: Written
                                                                   ) -> None:
        rows = [299, 0, 130, 0, 64]
        got = written.store.read(-1, "tokens", rows=rows)
        assert got.shape == (written.lengths[rows].sum(), HIDDEN)
        np.testing.assert_array_equal(got, written.token_rows(4, rows))
        split = np.split(got, np.cumsum(written.store.token_lengths(rows=rows))[:-1])
        np.testing.assert_array_equal(split[2], written.token_rows(4, [130]))

    def test_all_tokens(self, written: Written) -> None:
        np.testing.assert_array_equal(written.store.read(0, "tokens"), written.tokens[0])

    # -- ids to rows ----------------------------------------------------------------
    def test_rows_for_ids_keep_order_and_duplicates(self, written: Written) -> None:
        got = written.store.rows_for_ids(["doc-299", "doc-000", "doc-128", "doc-000"])
        assert got.dtype == np.int64
        assert got.tolist() == [299, 0, 128, 0]

    def test_an_unknown_id_is_named(self, written: Written) -> None:
        with pytest.raises(IdNotFoundError) as info:
            written.store.rows_for_ids(["doc-001", "nope"])
        assert str(info.value) == "id 'nope' not in the store"

    def test_many_unknown_ids_name_the_first_few(self, written: Written) -> None:
        with pytest.raises(KeyError) as info:
            written.store.rows_for_ids([f"x{i}" for i in range(8)])
        assert str(info.value) == "id 'x0', 'x1', 'x2', 'x3', 'x4' and 3 more not in the store"

    # -- select ---------------------------------------------------------------------
    def test_select_by_metadata(self, written: Written) -> None:
        sel = written.store.select(where={"split": "test", "label": [0, 2]})
        want = [i for i, m in enumerate(written.meta)
                if m["split"] == "test" and m["label"] in (0, 2)]
        assert sel.rows.tolist() == want
        assert sel.ids == tuple(written.ids[i] for i in want)
        np.testing.assert_array_equal(sel.read(2), written.x[2][want])

    def test_select_by_ids_keeps_their_order(self, written: Written) -> None:
        sel = written.store.select(where={"label": 1}, ids=["doc-280", "doc-001", "doc-003"])
        assert sel.ids == ("doc-280", "doc-001")  # doc-003 has label 0
        np.testing.assert_array_equal(sel.read(-1), written.x[4][[280, 1]])

    def test_select_an_unknown_column(self, written: Written) -> None:
        with pytest.raises(ColumnNotFoundError) as info:
            written.store.select(where={"topic": "x"})
        assert str(info.value) == ("column 'topic' is not in the store's metadata; available "
                                   "columns: label, split, text")

    # -- topk and nearest, against numpy on the same values -------------------------
    @pytest.mark.parametrize("k", [1, 5, N + 5])
    def test_topk_equals_brute_force(self, written: Written, k: int) -> None:
        x = written.x[2]
        scores = x.astype(np.float64) @ written.direction
        want = _ranked(scores, k)
        got = written.store.topk(-3, written.direction, k)
        assert got.rows.tolist() == want.tolist()
        assert got.ids == tuple(written.ids[i] for i in want)
        np.testing.assert_allclose(got.scores, scores[want], rtol=1e-5, atol=1e-4)
        assert got.rows[:2].tolist() == list(TIE)[: min(k, 2)]

    @pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean"])
    def test_nearest_equals_brute_force(self, written: Written, metric: str) -> None:
        x = written.x[4].astype(np.float64)
        query = x[QUERY]
        if metric == "cosine":
            scores = x @ query / (np.linalg.norm(x, axis=1) * np.linalg.norm(query))
        elif metric == "dot":
            scores = x @ query
        else:
            scores = -np.linalg.norm(x - query, axis=1)
        want = _ranked(scores, 8)
        got = written.store.nearest(4, query.astype(np.float32), 8, metric=metric)
        assert got.rows.tolist() == want.tolist()
        np.testing.assert_allclose(got.scores, scores[want], rtol=1e-5, atol=1e-4)
        if metric != "dot":
            assert got.rows[0] == QUERY  # nothing is excluded: the query's own row is first

    def test_nearest_ties_go_to_the_earlier_row(self, written: Written) -> None:
        got = written.store.nearest(0, written.x[0][TIE[1]], 2)
        assert got.rows.tolist() == list(TIE)

    # -- errors ---------------------------------------------------------------------
    @pytest.mark.parametrize("layer", [7, 3, -2, -6])
    def test_a_layer_not_stored_lists_those_that_are(self, written: Written, layer: int
                                                     ) -> None:
        message = f"layer {layer} is not in the store; stored layers: 0, 2, 4"
        for call in (lambda: written.store.read(layer),
                     lambda: written.store.topk(layer, written.direction, 3),
                     lambda: written.store.nearest(layer, written.direction, 3)):
            with pytest.raises(LayerNotFoundError) as info:
                call()
            assert str(info.value) == message

    def test_a_pooling_not_stored_lists_those_that_are(self, written: Written) -> None:
        with pytest.raises(PoolingNotFoundError) as info:
            written.store.read(0, "max")
        assert str(info.value) == "pooling 'max' is not in the store; stored poolings: mean, tokens"

    def test_topk_and_nearest_refuse_tokens(self, written: Written) -> None:
        with pytest.raises(ConfigError, match="not tokens; choose a pooling among mean"):
            written.store.topk(0, written.direction, 3, pooling="tokens")

    def test_pooling_must_be_named_when_several_are_stored(
        self, backend_url: Callable[[str], str]
    ) -> None:
        x = _values()[0]
        s = synthetic_store(backend_url("two-poolings.zarr"),
                            {("mean", 0): x[0], ("max", 0): x[2]}, rows_per_unit=RPU,
                            poolings=("mean", "max"), chunk_rows=CHUNK)
        np.testing.assert_array_equal(s.read(0, "max"), x[2])
        with pytest.raises(PoolingNotFoundError) as info:
            s.read(0)
        assert str(info.value) == "the store has poolings mean, max: name one with `pooling`"

    # -- Store.blocks (CONTRACT.md, third wave): its tests go here --------------------


class TestLocalFolder(StoreBackendTests):
    @pytest.fixture(scope="class")
    @classmethod
    def backend_url(cls, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
        root = tmp_path_factory.mktemp("stores")
        return lambda name: str(root / name)


class TestMemory(StoreBackendTests):
    @pytest.fixture(scope="class")
    @classmethod
    def backend_url(cls) -> Callable[[str], str]:
        # memory:// is one filesystem per process: a fresh prefix keeps classes apart.
        prefix = f"memory://store-backends-{uuid.uuid4().hex[:8]}"
        return lambda name: f"{prefix}/{name}"


@pytest.mark.s3
class TestS3(StoreBackendTests):
    @pytest.fixture(scope="class")
    @classmethod
    def backend_url(cls, s3_server: str) -> Iterator[Callable[[str], str]]:
        # As conftest's s3_bucket, for the whole class: each store is written once.
        import s3fs

        with pytest.MonkeyPatch.context() as env:
            bucket = fresh_bucket(s3_server, env)
            yield lambda name: f"s3://{bucket}/{name}"
            s3fs.S3FileSystem.clear_instance_cache()
