"""``TokenLoader``: every token once an epoch over any number of ranks, the values
``Store.read`` gives, bitwise resume, a global shuffle, bounded memory, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from actcache import TokenLoader
from actcache.schemas.errors import (
    ConfigError,
    LayerNotFoundError,
    PoolingNotFoundError,
    StoreMismatchError,
)
from actcache.store import Store
from actcache.testing import synthetic_store

N, HIDDEN, RPU, CHUNK = 300, 12, 128, 32


def _write(url: str, dtype: str = "float32", seed: int = 0) -> Store:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 9, N)  # a row may have no token at all
    x = {k: rng.standard_normal((N, HIDDEN), dtype=np.float32) for k in (0, 3)}
    t = {k: rng.standard_normal((int(lengths.sum()), HIDDEN), dtype=np.float32) for k in (0, 3)}
    return synthetic_store(url, x, rows_per_unit=RPU, chunk_rows=CHUNK, dtype=dtype,
                           poolings=("mean", "tokens"), tokens=t, token_lengths=lengths)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return _write(str(tmp_path_factory.mktemp("loader") / "s.zarr"))


def _epoch(store: Store, world_size: int, **kw: object) -> list[list]:
    """Each rank's batches of one epoch."""
    return [list(TokenLoader(store, rank=r, world_size=world_size, **kw))  # type: ignore[arg-type]
            for r in range(world_size)]


def _keys(batches: list) -> list[tuple[int, int]]:
    return [(int(r), int(p)) for b in batches for r, p in zip(b.rows, b.positions, strict=True)]


def _all_tokens(store: Store, rows: list[int] | None = None, skip: int = 0) -> set:
    lengths = store.token_lengths()
    chosen = range(store.n_rows) if rows is None else set(rows)
    return {(r, p) for r in chosen for p in range(skip, int(lengths[r]))}


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize(("rows", "skip"), [(None, 0), ([5, 299, 130, 129, 0, 5, 250, 17], 1)],
                         ids=["all", "some-skip1"])
def test_every_token_once_an_epoch_over_the_ranks(store: Store, world_size: int,
                                                  rows: list[int] | None, skip: int) -> None:
    ranks = _epoch(store, world_size, layer=3, batch_size=37, buffer_tokens=120, rows=rows,
                   skip_positions=skip)
    keys = [_keys(batches) for batches in ranks]
    flat = [k for rank in keys for k in rank]
    assert len(flat) == len(set(flat))  # nothing twice, within or across ranks
    assert set(flat) == _all_tokens(store, rows, skip)  # nothing lost
    counts = [len(batches) for batches in ranks]
    assert len(set(counts)) == 1 and counts[0] == len(TokenLoader(
        store, 3, batch_size=37, buffer_tokens=120, rows=rows, skip_positions=skip,
        rank=0, world_size=world_size))
    sizes = [len(b) for batches in ranks for b in batches[:-1]]
    assert all(s == 37 for s in sizes)  # only the last batch of a rank is short
    last = [len(batches[-1]) for batches in ranks]
    assert max(last) - min(last) <= 1


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_drop_last_yields_full_equal_batches_and_drops_only_the_remainder(
        store: Store, world_size: int) -> None:
    total = len(_all_tokens(store))
    ranks = _epoch(store, world_size, layer=0, batch_size=50, buffer_tokens=200, drop_last=True)
    flat = [k for batches in ranks for k in _keys(batches)]
    assert all(len(b) == 50 for batches in ranks for b in batches)
    assert len(flat) == len(set(flat)) == total // (50 * world_size) * 50 * world_size
    assert set(flat) <= _all_tokens(store)


def _reference(store: Store, layer: int) -> dict[tuple[int, int], np.ndarray]:
    values = store.read(layer, "tokens")
    lengths = store.token_lengths()
    starts = np.cumsum(lengths) - lengths
    return {(r, p): values[starts[r] + p] for r in range(store.n_rows)
            for p in range(int(lengths[r]))}


