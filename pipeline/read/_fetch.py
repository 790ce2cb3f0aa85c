"""Fetching stored values: the arrays, their codecs, concurrency, and errors naming units.

Local stores read raw shards (the layout actcache writes for activations) straight from
their files (``_shards``), and decode any other layout (format 2's compressed token
shards, format 1) through zarrs, the Rust codec pipeline for zarr-python: it checks the
crc32c of every chunk and measured 2x zarr-python's own pipeline on whole-shard reads
(benchmarks/bench_read.py). Other stores (S3, ``memory://``) use zarr-python's pipeline,
with ``IN_FLIGHT`` reads of a block outstanding at once, so that a pass over an object
store is bound by the endpoint rather than by one request at a time.

zarr reads a shard that is not there as fill values (zeros): a committed unit whose shard
went missing (a partial copy, a lifecycle rule) would read as plausible activations. So
every read first checks that the shards it covers exist, from one listing per array.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from actcache.read._plan import Plan, Read
from actcache.read._shards import ChecksumMismatch, ShardFiles
from actcache.schemas import store as layout
from actcache.schemas.errors import StoreCorruptError

T = TypeVar("T")
U = TypeVar("U")

#: Threads that read, check and work on whole local shards at once, the caller's
#: included (``each_shard``).
SHARD_WORKERS = 2
#: Rows a shard thread works through before handing a result over (``each_shard``).
TASK_ROWS = 32_768
#: Reads of one block in flight at once on a remote store.
IN_FLIGHT = 16
#: Reads fetched at once on a local store: the caller's and the next.
LOCAL_AHEAD = 2
#: Stored bytes read in one call at most (adjacent units merged): the stored values held
#: at once while a block is widened.
MERGE_BYTES = 8 * 2**20


def corrupt_message(url: str, corrupt: dict[int, list[str]]) -> str:
    """One line naming each corrupt unit (and its arrays) and the fix."""
    units = "; ".join(f"unit {u} ({', '.join(keys)})" for u, keys in sorted(corrupt.items()))
    return (
        f"store {url} has chunks that fail their checksum or are missing in {units}; rerun "
        "its job with `actcache cache JOB.yaml --repair` to recompute those units"
    )


def in_order(pool: ThreadPoolExecutor, fn: Callable[[Any], T], items: Iterable[Any],
             window: int) -> Iterator[T]:
    """``fn`` of each item on ``pool``, at most ``window`` submitted ahead of the caller,
    results in the items' order; what is still pending when the caller stops is
    cancelled."""
    pending: deque[Future[T]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


@dataclass(frozen=True)
class ShardJob:
    """Rows ``[lo, hi)`` of array ``key``, inside one shard of ``unit``."""

    key: str
    files: ShardFiles
    unit: int
    lo: int
    hi: int
    rows: np.ndarray
    """The store position of each row of the range."""


_ZARRS_CONFIG = threading.Lock()
_POOL_LOCK = threading.Lock()
_SHARD_POOL: ThreadPoolExecutor | None = None
_OPENMP: Any = None


def _one_openmp_thread() -> Any:
    """Torch runs the calling thread's work on that thread alone, until the returned
    context ends. The shard threads already keep the cores busy; each asking torch's
    OpenMP team for every core as well measured 0.057 s a top-k against 0.044 s, the
    team's threads spinning between calls. OpenMP's thread count is per calling thread,
    so the rest of the process keeps its own."""
    import torch

    global _OPENMP
    if _OPENMP is None:  # finding the process's OpenMP libraries takes a third of a ms
        from threadpoolctl import ThreadpoolController

        _OPENMP = ThreadpoolController().select(user_api="openmp")
    torch.get_num_threads()  # torch sets this thread's count on first use: let it first
    return _OPENMP.limit(limits=1)


def _shard_pool() -> ThreadPoolExecutor:
    """The process's shard threads (the caller of a pass is one more), started once:
    threads started per search measured 4 ms more a pass (each new thread sets up torch's
    OpenMP team)."""
    global _SHARD_POOL
    with _POOL_LOCK:
        if _SHARD_POOL is None:
            # A shard thread's limit is set at its start and lasts its whole life.
            _SHARD_POOL = ThreadPoolExecutor(SHARD_WORKERS - 1, thread_name_prefix="actcache-shard",
                                             initializer=_one_openmp_thread)
        return _SHARD_POOL


def _forget_pool() -> None:
    """In a forked child: its parent's threads are not in it, and the lock may have been
    held by one of them when it forked."""
    global _POOL_LOCK, _SHARD_POOL
    _POOL_LOCK, _SHARD_POOL = threading.Lock(), None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _zarrs_available() -> bool:
    try:
        import zarrs  # noqa: F401
    except ImportError:
        return False
    return True


class Fetcher:
    """Reads ``Read`` ranges of a store's arrays as stored (numpy, the storage dtype)."""

    def __init__(self, group: Any, url: str, local: bool) -> None:
        self.group, self.url, self.local = group, url, local
        self._arrays: dict[str, Any] = {}
        self._listed: dict[str, frozenset[str]] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._direct: dict[str, ShardFiles | None] = {}
        self.fast = local and _zarrs_available()

    # -- arrays ---------------------------------------------------------------------
    def array(self, key: str, unit: int | None = None) -> Any:
        """The zarr array at ``key`` (opened once); a missing one names ``unit``."""
        arr = self._arrays.get(key)
        if arr is not None:
            return arr
        import zarr

        try:
            if self.fast:
                # zarr takes the pipeline from its global config when the array opens: one
                # thread at a time, or two overlapping contexts could leave zarrs set for
                # everyone (each restores what it found).
                with _ZARRS_CONFIG, zarr.config.set(
                        {"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}):
                    arr = zarr.open_array(self.group.store, path=key, mode="r")
            else:
                arr = zarr.open_array(self.group.store, path=key, mode="r")
        except (FileNotFoundError, KeyError) as e:
            raise self._corrupt(key, unit) from e
        except Exception as e:  # zarr's own "not found" errors carry no common base
            if type(e).__name__.endswith("NotFoundError"):
                raise self._corrupt(key, unit) from e
            raise
        with self._lock:
            self._arrays[key] = arr
        return arr

    def _corrupt(self, key: str, unit: int | None) -> StoreCorruptError:
        return StoreCorruptError(corrupt_message(self.url, {-1 if unit is None else unit: [key]}))

    def _present(self, arr: Any) -> frozenset[str]:
        """Every key under the array, listed once (a LIST call per array on S3)."""
        prefix = arr.path + "/"
        found = self._listed.get(prefix)
        if found is None:
            from zarr.core.sync import sync

            async def collect() -> frozenset[str]:
                return frozenset([k async for k in self.group.store.list_prefix(prefix)])

            found = sync(collect())
            with self._lock:
                self._listed[prefix] = found
        return found

    def _check_shards(self, arr: Any, key: str, read: Read) -> None:
        per_shard = (arr.shards or arr.chunks)[0]
        present = self._present(arr)
        for shard in range(read.lo // per_shard, (read.hi - 1) // per_shard + 1):
            name = f"{arr.path}/{arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))}"
            if name not in present:
                raise self._corrupt(key, read.unit)

    # -- reads ----------------------------------------------------------------------
    def fetch(self, key: str, read: Read) -> np.ndarray:
        """The values of ``read`` as stored, ``take`` applied."""
        arr = self.array(key, read.unit)
        if read.hi <= read.lo:
            return np.zeros((0, *arr.shape[1:]), dtype=arr.dtype)
        if not key.startswith(layout.ROWS_GROUP + "/"):
            # Activations write every chunk; row arrays may skip all-fill ones (an all-False
            # `rows/truncated`), so only activations have shards that must be there.
            self._check_shards(arr, key, read)
        # Whole inner chunks only: zarrs decodes part of a chunk without its checksum, and
        # a read that skipped the check could return a flipped byte as a plausible value.
        chunk = arr.chunks[0]
        lo, hi = read.lo // chunk * chunk, min(-(-read.hi // chunk) * chunk, arr.shape[0])
        try:
            values = np.asarray(arr[lo:hi])
        except (ValueError, RuntimeError) as e:  # a chunk failing its crc32c
            raise self._corrupt(key, read.unit) from e
        if read.take is not None:
            return values[read.take + (read.lo - lo)]
        return values if (lo, hi) == (read.lo, read.hi) else values[read.lo - lo:read.hi - lo]

    def fetch_parts(self, key: str, read: Read) -> list[tuple[int, np.ndarray]]:
        """The values of ``read`` as stored, in parts: (offset in the read, values). Local
        raw shards are read from their files (``ShardFiles``), anything else by ``fetch``."""
        if self.local and read.take is None and read.hi > read.lo:
            files = self._files(key, read.unit)
            # Whole shards only pay for reads of many rows: a few rows (a lookup by id)
            # read just their chunks through zarrs.
            if files is not None and read.hi - read.lo >= files.shard // 2:
                try:
                    return files.parts(read.lo, read.hi)
                except (FileNotFoundError, ChecksumMismatch) as e:
                    raise self._corrupt(key, read.unit) from e
        return [(0, self.fetch(key, read))]

    def shard_jobs(self, plans: Sequence[Plan], layer: int) -> list[ShardJob] | None:
        """One job per shard of pooled ``plans``' rows of ``layer``, or None unless every
        read is a whole range of a local raw shard and the rows wanted are at least half
        of what the shards hold."""
        if not self.local:
            return None
        # Reads of one unit that a block boundary cut in two are one range here.
        spans: list[tuple[str, int, int, int, list[np.ndarray]]] = []
        for plan in plans:
            for read in plan.reads:
                if read.take is not None or not isinstance(read.dest, slice):
                    return None
                key = plan.key(layer, read.unit)
                rows = plan.rows[read.dest]
                if (spans and spans[-1][0] == key and spans[-1][1] == read.unit
                        and spans[-1][3] == read.lo):
                    _, unit, lo, _, parts = spans[-1]
                    spans[-1] = (key, unit, lo, read.hi, [*parts, rows])
                else:
                    spans.append((key, read.unit, read.lo, read.hi, [rows]))
        jobs: list[ShardJob] = []
        wanted = capacity = 0
        for key, unit, lo, hi, parts in spans:
            files = self._files(key, unit)
            if files is None:
                return None
            wanted += hi - lo
            capacity += ((hi - 1) // files.shard - lo // files.shard + 1) * files.shard
            rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
            a = lo
            while a < hi:  # one job per shard: each fills one buffer
                b = min(hi, (a // files.shard + 1) * files.shard)
                jobs.append(ShardJob(key, files, unit, a, b, rows[a - lo:b - lo]))
                a = b
        # Whole shards pay when most of what they hold is wanted (a few rows read just
        # their chunks through ``fetch``).
        return jobs if jobs and 2 * wanted >= capacity else None

    def each_shard(self, jobs: Sequence[ShardJob],
                   work: Callable[[np.ndarray, list[tuple[int, np.ndarray]]], T],
                   combine: Callable[[list[T]], U]) -> list[U]:
        """``combine`` of ``work(rows, parts)`` over each run of consecutive jobs
        (``TASK_ROWS`` rows or so), in job order. ``work`` gets a job's store rows and
        its values as stored, a chunk at a time (offset in the job, values).
        ``SHARD_WORKERS`` threads, the caller's included, take the runs in turn, each
        reading a shard into its own buffer and working on it there, while it is still in
        the core's cache.

        For a search, whose scoring is cheap, everything happens on the thread that read
        the shard, and the caller waits once: results handed over shard by shard woke
        the caller once a shard, taking a core and the GIL from a reading thread, and a
        top-k's cut taken once a 1,024-row shard rather than once a run measured 0.065 s
        a top-k against 0.050 s (bench_read.py's store).
        """
        size = max(job.files.file_bytes for job in jobs)
        rows = max(1, max(job.hi - job.lo for job in jobs))
        per_task = max(1, min(TASK_ROWS // rows, len(jobs) // (2 * SHARD_WORKERS)))
        tasks = [range(i, min(i + per_task, len(jobs))) for i in range(0, len(jobs), per_task)]
        results: list[U | None] = [None] * len(tasks)
        turns = iter(range(len(tasks)))
        lock = threading.Lock()
        stop = threading.Event()

        def run() -> None:
            # A buffer per call, not per thread: an idle store holds no shard's bytes.
            buffer = bytearray(size + 1)
            try:
                while not stop.is_set():
                    with lock:
                        t = next(turns, None)
                    if t is None:
                        return
                    done = []
                    for i in tasks[t]:
                        job = jobs[i]
                        try:
                            parts = job.files.parts(job.lo, job.hi, buffer)
                        except (FileNotFoundError, ChecksumMismatch) as e:
                            raise self._corrupt(job.key, job.unit) from e
                        done.append(work(job.rows, parts))
                    results[t] = combine(done)
            except BaseException:
                stop.set()  # the other threads end after their current shard
                raise

        # The caller takes turns too, so a pass always makes progress: the pool's threads
        # may be busy with another pass (a search from another thread, or from inside a
        # shard thread), and then the caller does all of this one. A helper still queued
        # when the turns run out is cancelled, never waited for.
        helpers = [_shard_pool().submit(run) for _ in range(min(SHARD_WORKERS, len(tasks)) - 1)]
        try:
            with _one_openmp_thread():
                run()
            for helper in helpers:
                if not helper.cancel():
                    helper.result()
        finally:
            stop.set()
        return results  # type: ignore[return-value]  # every task ran, or this raised

    def _files(self, key: str, unit: int) -> ShardFiles | None:
        if key not in self._direct:
            from actcache.workers.storage import local_path

            found = ShardFiles.of(self.array(key, unit), local_path(self.url))
            with self._lock:
                self._direct[key] = found
        return self._direct[key]

    def fetch_each(self, jobs: Sequence[tuple[str, Read]],
                   get: Callable[[str, Read], T]) -> Iterator[T]:
        """``get`` of each (key, read), in order, fetched ahead of the caller: on a remote
        store ``IN_FLIGHT`` at once; locally one (zarrs decodes a read's chunks on every
        core already, and one read ahead lets the decode of the next overlap the widening
        of this one: measured 1.6x on a pass), so at most two reads' values exist."""
        if len(jobs) < 2:
            for job in jobs:
                yield get(*job)
            return
        window = LOCAL_AHEAD if self.local else IN_FLIGHT
        if self._pool is None:
            self._pool = ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="actcache-fetch")
        yield from in_order(self._pool, lambda job: get(*job), jobs, window)

    def fill(self, plan: Plan, layers: Sequence[int], out: np.ndarray, dtype: str) -> None:
        """The values of ``plan`` for each of ``layers``, widened into ``out[i]``
        (``(len(layers), len(plan), hidden)`` float32)."""
        from actcache.read._convert import decode, widen

        jobs: list[tuple[str, Read, list[Read]]] = []
        targets: list[tuple[int, Read]] = []
        for i, layer in enumerate(layers):
            for job in self.merged(plan, layer):
                jobs.append(job)
                targets.append((i, job[1]))
        for (i, read), got in zip(targets, self.fetch_merged(jobs), strict=True):
            if isinstance(read.dest, slice):
                for offset, raw in got:
                    at = read.dest.start + offset
                    widen(raw, dtype, out[i, at:at + len(raw)])
            else:
                raw = got[0][1] if len(got) == 1 else np.concatenate([v for _, v in got])
                out[i, read.dest] = decode(raw, dtype)
            del got  # before the next read: its stored values go now

    def fetch_merged(self, jobs: list[tuple[str, Read, list[Read]]]
                     ) -> Iterator[list[tuple[int, np.ndarray]]]:
        """``fetch_parts`` of merged reads, fetched ahead; a merged read that fails is read
        again part by part, so that the error names the unit it is in."""
        values = self.fetch_each([(key, read) for key, read, _ in jobs], self.fetch_parts)
        for key, _, parts in jobs:
            try:
                yield next(values)
            except StoreCorruptError:
                for part in parts:
                    self.fetch_parts(key, part)
                raise

    def merged(self, plan: Plan, layer: int) -> list[tuple[str, Read, list[Read]]]:
        """The plan's reads of ``layer``, runs of whole adjacent ranges of one array merged
        up to ``MERGE_BYTES`` of stored values.

        zarr's cost is per call, and each call's widening wakes torch's threads: a 32 MiB
        block spans tens of units of a pooled layer, and reading it in one call rather
        than one per unit measured 5x faster (benchmarks/bench_read.py). The cap keeps
        the stored values in memory at once a constant. Parts keep their units, so an
        error still names the unit it is in.
        """
        out: list[tuple[str, Read, list[Read]]] = []
        for read in plan.reads:
            key = plan.key(layer, read.unit)
            if out:
                last_key, last, parts = out[-1]
                arr = self.array(key, read.unit)
                row_bytes = arr.dtype.itemsize * int(np.prod(arr.shape[1:]))
                if (key == last_key and last.hi == read.lo and last.take is None
                        and read.take is None and isinstance(last.dest, slice)
                        and isinstance(read.dest, slice) and last.dest.stop == read.dest.start
                        and (read.hi - last.lo) * row_bytes <= MERGE_BYTES):
                    merged = Read(last.unit, last.lo, read.hi, None,
                                  slice(last.dest.start, read.dest.stop))
                    out[-1] = (key, merged, [*parts, read])
                    continue
            out.append((key, read, [read]))
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

