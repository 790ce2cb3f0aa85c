"""Probes on cached activations: every layer × every strength in one streamed, batched fit.

Names load lazily, so ``actcache.probes.cli`` (and ``actcache --help``) imports no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from actcache.probes._report import write_outputs
    from actcache.probes.api import ProbeResult, train_probes

_LAZY = {
    "ProbeResult": "actcache.probes.api",
    "train_probes": "actcache.probes.api",
    "write_outputs": "actcache.probes._report",
}

__all__ = ["ProbeResult", "train_probes", "write_outputs"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'actcache.probes' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