def test_values_are_those_store_read_gives_for_one_layer_and_a_list(store: Store) -> None:
    want = {layer: _reference(store, layer) for layer in (0, 3)}
    for batch in TokenLoader(store, 3, batch_size=64, buffer_tokens=256, seed=4):
        assert batch.x.shape == (len(batch), HIDDEN) and batch.x.dtype == torch.float32
        assert batch.rows.dtype == torch.int64 and batch.positions.dtype == torch.int32
        for x, key in zip(batch.x.numpy(), _keys([batch]), strict=True):
            np.testing.assert_array_equal(x, want[3][key])
    for batch in TokenLoader(store, [3, 0], batch_size=64, buffer_tokens=256):
        assert batch.x.shape == (len(batch), 2, HIDDEN)
        for x, key in zip(batch.x.numpy(), _keys([batch]), strict=True):
            np.testing.assert_array_equal(x[0], want[3][key])
            np.testing.assert_array_equal(x[1], want[0][key])


def test_a_pooled_layer_yields_each_row_once_with_position_zero(store: Store) -> None:
    want = store.read(0, "mean")
    ranks = _epoch(store, 2, layer=0, pooling="mean", batch_size=16, buffer_tokens=64)
    rows = [int(r) for batches in ranks for b in batches for r in b.rows]
    assert sorted(rows) == list(range(N))
    for batches in ranks:
        for b in batches:
            assert not b.positions.any()
            np.testing.assert_array_equal(b.x.numpy(), want[b.rows.numpy()])


def test_bfloat16_from_a_bfloat16_store_is_exact(tmp_path: Path) -> None:
    store = _write(str(tmp_path / "bf.zarr"), "bfloat16")
    want = _reference(store, 3)
    for batch in TokenLoader(store, 3, batch_size=100, dtype=torch.bfloat16, buffer_tokens=400):
        assert batch.x.dtype == torch.bfloat16
        got = batch.x.float().numpy()
        for x, key in zip(got, _keys([batch]), strict=True):
            np.testing.assert_array_equal(x, want[key])


@pytest.mark.parametrize(("stored", "dtype"), [("float16", torch.float32),
                                                ("bfloat16", torch.float32),
                                                ("bfloat16", torch.bfloat16),
                                                ("float16", torch.float16)])
@pytest.mark.parametrize("shuffle", [False, True], ids=["in-order", "shuffled"])
def test_batches_kept_past_later_ones_keep_the_stored_values(
        tmp_path: Path, stored: str, dtype: torch.dtype, shuffle: bool) -> None:
    """The buffer holds stored values and is reused window after window: every batch of
    an epoch, all kept until the end, still holds exactly what ``Store.read`` gives."""
    store = _write(str(tmp_path / "s.zarr"), stored)
    want = _reference(store, 3)
    batches = list(TokenLoader(store, 3, batch_size=20, buffer_tokens=100, shuffle=shuffle,
                               dtype=dtype))
    assert {tuple(b.x.shape[1:]) for b in batches} == {(HIDDEN,)}
    for batch in batches:
        assert batch.x.dtype == dtype
        for x, key in zip(batch.x.float().numpy(), _keys([batch]), strict=True):
            np.testing.assert_array_equal(x, want[key])


def _same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p.x, q.x) and torch.equal(p.rows, q.rows)
        assert torch.equal(p.positions, q.positions)


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_anywhere_in_an_epoch_is_bitwise_the_uninterrupted_run(
        store: Store, world_size: int) -> None:
    kw = {"layer": 3, "batch_size": 23, "buffer_tokens": 150, "skip_positions": 1,
          "world_size": world_size, "seed": 9}
    rng = np.random.default_rng(0)
    for rank in range(world_size):
        loader = TokenLoader(store, rank=rank, **kw)  # type: ignore[arg-type]
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            whole = list(loader)
            for stop in sorted({0, len(whole) - 1, len(whole), *rng.integers(1, len(whole), 3)}):
                loader.set_epoch(epoch)
                it = iter(loader)
                head = [next(it) for _ in range(stop)]
                state = json.loads(json.dumps(loader.state_dict()))  # JSON round trip
                assert state["batches"] == stop and state["epoch"] == epoch
                fresh = TokenLoader(store, rank=rank, **kw)  # type: ignore[arg-type]
                fresh.load_state_dict(state)
                _same(head + list(fresh), whole)
                _same(list(fresh), whole)  # afterwards: the whole epoch again


