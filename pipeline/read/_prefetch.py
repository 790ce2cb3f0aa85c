"""Reading the next block while the caller works on this one."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")
R = TypeVar("R")

#: Items in existence at once: the caller's and the one read behind it.
PREFETCH = 2


def prefetch(items: Sequence[T], read: Callable[[T, np.ndarray], R], buffer_size: int,
             name: str = "actcache-read") -> Iterator[R]:
    """``read(item, buffer)`` of each item, each read on a thread while the caller works
    on the one before, into a ring of ``PREFETCH`` flat float32 buffers of
    ``buffer_size`` values: so many blocks exist whatever the caller keeps referencing (a
    buffer is reused once the caller has asked for the block after the one it held; a
    caller must not keep a block past its iteration)."""
    ring = [np.empty(buffer_size, dtype=np.float32) for _ in range(min(PREFETCH, len(items)))]
    return run_ahead((read(item, ring[i % PREFETCH]) for i, item in enumerate(items)), name)


def run_ahead(items: Iterator[T], name: str = "actcache-read") -> Iterator[T]:
    """The items of ``items``, produced on a thread while the caller works: the producer
    takes the next only when fewer than ``PREFETCH`` exist, counting the caller's (which it
    gives back by asking for the next). An error in the producer is raised in the caller."""
    q: queue.Queue[Any] = queue.Queue()
    stop = threading.Event()
    slots = threading.Semaphore(PREFETCH)
    done = object()

    def work() -> None:
        try:
            while True:
                while not slots.acquire(timeout=0.05):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                item = next(items, done)
                q.put(item)
                if item is done:
                    return
        except BaseException as exc:  # handed to the consumer, re-raised there
            q.put(exc)

    thread = threading.Thread(target=work, daemon=True, name=name)
    thread.start()
    try:
        while (got := q.get()) is not done:
            if isinstance(got, BaseException):
                raise got
            yield got
            del got
            slots.release()
    finally:
        stop.set()
        thread.join()
