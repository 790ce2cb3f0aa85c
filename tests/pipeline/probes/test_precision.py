"""``--precision``: ``auto`` follows what its calibration measures, records why, and bf16
never changes the answer (same C per layer, test accuracy within the sklearn tolerance)."""

import json
import uuid

import numpy as np
import pandas as pd
import pytest
import torch

from actcache.probes import _precision, train_probes
from actcache.probes._report import summary_line
from actcache.schemas.probe import Precision, ProbeConfig
from actcache.testing import synthetic_store


def _store(n=600, h=32, layers=3, seed=0):
    """Binary labels, visible more at each deeper layer; no layer near separable (there
    validation accuracy ties across C and the tie-break by loss rests on a flat optimum)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    direction = rng.standard_normal(h)
    x = {layer: (rng.standard_normal((n, h)) + 0.2 * layer * np.outer(y - 0.5, direction)
                 + rng.normal(3, 2, h)).astype(np.float32) for layer in range(layers)}
    meta = pd.DataFrame({"label": y, "split": np.where(np.arange(n) % 5 == 0, "test", "train")})
    return synthetic_store(f"memory://test-precision-{uuid.uuid4().hex[:8]}", x,
                           metadata=meta.to_dict("records"), rows_per_unit=256, chunk_rows=64)


@pytest.fixture(scope="module")
def store():
    return _store()


@pytest.fixture(scope="module")
def big_store():
    """3 MB of activations: streamed under a 1 MiB budget."""
    return _store(n=4000, h=64)


@pytest.fixture
def calibration(monkeypatch):
    """Makes the calibration see the step times given (ms per dtype) on bf16 hardware, and
    records which dtypes it timed."""
    timed = []

    def answer(times):
        def best_ms(step, dtype, device):
            step(dtype)  # the real step still runs: it must work in both precisions
            timed.append(dtype)
            return times[dtype]

        monkeypatch.setattr(_precision, "native_bf16", lambda device: True)
        monkeypatch.setattr(_precision, "_best_ms", best_ms)
        return timed

    return answer


F32, B16 = torch.float32, torch.bfloat16


@pytest.mark.parametrize(("times", "chosen", "timed_bf16"), [
    pytest.param({F32: 500.0, B16: 20.0}, "bf16", True, id="bf16-25x-faster"),
    pytest.param({F32: 500.0, B16: 400.0}, "fp32", True, id="bf16-barely-faster"),
    pytest.param({F32: 500.0, B16: 900.0}, "fp32", True, id="bf16-slower"),
    pytest.param({F32: 0.01, B16: 0.0001}, "fp32", False, id="fit-too-short-to-pay"),
])
def test_auto_follows_the_calibration(store, calibration, times, chosen, timed_bf16):
    timed = calibration(times)
    result = train_probes(store, ProbeConfig(label="label", split_column="split"))
    record = json.loads(result.metadata["precision"])
    assert result.precision == chosen
    assert record["requested"] == "auto"
    assert record["chosen"] == chosen
    assert record["fp32_step_ms"] == times[F32]
    assert (B16 in timed) == timed_bf16
    assert ("bf16_step_ms" in record) == timed_bf16
    assert record["projected_fit_fp32_s"] > 0
    line = summary_line(result)
    assert f"logistic in {chosen} (auto: {record['reason']}, decided in" in line


def test_auto_does_not_time_bf16_without_native_bf16(store, monkeypatch):
    monkeypatch.setattr(_precision, "native_bf16", lambda device: False)

    def never(*args):
        raise AssertionError("timed a step where nothing is to be decided")

    monkeypatch.setattr(_precision, "_best_ms", never)
    result = train_probes(store, ProbeConfig(label="label", split_column="split"))
    record = json.loads(result.metadata["precision"])
    assert (result.precision, record["chosen"]) == ("fp32", "fp32")
    assert record["reason"] == "no native bf16 on this cpu"


def test_streamed_run_decides_once_and_records_it(big_store, calibration):
    timed = calibration({F32: 500.0, B16: 20.0})
    cfg = ProbeConfig(label="label", split_column="split", max_memory=2**20,
                      strengths=[0.01, 1.0])
    result = train_probes(big_store, cfg)
    assert result.passes > 1  # really streamed, layer by layer
    assert timed == [F32, B16]  # one decision for all three layers
    assert json.loads(result.metadata["precision"])["chosen"] == "bf16"


@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "streamed"])
def test_bf16_gives_fp32s_answer(store, big_store, streamed):
    cfg = ProbeConfig(label="label", split_column="split",
                      max_memory=2**20 if streamed else 512 * 10**6)
    store = big_store if streamed else store
    fp32 = train_probes(store, cfg.model_copy(update={"precision": Precision.FP32}))
    bf16 = train_probes(store, cfg.model_copy(update={"precision": Precision.BF16}))
    assert bf16.precision == "bf16"
    assert (bf16.passes > 1) == streamed
    assert list(bf16.metrics["strength"]) == list(fp32.metrics["strength"])
    gap = (bf16.metrics["test_accuracy"] - fp32.metrics["test_accuracy"]).abs().max()
    assert gap <= 0.01
    record = json.loads(bf16.metadata["precision"])
    assert (record["requested"], record["chosen"], record["reason"]) == ("bf16", "bf16",
                                                                        "as requested")


def test_choose_projects_the_whole_fit(monkeypatch):
    """The rule itself: a bf16 fit pays its bf16 steps and a float32 polish."""
    work = _precision.Work(fp32=10, bf16=10, polish=5)
    cpu = torch.device("cpu")
    monkeypatch.setattr(_precision, "native_bf16", lambda device: True)

    def decide(t32, t16):
        monkeypatch.setattr(_precision, "_best_ms",
                            lambda step, dtype, device: {F32: t32, B16: t16}[dtype])
        return _precision.choose(Precision.AUTO, cpu, lambda dtype: None, 100.0, work)

    # fp32: 10 steps x 10 ms x 100 = 10 s; bf16: (10 x 2 + 5 x 10) ms x 100 = 7 s.
    fast = decide(10.0, 2.0)
    assert (fast.name, fast.fit_fp32_s, fast.fit_bf16_s) == ("bf16", 10.0, 7.0)
    # bf16 steps more than twice as fast still lose: 9.5 s x MARGIN is over 10 s.
    assert decide(10.0, 4.5).name == "fp32"
    assert _precision.choose(Precision.FP32, cpu, lambda dtype: None, 1.0).name == "fp32"
    assert _precision.choose(Precision.BF16, cpu, lambda dtype: None, 1.0).name == "bf16"