def test_epochs_and_seeds_permute_differently_and_repeat_exactly(store: Store) -> None:
    def order(seed: int, epoch: int) -> list[tuple[int, int]]:
        loader = TokenLoader(store, 3, batch_size=64, seed=seed, buffer_tokens=200)
        loader.set_epoch(epoch)
        return _keys(list(loader))

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    assert sorted(order(0, 1)) == sorted(order(1, 0))
    unshuffled = _keys(list(TokenLoader(store, 3, batch_size=64, shuffle=False)))
    assert unshuffled == sorted(unshuffled)  # physical order: rows, then positions


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_the_shuffle_mixes_rows_like_a_uniform_sample_and_forgets_the_order(
        tmp_path: Path) -> None:
    """Distinct rows in a batch against a uniform sample of the same size, and the rank
    correlation between a token's place in the store and its slot in the epoch.

    A batch is drawn from half the buffer, so its distinct rows approach a uniform
    sample's when that half holds many more rows than a batch has items: here 4,096
    tokens, about 500 rows, for batches of 128. The epoch's order is the pieces'
    permutation (~370 pieces of 512 tokens), so its rank correlation with the stored
    order is that of a random permutation of the pieces."""
    rng = np.random.default_rng(3)
    n, batch = 12_000, 128
    lengths = rng.integers(1, 16, n)
    t = {0: rng.standard_normal((int(lengths.sum()), 4), dtype=np.float32)}
    store = synthetic_store(str(tmp_path / "mix.zarr"), {}, rows_per_unit=500, chunk_rows=50,
                            poolings=("tokens",), tokens=t, token_lengths=lengths)
    owner = np.repeat(np.arange(n), lengths)
    uniform = np.mean([len(set(rng.choice(owner, batch, replace=False))) for _ in range(200)])
    place = {key: i for i, key in enumerate(sorted(_all_tokens(store)))}

    def measure(shuffle: bool) -> tuple[float, float]:
        loader = TokenLoader(store, 0, batch_size=batch, shuffle=shuffle, buffer_tokens=8192)
        batches = list(loader)
        distinct = float(np.mean([len(set(b.rows.tolist())) for b in batches]))
        where = np.array([place[k] for k in _keys(batches)])
        return distinct, _spearman(where, np.arange(len(where)))

    distinct, rho = measure(True)
    print(f"distinct rows per batch {distinct:.1f} (uniform {uniform:.1f}), rho {rho:.3f}")
    assert distinct >= 0.85 * uniform, (distinct, uniform)
    assert abs(rho) < 0.15, rho  # ~370 pieces permuted: |rho| of a random order ~ 0.05
    distinct, rho = measure(False)  # the measures can fail: reading in order does
    assert distinct < 0.3 * uniform and rho > 0.99


def test_memory_is_the_buffer_and_a_few_pieces_on_a_store_ten_times_the_buffer(
        tmp_path: Path) -> None:
    import tracemalloc

    from actcache.loader._pieces import CONCURRENT_PIECES

    rng = np.random.default_rng(1)
    n, hidden = 8192, 64
    lengths = rng.integers(1, 5, n)
    total = int(lengths.sum())
    t = {0: rng.standard_normal((total, hidden), dtype=np.float32)}
    store = synthetic_store(str(tmp_path / "big.zarr"), {}, rows_per_unit=512, dtype="float16",
                            poolings=("tokens",), tokens=t, token_lengths=lengths)
    buffer, batch = total // 10, 256
    sum(len(b) for b in TokenLoader(store, 0, batch_size=batch, buffer_tokens=buffer))  # warm
    loader = TokenLoader(store, 0, batch_size=batch, buffer_tokens=buffer)  # its buffer: below
    piece = int(loader.pieces.values.max())
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        count = sum(len(b) for b in loader)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert count == total
    chunk = 4096 * hidden * 2  # a read decodes whole chunks at each end of a piece
    # The buffer holds the values as stored (float16: 2 bytes); a batch exists as stored
    # and widened, and the one before may still be referenced.
    bound = (buffer * hidden * 2 + CONCURRENT_PIECES * (piece * hidden * 2 + 2 * chunk)
             + 2 * batch * hidden * (2 + 4) + 48 * buffer + 2**18)
    print(f"peak {peak / 2**20:.2f} MiB, bound {bound / 2**20:.2f} MiB, "
          f"buffer {buffer * hidden * 2 / 2**20:.2f} MiB")
    assert peak <= bound, (peak, bound)
    assert peak >= buffer * hidden * 2 * 0.9  # the buffer itself is what it costs


