"""The SAE example's training function on a small synthetic token store: it learns (FVE
rises), and a run stopped and resumed from its checkpoint draws bitwise the batches of an
uninterrupted run and ends with the same weights."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from train_sae import train  # noqa: E402

from actcache.store import Store  # noqa: E402
from actcache.testing import synthetic_store  # noqa: E402

HIDDEN = 32
SMALL: dict[str, Any] = {"batch_size": 128, "expansion": 4, "k": 4, "lr": 1e-2, "buffer_tokens": 1024,
         "log_every": 5}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """Tokens that are sparse sums of 64 directions, as an SAE assumes (float16, stored
    as a caching run stores them)."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 9, 300)
    total = int(lengths.sum())
    atoms = rng.standard_normal((64, HIDDEN)).astype(np.float32)
    codes = np.zeros((total, 64), np.float32)
    for i in range(total):
        codes[i, rng.choice(64, 3, replace=False)] = rng.uniform(0.5, 2, 3)
    url = str(tmp_path_factory.mktemp("sae") / "tokens.zarr")
    return synthetic_store(url, {}, rows_per_unit=128, dtype="float16", poolings=("tokens",),
                           tokens={0: codes @ atoms}, token_lengths=lengths)


def test_the_sae_learns_and_a_resumed_run_goes_on_with_the_same_batches(
        store: Store, tmp_path: Path) -> None:
    whole = train(store, 0, steps=60, checkpoint=tmp_path / "whole.pt", every=10,
                  keep=True, echo=lambda _: None, **SMALL)
    assert whole.steps == list(range(5, 65, 5))
    assert whole.fve[-1] > whole.fve[0] + 0.2, whole.fve  # it learns
    assert whole.fve[-1] > 0.6, whole.fve

    # 17 steps: mid-epoch (about 11 batches an epoch), and the rest crosses epochs.
    head = train(store, 0, steps=17, checkpoint=tmp_path / "cut.pt", every=17, keep=True,
                 echo=lambda _: None, **SMALL)
    said: list[str] = []
    tail = train(store, 0, steps=60, checkpoint=tmp_path / "cut.pt", resume=True,
                 keep=True, echo=said.append, **SMALL)
    assert said[0].startswith("resumed at step 17 (epoch 1")
    drawn = head.batches + tail.batches
    assert len(drawn) == len(whole.batches) == 60
    for (rows, positions), (want_rows, want_positions) in zip(drawn, whole.batches,
                                                              strict=True):
        assert torch.equal(rows, want_rows) and torch.equal(positions, want_positions)
    assert tail.digest == whole.digest
    assert tail.fve[-1] == pytest.approx(whole.fve[-1], abs=1e-5)
    final = {name: torch.load(tmp_path / f"{name}.pt", weights_only=False)["sae"]
             for name in ("whole", "cut")}
    for key, value in final["whole"].items():
        torch.testing.assert_close(final["cut"][key], value, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_from_other_loader_arguments_is_refused(store: Store,
                                                             tmp_path: Path) -> None:
    from actcache.schemas.errors import ConfigError

    train(store, 0, steps=3, checkpoint=tmp_path / "c.pt", echo=lambda _: None, **SMALL)
    other = SMALL | {"batch_size": 64}
    with pytest.raises(ConfigError, match=r"batch_size=128 \(now 64\)"):
        train(store, 0, steps=6, checkpoint=tmp_path / "c.pt", resume=True,
              echo=lambda _: None, **other)
