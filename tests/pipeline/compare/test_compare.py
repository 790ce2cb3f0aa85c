"""compare() against direct in-memory implementations, on real stores."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from actcache import compare
from actcache.schemas.errors import ConfigError, LayerNotFoundError
from actcache.similarity.api import COLUMNS, plan_passes
from actcache.testing import synthetic_store
from tests.pipeline.compare import _reference as ref

N = 300
BLOCK = 4096  # bytes: a few chunks, so every pass spans many blocks


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(N, 12)).astype(np.float32)
    # Means far from zero (as activations have) test the centring.
    return {
        "a0": (base @ rng.normal(size=(12, 16)) + 40.0).astype(np.float32),
        "a1": np.tanh(base @ rng.normal(size=(12, 16))).astype(np.float32),
        "a2": rng.normal(size=(N, 16)).astype(np.float32),
        "b0": (base @ rng.normal(size=(12, 24)) + 3).astype(np.float32),
        "b1": (rng.normal(size=(N, 24)) + base[:, :1]).astype(np.float32),
    }


@pytest.fixture(scope="module")
def stores(tmp_path_factory, data):
    """A holds rows 0..N-1 in order; B holds rows 40..N+19 of another model (its rows
    past N are new inputs), in a shuffled order: the ids shared are 40..N-1."""
    root = tmp_path_factory.mktemp("compare")
    a = synthetic_store(str(root / "a"), {0: data["a0"], 1: data["a1"], 2: data["a2"]},
                        ids=[f"r{i}" for i in range(N)], rows_per_unit=64)
    rng = np.random.default_rng(1)
    extra = rng.normal(size=(20, 24)).astype(np.float32)
    b_ids = np.array([f"r{i}" for i in range(40, N + 20)])
    b0 = np.concatenate([data["b0"][40:], extra])
    b1 = np.concatenate([data["b1"][40:], extra])
    order = rng.permutation(len(b_ids))
    b = synthetic_store(str(root / "b"), {3: b0[order], 5: b1[order]}, ids=list(b_ids[order]),
                        rows_per_unit=32, num_hidden_layers=5)
    return a, b


REFERENCE = {"cka": ref.cka, "cka-debiased": ref.cka_debiased}


@pytest.mark.parametrize("metric", ["cka", "cka-debiased"])
def test_two_stores_equal_in_memory_on_the_shared_ids(stores, data, metric):
    a, b = stores
    frame = compare(a, b, metric=metric, block_bytes=BLOCK)
    assert list(frame.columns) == COLUMNS
    assert set(frame["n_rows"]) == {N - 40}
    assert len(frame) == 3 * 2
    for row in frame.itertuples():
        x = data[f"a{row.layer_a}"][40:]
        y = data[{3: "b0", 5: "b1"}[row.layer_b]][40:]
        assert row.value == pytest.approx(REFERENCE[metric](x, y), abs=1e-6), row
        assert (row.store_a, row.store_b, row.metric) == (a.url, b.url, metric)


@pytest.mark.parametrize("metric", ["cka", "cka-debiased"])
def test_a_tenth_of_the_memory_takes_more_passes_and_gives_the_same(stores, metric):
    a, b = stores
    whole = compare(a, b, metric=metric)
    # All sums take about 30 KB: a budget a tenth of that fits one pair at a time.
    small = compare(a, b, metric=metric, max_memory="10KB")
    np.testing.assert_allclose(small["value"], whole["value"], rtol=0, atol=1e-9)
    from actcache.similarity.api import Feature

    feats = [Feature("a", i, 16) for i in range(3)] + [Feature("b", i, 24) for i in (3, 5)]
    pairs = [(u, v) for u in range(3) for v in (3, 4)] + [(i, i) for i in range(5)]
    assert len(plan_passes(feats, pairs, 10_000 * 3 // 4)) > 1
    assert len(plan_passes(feats, pairs, 2 * 10**9)) == 1


def test_store_against_itself_is_one_on_the_diagonal_and_symmetric(stores, data):
    a, _ = stores
    frame = compare(a, layers_a=[0, 1, -1], block_bytes=BLOCK)
    grid = frame.pivot(index="layer_a", columns="layer_b", values="value").to_numpy()
    np.testing.assert_allclose(np.diag(grid), 1.0, atol=1e-9)
    np.testing.assert_allclose(grid, grid.T, atol=1e-12)
    assert grid[0, 1] == pytest.approx(ref.cka(data["a0"], data["a1"]), abs=1e-6)
    assert sorted(set(frame["layer_b"])) == [0, 1, 2]  # -1 resolved to the last layer


@pytest.mark.parametrize("metric", ["cka", "cka-debiased"])
def test_orthogonal_transform_and_isotropic_scaling_give_one(tmp_path, metric):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 10)) + 5
    q, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    a = synthetic_store(str(tmp_path / "a"), {0: x.astype(np.float32)}, rows_per_unit=50)
    b = synthetic_store(str(tmp_path / "b"), {0: (3.7 * x @ q - 2).astype(np.float32)},
                        rows_per_unit=50)
    value = compare(a, b, metric=metric, block_bytes=BLOCK)["value"].item()
    assert value == pytest.approx(1.0, abs=1e-5)


def test_debiased_is_near_zero_for_independent_features_at_small_n(tmp_path):
    rng = np.random.default_rng(3)
    biased, debiased = [], []
    for trial in range(5):
        x, y = rng.normal(size=(2, 32, 64)).astype(np.float32)
        a = synthetic_store(str(tmp_path / f"a{trial}"), {0: x}, rows_per_unit=32)
        b = synthetic_store(str(tmp_path / f"b{trial}"), {0: y}, rows_per_unit=32)
        biased.append(compare(a, b)["value"].item())
        debiased.append(compare(a, b, metric="cka-debiased")["value"].item())
    assert min(biased) > 0.5  # the biased estimator's well-known floor at n < width
    assert abs(float(np.mean(debiased))) < 0.05


def test_mutual_knn_equals_direct_and_states_the_sample(stores, data):
    a, b = stores
    frame = compare(a, b, metric="mutual-knn", k=10)
    for row in frame.itertuples():
        x = data[f"a{row.layer_a}"][40:]
        y = data[{3: "b0", 5: "b1"}[row.layer_b]][40:]
        assert row.value == pytest.approx(ref.mutual_knn(x, y, 10), abs=1e-12), row
    sampled = compare(a, b, metric="mutual-knn", k=5, sample=100, seed=7)
    assert set(sampled["n_rows"]) == {100}
    again = compare(a, b, metric="mutual-knn", k=5, sample=100, seed=7)
    np.testing.assert_array_equal(sampled["value"], again["value"])


def test_mutual_knn_refuses_more_rows_than_memory(stores):
    a, b = stores
    with pytest.raises(ConfigError, match="--max-memory"):
        compare(a, b, metric="mutual-knn", max_memory="100KB")


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"metric": "procrustes"}, ConfigError, "unknown metric 'procrustes'; choose one of cka"),
    ({"layers_a": [7]}, LayerNotFoundError, "layer 7 is not in the store"),
    ({"layers_b": [4]}, LayerNotFoundError, "stored layers: 3, 5"),
    ({"max_memory": "lots"}, ConfigError, "--max-memory: not a memory size"),
    ({"max_memory": "1KB"}, ConfigError, "--max-memory of 1000 bytes"),
    ({"pooling": "last"}, Exception, "pooling 'last' is not in the store"),
], ids=["metric", "layer-a", "layer-b", "memory-unit", "memory-small", "pooling"])
def test_bad_input_is_one_clear_error(stores, kwargs, error, match):
    a, b = stores
    with pytest.raises(error, match=match):
        compare(a, b, **kwargs)


def test_stores_without_shared_ids_are_refused(tmp_path):
    x = np.ones((8, 4), np.float32)
    a = synthetic_store(str(tmp_path / "a"), {0: x}, ids=[f"a{i}" for i in range(8)],
                        rows_per_unit=8)
    b = synthetic_store(str(tmp_path / "b"), {0: x}, ids=[f"b{i}" for i in range(8)],
                        rows_per_unit=8)
    with pytest.raises(ConfigError, match="no id is in both stores"):
        compare(a, b)


@pytest.mark.parametrize(("pairs", "full"), [
    ([(0, 2), (0, 3), (1, 2), (1, 3), (0, 0), (1, 1), (2, 2), (3, 3)], False),
    ([(u, v) for u in range(4) for v in range(u, 4)], True),
    ([(1, 1), (3, 3)], False),
    ([(2, 0), (3, 3), (0, 0), (2, 2)], False),
], ids=["two-stores", "against-itself", "own-only", "right-before-left"])
def test_moments_of_either_layout_equal_direct_sums(pairs, full):
    from actcache.similarity import _moments

    rng = np.random.default_rng(6)
    widths = [5, 3, 7, 4]
    feats = [rng.normal(size=(133, w)) * rng.uniform(1, 50) + rng.uniform(-300, 300, size=w)
             for w in widths]
    assert _moments.layout(widths, pairs).full is full
    cuts = [0, 50, 120, 133]  # uneven blocks, the last one short
    blocks = [[f[lo:hi].astype(np.float32) for f in feats] for lo, hi in itertools.pairwise(cuts)]
    got = _moments.accumulate(blocks, widths, pairs)
    for u, v in pairs:
        x, y = (feats[i].astype(np.float32).astype(np.float64) for i in (u, v))
        x, y = x - x.mean(0), y - y.mean(0)
        s = got[u, v]
        assert s.n == 133
        assert s.cross == pytest.approx(np.linalg.norm(x.T @ y) ** 2, rel=1e-10)
        assert s.diag == pytest.approx(float(np.sum((x * x).sum(1) * (y * y).sum(1))), rel=1e-10)
        assert (s.trace_x, s.trace_y) == pytest.approx(((x * x).sum(), (y * y).sum()), rel=1e-10)
