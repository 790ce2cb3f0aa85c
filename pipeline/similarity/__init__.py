"""Comparisons of representations across layers, models and data sets: exact streaming
linear CKA (biased and debiased) and mutual k-nearest-neighbour alignment.

The package is not named ``compare``: a submodule of that name would, once imported,
shadow the function ``actcache.compare``. ``compare`` loads lazily here, so registering
the command (``similarity.cli``) imports no numpy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from actcache.similarity.api import compare

__all__ = ["compare"]


def __getattr__(name: str) -> Any:
    if name == "compare":
        from actcache.similarity.api import compare

        return compare
    raise AttributeError(f"module 'actcache.similarity' has no attribute {name!r}")
