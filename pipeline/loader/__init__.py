"""Training from a store: ``TokenLoader`` for PyTorch loops, ``read_tokens`` for Ray Data.

Both cut the selected rows into the read path's plans (``actcache.read``) and read them
with its fetcher: one reader, whatever consumes the store.
"""

from actcache.loader._loader import Batch, TokenLoader
from actcache.loader._ray import read_tokens

__all__ = ["Batch", "TokenLoader", "read_tokens"]