BAD = [
    ({"layer": 7}, LayerNotFoundError, "layer 7 is not in the store"),
    ({"pooling": "max"}, PoolingNotFoundError, "pooling 'max' is not in the store"),
    ({"rows": [0, 300]}, ConfigError, "rows must be store positions in 0..299"),
    ({"rows": [-301]}, ConfigError, "rows must be store positions in 0..299"),
    ({"batch_size": 10**6, "drop_last": True}, ConfigError, "lower batch_size"),
    ({"batch_size": 0}, ConfigError, "batch_size must be an integer >= 1"),
    ({"skip_positions": 99}, ConfigError, "hold no tokens past skip_positions"),
    ({"pooling": "mean", "skip_positions": 1}, ConfigError, "applies to pooling='tokens' only"),
    ({"rank": 2, "world_size": 2}, ConfigError, "need 0 <= rank < world_size"),
    ({"layer": [3, 3]}, ConfigError, "distinct layers"),
]


@pytest.mark.parametrize(("kw", "error", "message"), BAD, ids=[str(b[0]) for b in BAD])
def test_bad_arguments_are_one_clear_error(store: Store, kw: dict, error: type,
                                           message: str) -> None:
    args = {"layer": 3, "batch_size": 8} | kw
    with pytest.raises(error, match=message):
        TokenLoader(store, **args)


def test_the_valid_boundaries_are_accepted(store: Store) -> None:
    total = len(_all_tokens(store))
    (batches,) = _epoch(store, 1, layer=3, batch_size=total, drop_last=True)
    assert len(batches) == 1 and len(batches[0]) == total
    (batches,) = _epoch(store, 1, layer=-1, batch_size=1, buffer_tokens=2, rows=[-1])
    assert len(batches) == int(store.token_lengths([299])[0])


def test_a_state_from_another_store_or_other_arguments_is_refused(
        store: Store, tmp_path: Path) -> None:
    loader = TokenLoader(store, 3, batch_size=8, world_size=2, rank=0)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    other = _write(str(tmp_path / "other.zarr"), seed=1)
    with pytest.raises(StoreMismatchError, match="another store"):
        TokenLoader(other, 3, batch_size=8, world_size=2, rank=0).load_state_dict(state)
    with pytest.raises(ConfigError, match=r"batch_size=8 \(now 9\)"):
        TokenLoader(store, 3, batch_size=9, world_size=2, rank=0).load_state_dict(state)
    with pytest.raises(ConfigError, match="seed=0 \\(now 1\\)"):
        TokenLoader(store, 3, batch_size=8, seed=1, world_size=2).load_state_dict(state)
    with pytest.raises(ConfigError, match="saved with world_size 2, this loader has 3"):
        TokenLoader(store, 3, batch_size=8, world_size=3, rank=0).load_state_dict(state)
    with pytest.raises(ConfigError, match="not a TokenLoader state"):
        loader.load_state_dict({"epoch": 0})
    # Another rank of the same job takes rank 0's state: batch counts are equal.
    TokenLoader(store, 3, batch_size=8, world_size=2, rank=1).load_state_dict(state)


def test_the_loader_opens_a_url_and_rank_defaults_to_a_single_process(store: Store) -> None:
    loader = TokenLoader(store.url, 3, batch_size=500)
    assert (loader.rank, loader.world_size) == (0, 1)
    assert sum(len(b) for b in loader) == len(_all_tokens(store))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_come_through_pinned_memory_unchanged(store: Store) -> None:
    cpu = list(TokenLoader(store, 3, batch_size=64, dtype=torch.bfloat16))
    gpu = list(TokenLoader(store, 3, batch_size=64, dtype=torch.bfloat16, device="cuda"))
    for a, b in zip(cpu, gpu, strict=True):
        assert b.x.is_cuda and torch.equal(a.x, b.x.cpu())
