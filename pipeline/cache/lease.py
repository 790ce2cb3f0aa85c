"""One writer at a time: a lease object in the store, with a heartbeat.

The lease is ``lease/zarr.json``: a valid zarr group node whose attributes name the
holder, so plain zarr still reads the store. It is refreshed every ``HEARTBEAT_S`` and
stale after ``STALE_S``; a lease whose holder is provably dead (same host, pid gone) is
taken over at once, so a rerun right after a crash just works.

Every change of the lease object is a compare-and-swap, so two runs racing for it can
never both win:

- creating it is exclusive (a local hard link of a complete temporary file, which fails
  when the name exists; on S3 a put with ``If-None-Match: *``);
- taking over a stale lease replaces exactly the object that was judged stale (a local
  rename to a private name, checked byte for byte; on S3 a put with ``If-Match`` its
  ETag); a racer that loses sees the winner's fresh lease and is refused.

A holder whose heartbeat finds the lease no longer its own stops beating and says so
through ``check()``: the driver stops before committing more under a lost lease.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

import psutil

from actcache.schemas import store as layout
from actcache.schemas.errors import LeaseHeldError, LeaseLostError
from actcache.workers.storage import filesystem, is_local, local_path

HEARTBEAT_S = 10.0
STALE_S = 60.0
# Operators (and tests) may shorten or lengthen the timings, e.g. for slow object stores.
HEARTBEAT_ENV = "ACTCACHE_LEASE_HEARTBEAT_S"
STALE_ENV = "ACTCACHE_LEASE_STALE_S"


def _timing(env: str, default: float) -> float:
    return float(os.environ.get(env) or default)


class Lease:
    def __init__(self, url: str, run_id: str, storage_options: dict[str, Any] | None = None):
        self.url = url
        self.run_id = run_id
        self.local = is_local(url)
        self.fs, root = filesystem(url, storage_options)
        # A memory:// store lives in this process alone: no other writer can race for it,
        # so plain reads and writes of the lease object serve.
        self.in_process = "memory" in _protocols(self.fs)
        self.path = f"{root}/{layout.LEASE_KEY}"
        self.heartbeat_s = _timing(HEARTBEAT_ENV, HEARTBEAT_S)
        self.stale_s = _timing(STALE_ENV, STALE_S)
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": run_id}
        self.lost = False
        self._tag: Any = None  # what we last wrote: our bytes (local) or their ETag (S3)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _payload(self) -> bytes:
        attrs = {"actcache_lease": {**self.holder, "heartbeat": time.time()}}
        return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs}).encode()

    # -- the object, read and swapped atomically ------------------------------------
    def _read(self) -> tuple[bytes, Any] | None:
        """(content, tag) of the lease object, or None; the tag identifies this version."""
        if self.local:
            try:
                with open(local_path(self.path), "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                return None
            return data, data
        if self.in_process:
            try:
                data = bytes(self.fs.cat_file(self.path))
            except FileNotFoundError:
                return None
            return data, data
        bucket, key, _ = self.fs.split_path(self.path)
        try:
            out = self.fs.call_s3("get_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return None
        return _sync_read(self.fs, out["Body"]), out["ETag"]

    def _put(self, data: bytes, replacing: Any = None) -> bool:
        """Write ``data`` if the lease is absent (or, with ``replacing``, still that version)."""
        if self.in_process:
            found = self._read()
            if (found[1] if found is not None else None) != replacing:
                return False
            self.fs.pipe_file(self.path, data)
            self._tag = data
            return True
        if not self.local:
            bucket, key, _ = self.fs.split_path(self.path)
            cond = {"IfMatch": replacing} if replacing is not None else {"IfNoneMatch": "*"}
            try:
                out = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **cond)
            except OSError as e:  # 412: the condition failed
                if not isinstance(e, FileExistsError) and "re-condition" not in str(e):
                    raise
                # A retried request whose first attempt did land finds its own bytes.
                found = self._read()
                if found is None or found[0] != data:
                    return False
                out = {"ETag": found[1]}
            self._tag = out["ETag"]
            return True
        path = local_path(self.path)
        if replacing is not None:
            tomb = f"{path}.{uuid.uuid4().hex}"
            try:
                os.rename(path, tomb)  # atomic: of several takers, one gets this version
            except FileNotFoundError:
                return False
            with open(tomb, "rb") as f:
                taken = f.read()
            if taken != replacing:  # it changed since it was judged: put it back, untouched
                with contextlib.suppress(FileExistsError):
                    os.link(tomb, path)
                os.unlink(tomb)
                return False
            os.unlink(tomb)
        folder = os.path.dirname(path)
        tmp = f"{os.path.dirname(folder)}/.lease-{uuid.uuid4().hex}"
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            for _ in range(5):
                try:
                    os.link(tmp, path)  # exclusive, and never a half-written lease
                    break
                except FileNotFoundError:  # a releasing run removed the empty folder
                    os.makedirs(folder, exist_ok=True)
            else:
                return False
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        self._tag = data
        return True

    # -- who holds it ---------------------------------------------------------------
    @staticmethod
    def _parse(data: bytes) -> dict[str, Any]:
        try:
            raw = json.loads(data)
            return dict(raw.get("attributes", {}).get("actcache_lease", {}))
        except (ValueError, AttributeError):
            return {}  # not a lease we wrote: judged by age alone, i.e. stale

    def current(self) -> dict[str, Any] | None:
        found = self._read()
        return None if found is None else self._parse(found[0])

    def _holder_dead(self, holder: dict[str, Any]) -> bool:
        if not holder:
            return True
        if time.time() - float(holder.get("heartbeat", 0)) > self.stale_s:
            return True
        same_host = holder.get("host") == socket.gethostname()
        return same_host and not psutil.pid_exists(int(holder.get("pid", -1)))

    def acquire(self) -> None:
        for _ in range(5):
            if self._put(self._payload()):
                self._start_heartbeat()
                return
            found = self._read()
            if found is None:
                continue  # released between our create and our read
            holder = self._parse(found[0])
            if not self._holder_dead(holder):
                age = time.time() - float(holder.get("heartbeat", 0))
                raise LeaseHeldError(
                    f"store {self.url} is being written by run {holder.get('run_id')} on "
                    f"{holder.get('host')} (pid {holder.get('pid')}, heartbeat {age:.0f}s ago); "
                    "wait for it to finish, or stop it and run again"
                )
            if self._put(self._payload(), replacing=found[1]):
                self._start_heartbeat()
                return
        raise LeaseHeldError(f"could not take the write lease of {self.url}; try again")

    def _beat(self) -> bool:
        """Refresh our lease; False when it is no longer ours."""
        found = self._read()
        if found is None or found[1] != self._tag:
            return False
        if self.local:
            # Replace in place (no moment without a lease): only a taker of a stale lease
            # could race this, and a live holder's lease is never stale.
            path = local_path(self.path)
            tmp = f"{path}.{uuid.uuid4().hex}"
            data = self._payload()
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            self._tag = data
            return True
        return self._put(self._payload(), replacing=self._tag)

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    if not self._beat():
                        self.lost = True
                        return
                except OSError:
                    continue  # a failed refresh is retried at the next beat

        self._thread = threading.Thread(target=beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise when another run took the lease over (this run's heartbeat went stale)."""
        if self.lost:
            raise LeaseLostError(
                f"run {self.run_id} lost the write lease of {self.url} to another run (its "
                "heartbeat went stale: the machine or the storage stalled); it stopped, and the "
                "units it committed are kept: rerun the job once the other run has finished"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        found = self._read()
        if found is None or found[1] != self._tag:
            return
        self.fs.rm_file(self.path)
        if self.local:
            # The empty folder would make zarr and xarray warn about a group without a node;
            # another run's fresh lease keeps it (rmdir only removes an empty folder).
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(local_path(self.path)))

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _sync_read(fs: Any, body: Any) -> bytes:
    """Read an aiobotocore streaming body on the filesystem's own event loop."""
    from fsspec.asyn import sync

    async def read() -> bytes:
        async with body as stream:
            return bytes(await stream.read())

    return bytes(sync(fs.loop, read))
