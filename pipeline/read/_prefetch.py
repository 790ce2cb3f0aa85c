"""Reading the next block while the caller works on this one, in a ring of buffers."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")
R = TypeVar("R")

#: Blocks in existence at once: the caller's and the one read behind it.
PREFETCH = 2


def prefetch(items: Sequence[T], read: Callable[[T, np.ndarray], R], buffer_size: int,
             name: str = "actcache-read") -> Iterator[R]:
    """``read(item, buffer)`` of each item, each read on a thread while the caller works
    on the one before.

    Blocks are read into a ring of ``PREFETCH`` flat float32 buffers of ``buffer_size``
    values, so that many exist whatever the caller keeps referencing: a buffer is reused
    once the caller has asked for the block after the one it held (a caller must not keep
    a block past its iteration). An error in the reading thread is raised in the caller.
    """
    q: queue.Queue[Any] = queue.Queue()
    stop = threading.Event()
    slots = threading.Semaphore(PREFETCH)
    ring = [np.empty(buffer_size, dtype=np.float32) for _ in range(min(PREFETCH, len(items)))]

    def work() -> None:
        try:
            for i, item in enumerate(items):
                while not slots.acquire(timeout=0.05):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                q.put(read(item, ring[i % PREFETCH]))
            q.put(None)
        except BaseException as exc:  # handed to the consumer, re-raised there
            q.put(exc)

    thread = threading.Thread(target=work, daemon=True, name=name)
    thread.start()
    try:
        while (got := q.get()) is not None:
            if isinstance(got, BaseException):
                raise got
            yield got
            del got
            slots.release()
    finally:
        stop.set()
        thread.join()


def prefetch_iter(items: Iterator[T], name: str = "actcache-read") -> Iterator[T]:
    """The items of ``items``, the next one produced on a thread while the caller works on
    this one (at most two exist at once, besides the caller's)."""
    q: queue.Queue[Any] = queue.Queue(maxsize=1)
    stop = threading.Event()
    done = object()

    def work() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.05)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
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
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)
