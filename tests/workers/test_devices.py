"""One place decides where to compute: selection, synchronisation, native bf16, memory."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from actcache.workers import devices


class FakeAccelerator:
    """``torch.accelerator`` on a machine whose accelerator is ``kind`` (None: none)."""

    def __init__(self, kind: str | None) -> None:
        self.kind = kind
        self.synced = 0

    def is_available(self) -> bool:
        return self.kind is not None

    def current_accelerator(self) -> torch.device | None:
        return None if self.kind is None else torch.device(self.kind)

    def synchronize(self) -> None:
        self.synced += 1


def fake_backend(available: bool, count: int = 1) -> SimpleNamespace:
    calls: list[object] = []
    return SimpleNamespace(is_available=lambda: available, device_count=lambda: count,
                           synchronize=lambda *a: calls.append(a), calls=calls)


@pytest.mark.parametrize(("kind", "expected"), [
    ("cuda", "cuda"), ("mps", "mps"), ("xpu", "xpu"), (None, "cpu"),
], ids=["cuda", "mps", "xpu", "none"])
def test_probes_take_any_accelerator_torch_reports(monkeypatch, kind, expected):
    monkeypatch.setattr(devices, "_accelerator_api", lambda: FakeAccelerator(kind))
    assert devices.pick_device() == torch.device(expected)
    assert devices.pick_device(prefer_gpu=False) == torch.device("cpu")


@pytest.mark.parametrize(("kind", "expected"), [
    ("cuda", "cuda"), ("mps", "cpu"), ("xpu", "cpu"), (None, "cpu"),
], ids=["cuda", "mps", "xpu", "none"])
def test_caching_takes_cuda_or_the_cpu(monkeypatch, kind, expected):
    monkeypatch.setattr(devices, "_accelerator_api", lambda: FakeAccelerator(kind))
    assert devices.pick_device(kinds=devices.CACHE_ACCELERATORS) == torch.device(expected)


@pytest.mark.parametrize(("available", "expected"), [
    ({"cuda", "mps", "xpu"}, "cuda"), ({"mps", "xpu"}, "mps"), ({"xpu"}, "xpu"), (set(), "cpu"),
], ids=["cuda-first", "mps-next", "xpu-last", "none"])
def test_older_torch_tries_cuda_then_mps_then_xpu(monkeypatch, available, expected):
    """torch before 2.6 has no ``torch.accelerator``: the backends are asked in order."""
    monkeypatch.setattr(devices, "_accelerator_api", lambda: None)
    backends = {kind: fake_backend(kind in available) for kind in ("cuda", "mps", "xpu")}
    monkeypatch.setattr(devices, "_backend", lambda kind: backends.get(kind))
    assert devices.pick_device() == torch.device(expected)


def test_counts_follow_the_accelerator_and_caching_counts_cuda_only(monkeypatch):
    monkeypatch.setattr(devices, "_accelerator_api", lambda: FakeAccelerator("mps"))
    backends = {"cuda": fake_backend(False, 0), "mps": fake_backend(True, 1)}
    monkeypatch.setattr(devices, "_backend", lambda kind: backends.get(kind))
    assert devices.accelerator_count() == 1
    assert devices.gpu_count() == 0
    assert devices.memory_bytes(0) is None
    from actcache.workers.placement import actor_gpus

    assert actor_gpus(2) == []

    backends["cuda"] = fake_backend(True, 4)
    assert devices.gpu_count() == 4
    assert actor_gpus(2) == [0, 1]
    assert actor_gpus(8) == [0, 1, 2, 3]
    assert actor_gpus(0.5) == [0]


def test_this_machine_without_an_accelerator():
    if devices.accelerator() is not None:
        pytest.skip("this machine has an accelerator")
    assert devices.pick_device() == torch.device("cpu")
    assert devices.accelerator_count() == 0
    assert devices.memory_bytes() is None
    devices.synchronize("cpu")  # nothing to wait for, and no error


def test_synchronize_waits_on_the_devices_own_backend(monkeypatch):
    backends = {"cuda": fake_backend(True), "mps": fake_backend(True)}
    monkeypatch.setattr(devices, "_backend", lambda kind: backends.get(kind))
    devices.synchronize(torch.device("cuda", 1))
    assert backends["cuda"].calls == [(torch.device("cuda", 1),)]
    devices.synchronize("mps")
    assert backends["mps"].calls == [()]  # torch.mps.synchronize takes no device
    api = FakeAccelerator("hpu")
    monkeypatch.setattr(devices, "_accelerator_api", lambda: api)
    devices.synchronize("hpu")  # no backend module here: torch.accelerator's
    assert api.synced == 1


@pytest.mark.parametrize(("flags", "capability", "avx512_bf16", "expected"), [
    ({"avx2", "fma"}, "AVX2", False, False),
    ({"avx512f", "avx512_bf16"}, "AVX512", True, True),
    ({"avx512f", "amx_bf16", "amx_tile"}, "AVX512", False, True),
    ({"avx512f"}, "AVX512", False, False),
    (set(), "AVX512", True, True),       # no /proc (macOS, Windows): torch's own check
    (set(), "DEFAULT", False, False),
], ids=["avx2", "avx512-bf16", "amx", "avx512-only", "no-proc-bf16", "no-proc-none"])
def test_cpu_native_bf16_reads_the_cpu_flags(monkeypatch, flags, capability, avx512_bf16,
                                             expected):
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16,
                        raising=False)
    assert devices.native_bf16("cpu") is expected
    assert devices.native_bf16(torch.device("cpu")) is expected


def test_cpu_flags_are_this_machines():
    flags = devices.cpu_flags()
    try:
        with open("/proc/cpuinfo") as f:
            line = next((x for x in f if x.startswith("flags")), "")
    except OSError:
        line = ""
    assert flags == frozenset(line.partition(":")[2].split())


def test_cuda_bf16_is_native_only_from_ampere(monkeypatch):
    asked: list[bool] = []

    def supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return False

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert devices.native_bf16("cuda") is False
    assert asked == [False]  # emulated bf16 does not count


@pytest.mark.gpu
def test_on_cuda_every_answer_comes_from_the_device():
    assert devices.pick_device(kinds=devices.CACHE_ACCELERATORS).type == "cuda"
    assert devices.gpu_count() == torch.cuda.device_count() >= 1
    total = torch.cuda.get_device_properties(0).total_memory
    assert devices.memory_bytes(0) == total
    free, reported_total = devices.memory_info(0)
    assert reported_total == total and 0 < free <= total
    major, _ = torch.cuda.get_device_capability(0)
    assert devices.native_bf16("cuda") is (major >= 8)
    x = torch.randn(2048, 2048, device="cuda")
    y = x @ x
    devices.synchronize(y.device)
    assert torch.cuda.current_stream().query()  # nothing left queued
