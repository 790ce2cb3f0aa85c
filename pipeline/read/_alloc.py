"""The process-wide allocator setting that keeps streamed blocks from piling up."""

from __future__ import annotations

_ALLOCATOR_BOUND: list[bool] = []


def bound_allocator(threshold: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes, once per process; True if set.

    Why: by default glibc raises its mmap threshold to the size of the largest block freed
    so far (up to 32 MiB), so after the first freed activation block every later block
    comes from the heap arenas instead of mmap. Blocks are allocated by the reader thread
    (and zarr's decode threads) and freed by the trainer, and the arenas they leave behind
    are fragmented and rarely trimmed: the resident set then settles at several times the
    budget (about 90 MB for a 16 MiB budget in the out-of-core test, against 30 MB with a
    fixed threshold). A fixed threshold serves every block from mmap, handed back to the
    OS on free. Fixing any threshold disables the adaptation; fixing the trim threshold or
    the arena count instead was measured not to help.

    Containment: only ``train_probes`` runs that stream call this (a run whose rows fit
    the budget never does), and only on Linux with glibc. The setting is process-wide and
    stays for the life of the process, because glibc cannot turn the adaptation back on;
    its cost to other code is one mmap and page faults per allocation above 1 MiB, small
    beside the work such an allocation is for, while smaller ones stay in the heap.
    """
    if _ALLOCATOR_BOUND:
        return _ALLOCATOR_BOUND[0]
    import ctypes
    import ctypes.util
    import sys

    ok = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            m_mmap_threshold = -3
            ok = bool(libc.mallopt(m_mmap_threshold, threshold))
        except (OSError, AttributeError):  # not glibc (musl has no mallopt)
            ok = False
    _ALLOCATOR_BOUND.append(ok)
    return ok
