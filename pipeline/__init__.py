"""actcache: cache per-layer hidden states of Hugging Face models into Zarr stores.

The public names are loaded lazily so that ``actcache --help`` and
``import actcache.schemas`` pull in neither torch nor ray.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "open_store": "actcache.store",
    "Store": "actcache.store",
    "run_job": "actcache.cache.driver",
    "load_job": "actcache.cache.driver",
    "train_probes": "actcache.probes",
    "TokenLoader": "actcache.loader",
    "compare": "actcache.similarity.api",
}

if TYPE_CHECKING:
    from actcache.cache.driver import load_job, run_job
    from actcache.loader import TokenLoader
    from actcache.similarity.api import compare
    from actcache.store import Store, open_store

__all__ = ["Store", "TokenLoader", "__version__", "compare", "load_job", "open_store", "run_job", "train_probes"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'actcache' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
