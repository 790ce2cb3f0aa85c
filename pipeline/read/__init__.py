"""The one read path: every pass over a store goes through here.

Probes, top-k, nearest, select and export, verification and the loaders read a store
through ``StoreReader`` (one per open store): ``_plan`` does the layout arithmetic (which
ranges of which arrays, inside which units, make each block), ``_fetch`` reads them (the
codec pipeline, concurrency on remote stores, errors that name the unit), ``_convert``
widens stored values to float32, and ``_prefetch`` reads the next block while the caller
works on this one.
"""

from actcache.read._alloc import bound_allocator
from actcache.read._convert import decode, widen
from actcache.read._fetch import corrupt_message
from actcache.read._plan import BLOCK_BYTES, rows_per_block
from actcache.read._prefetch import PREFETCH, prefetch
from actcache.read._reader import SCORE_BYTES, Block, StoreReader

__all__ = [
    "BLOCK_BYTES",
    "PREFETCH",
    "SCORE_BYTES",
    "Block",
    "StoreReader",
    "bound_allocator",
    "corrupt_message",
    "decode",
    "prefetch",
    "rows_per_block",
    "widen",
]
